"""`pallas_kernels.registry`: one selection point per op, the fallback chain, the self-check.

The self-check runs on GPU backends only by default; these tests force it on
(`registry.set_self_check(True)`) and inject implementations that fail to compile or compute the
wrong thing, then check the warning, the fallback to XLA and that the output is XLA's.
"""

import ast
import pathlib
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_test_base import random_weight

from pallas_kernels import dispatch, hadamard, registry
from pallas_kernels.registry import Implementation, KernelFallbackWarning

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def self_check_on():
    registry.set_self_check(True)
    registry.clear_self_checks()
    yield
    registry.set_self_check(None)
    registry.clear_self_checks()


@pytest.fixture
def inject():
    """Registers implementations at the front of an op's chain; removes them afterwards."""
    added = []

    def add(op, impl):
        added.append((op, registry.add_implementation(op, impl)))
        return impl

    yield add
    for op, impl in added:
        registry.remove_implementation(op, impl)


# ----------------------------------------------------------------------------- structure


def test_pallas_kernels_imports_nothing_from_qspec_jax():
    """No module of pallas_kernels names qspec_jax in an import (AST), and importing every
    module of the package loads no qspec_jax module (a fresh interpreter)."""
    pkg = ROOT / "pallas_kernels"
    offenders = []
    for path in sorted(pkg.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "qspec_jax"]
    assert offenders == []
    mods = sorted(p.stem for p in pkg.glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}: importlib.import_module('pallas_kernels.' + m)\n"
        # where the library would be built (the old lazy qspec_jax import), without building it
        "from pallas_kernels import cpu_kernels; cpu_kernels._library_path()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'qspec_jax']\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_disk_cache_uses_the_kernels_cache_root():
    from pallas_kernels import cache_dir
    from qspec_jax import disk_cache

    assert disk_cache.cache_root is cache_dir.cache_root
    assert disk_cache.compile_cache_enabled is cache_dir.compile_cache_enabled


def test_every_op_ends_with_its_reference():
    chains = dispatch.describe()
    for name in (
        "w4a16_matmul", "w4ax_matmul", "quantize_w4ax_matmul", "quantize_activations",
        "rmsnorm_quantize", "hadamard_transform", "q8_matmul", "float_linear", "lm_head", "attention",
        "hier_attention", "hier_cache_attention", "prefill",
    ):  # fmt: skip
        op = registry.get(name)
        assert chains[name][-1] == op.reference, name
    with pytest.raises(KeyError, match="no kernel op"):
        registry.get("conv2d")


def test_forced_names():
    x = jax.random.normal(jax.random.key(0), (2, 64))
    # No CPU kernel for activation quantization: "cpu" runs XLA's path.
    got = dispatch.quantize_activations(x, bits=4, impl="cpu")
    ref = dispatch.quantize_activations(x, bits=4, impl="xla")
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(NotImplementedError, match="no 'pallas' implementation"):
        dispatch.q8_matmul(x, jnp.zeros((8, 64), jnp.int8), jnp.ones((8, 2)), impl="pallas")
    with pytest.raises(ValueError, match="unknown impl"):
        dispatch.w4a16_matmul(x, None, None, impl="cuda")


def test_prefill_and_cache_defaults(monkeypatch):
    for family, prefill, hier in (("cpu", "xla", "cpu"), ("xla", None, "xla")):
        monkeypatch.setattr(dispatch, "default_impl", lambda f=family: f)
        assert dispatch.prefill_impl(None) == prefill
        assert dispatch.prefill_impl("pallas") == "pallas"  # an explicit choice is kept
        assert dispatch.hier_attention_default(64, jnp.float32) == hier
        # bfloat16 caches have the CPU kernel too; float16 has none (XLA)
        assert dispatch.hier_attention_default(64, jnp.bfloat16) == hier
        assert dispatch.hier_attention_default(64, jnp.float16) == "xla"
    # On a GPU the hierarchical cache's attention is decided per call (validated Pallas first).
    monkeypatch.setattr(dispatch, "default_impl", lambda: "pallas")
    assert dispatch.hier_attention_default(64, jnp.float32) == "auto"
    assert dispatch.cache_attention_impl("xla") == "xla"
    assert dispatch.cache_attention_impl(None) is None


def test_self_check_is_off_on_cpu_by_default(monkeypatch):
    monkeypatch.delenv(registry.ENV_SELF_CHECK, raising=False)
    registry.set_self_check(None)
    assert jax.default_backend() == "cpu" and not registry.self_check_enabled()
    monkeypatch.setenv(registry.ENV_SELF_CHECK, "1")
    assert registry.self_check_enabled()


# ----------------------------------------------------------------------------- self-check


def _compiled_hadamard(x):
    # The real Pallas kernel compiled for the backend: on CPU only interpret mode lowers, so
    # this is a kernel that fails to compile here.
    return hadamard.hadamard_transform_pallas(x, interpret=False)


def test_kernel_that_fails_to_compile_falls_back_to_xla(self_check_on, inject):
    inject("hadamard_transform", Implementation("broken", _compiled_hadamard, self_check=True))
    x = jax.random.normal(jax.random.key(1), (3, 576))
    with pytest.warns(KernelFallbackWarning, match="'broken'.*failed to compile or run"):
        y = dispatch.hadamard_transform(x)
    np.testing.assert_array_equal(
        np.asarray(y), np.asarray(dispatch.hadamard_transform(x, impl="xla"))
    )
    with warnings.catch_warnings():  # once per process: the result is cached
        warnings.simplefilter("error", KernelFallbackWarning)
        dispatch.hadamard_transform(x + 1)
    (reason,) = [r for k, r in registry.self_check_results().items() if k[1] == "broken"]
    assert "interpret mode" in reason  # the compiler's own words are kept


