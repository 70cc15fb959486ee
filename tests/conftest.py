"""Shared fixtures. Compile time counts on two cores: fixtures are session-scoped and reused."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# JAX's persistent compilation cache stays off in the test process (a full run on 2026-11-23
# aborted inside jax's cache write, compilation_cache.put_executable_and_time, during
# tests/test_qspec_real.py); tests/test_compile_once.py turns it on in its own subprocesses.
os.environ.setdefault("QSPEC_JAX_COMPILE_CACHE", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

from qspec_jax.config import preset  # noqa: E402
from qspec_jax.model.params import init_params  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    return init_params(tiny_cfg, jax.random.PRNGKey(0))


@pytest.fixture(scope="session")
def smollm2_fp():
    """The embedded SmolLM2-135M-Instruct with float weights (dequantized GGUF), once per session."""
    import qspec_jax

    return qspec_jax.load("smollm2-135m")


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' LlamaForCausalLM and tokenizer loaded from the same embedded GGUF (float32)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qspec_jax.loading import embedded_gguf_path

    path = embedded_gguf_path()
    d, f = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(d, gguf_file=f)


@pytest.fixture(scope="session")
def smollm2_int4():
    """SmolLM2 with QuaRot + RTN int4 weights (group 64): one copy serving w4a16/w4a4/w4a8/qspec."""
    import qspec_jax

    return qspec_jax.load("smollm2-135m", quant="quarot-rtn", group_size=64, progress=False)
