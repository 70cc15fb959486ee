"""Shared fixtures. Compile time counts on two cores: fixtures are session-scoped and reused."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# JAX's persistent compilation cache stays off in the test process (a full run on 2026-11-23
# aborted inside jax's cache write, compilation_cache.put_executable_and_time, during
# tests/test_qspec_real.py); tests/test_compile_once.py turns it on in its own subprocesses.
os.environ.setdefault("QSPEC_JAX_COMPILE_CACHE", "0")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from qspec_jax.config import preset  # noqa: E402
from qspec_jax.engine import MAP_BUDGET, memory_maps  # noqa: E402
from qspec_jax.model.params import init_params  # noqa: E402

# Every program XLA:CPU compiles keeps its machine code in its own small memory mappings, and
# Linux refuses mappings past vm.max_map_count (65530 by default), where XLA:CPU's compiler
# crashes (a full run segfaulted in backend_compile_and_load after ~920 tests, CI 2026-11-23).
# An Engine bounds the programs it holds itself (`Engine.max_programs`, `MAP_BUDGET`; tested in
# tests/test_program_bound.py), but most test files jit the decoding loop and kernels directly,
# outside any Engine, and JAX's own jit caches keep those programs without bound (measured
# without this guard: docs/development.md#the-memory-mapping-limit). So when this process's
# mappings pass the engine's MAP_BUDGET after a test, the jit caches are dropped: later tests
# recompile what they need; programs an Engine fixture holds stay.


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    yield
    if memory_maps() > MAP_BUDGET:
        jax.clear_caches()
        gc.collect()


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