def _wrong_w4a16(x, packed, scales, mins):
    # 0.1% off everywhere: far beyond the 2e-6 bound of a float32 matmul.
    return dispatch.w4a16_matmul(x, packed, scales, mins, impl="xla") * 1.001


def test_wrong_kernel_falls_back_to_xla_inside_jit(self_check_on, inject, monkeypatch):
    monkeypatch.setattr(dispatch, "default_impl", lambda: "xla")  # the chain's next is XLA
    inject("w4a16_matmul", Implementation("wrong", _wrong_w4a16, self_check=True))
    packed, scales, mins = random_weight(jax.random.key(2), 576, 960, 64, True)
    x = jax.random.normal(jax.random.key(3), (4, 576))
    f = jax.jit(lambda x: dispatch.w4a16_matmul(x, packed, scales, mins))
    with pytest.warns(KernelFallbackWarning, match="'wrong'.*relative error"):
        y = f(x)  # the self-check runs while f is traced
    ref = jax.jit(lambda x: dispatch.w4a16_matmul(x, packed, scales, mins, impl="xla"))(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))  # the same XLA program
    assert dispatch.w4a16_matmul(x, packed, scales, mins, impl="wrong") is not None  # forced
    assert registry.candidates("w4a16_matmul", x, packed, scales, mins) == ["xla"]


def test_correct_kernel_passes_and_is_used(self_check_on, inject, monkeypatch):
    """A self-checked implementation that agrees with XLA is used, without a warning."""
    monkeypatch.setattr(dispatch, "default_impl", lambda: "xla")
    calls = []

    def interpret_w4a16(x, packed, scales, mins):
        calls.append(x.shape)
        return dispatch.w4a16_matmul(x, packed, scales, mins, impl="pallas_interpret")

    inject("w4a16_matmul", Implementation("good", interpret_w4a16, self_check=True))
    packed, scales, _ = random_weight(jax.random.key(4), 256, 128, 32, False)
    x = jax.random.normal(jax.random.key(5), (2, 256))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        dispatch.w4a16_matmul(x, packed, scales)
    assert calls == [(4, 256), (2, 256)]  # the self-check case, then the call


def test_refusal_is_quiet(self_check_on, monkeypatch):
    """Mosaic (not written) refuses every case with NotImplementedError: no warning, XLA."""
    monkeypatch.setattr(dispatch, "default_impl", lambda: "pallas")
    dispatch.set_gpu_backend("mosaic")
    try:
        x = jax.random.normal(jax.random.key(6), (2, 576))
        with warnings.catch_warnings():
            warnings.simplefilter("error", KernelFallbackWarning)
            y = dispatch.hadamard_transform(x)
    finally:
        dispatch.set_gpu_backend("triton")
    np.testing.assert_array_equal(
        np.asarray(y), np.asarray(dispatch.hadamard_transform(x, impl="xla"))
    )


@pytest.mark.parametrize(
    "op",
    [
        "w4a16_matmul", "w4ax_matmul", "quantize_w4ax_matmul", "quantize_activations",
        "rmsnorm_quantize", "hadamard_transform", "hier_attention", "hier_cache_attention",
    ],
)  # fmt: skip
def test_real_kernels_pass_their_self_check(op):
    """Every op's self-check case is one its Pallas kernel takes, and the kernel (interpret
    mode) is within the stated bound: the check cannot reject a correct kernel."""
    assert registry.run_self_check(op, "pallas_interpret") is None


def test_lm_head_choice():
    """The LM head: the Q8_0 kernel where the CPU kernels are auto's choice (or impl "cpu") and
    the codes exist; the float head for every other name, and without codes."""
    from pallas_kernels import cpu_kernels

    x = jax.random.normal(jax.random.key(7), (3, 64))
    codes = jax.random.randint(jax.random.key(8), (96, 64), -127, 128).astype(jnp.int8)
    scales = jax.random.uniform(jax.random.key(9), (96, 2), minval=0.001, maxval=0.01)
    float_head = lambda x: jnp.full(x.shape[:-1] + (96,), 7.0)  # a marker: "the float head ran"
    for impl in ("xla", "pallas", "pallas_interpret"):
        out = dispatch.lm_head(x, codes, scales, float_head, impl=impl)
        np.testing.assert_array_equal(np.asarray(out), 7.0)
    np.testing.assert_array_equal(np.asarray(dispatch.lm_head(x, None, None, float_head)), 7.0)
    np.testing.assert_array_equal(
        np.asarray(dispatch.lm_head(x, None, None, float_head, impl="cpu")), 7.0
    )
    auto = dispatch.lm_head(x, codes, scales, float_head)
    if cpu_kernels.available():
        ref = dispatch.q8_matmul(x, codes, scales, impl="cpu")
        np.testing.assert_array_equal(np.asarray(auto), np.asarray(ref))
    else:
        np.testing.assert_array_equal(np.asarray(auto), 7.0)
