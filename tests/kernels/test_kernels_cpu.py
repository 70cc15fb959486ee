"""The int4 matmuls' CPU kernels (`pallas_kernels.cpu_kernels`, the "cpu" impl).

The shared bases check them against the references with the bases' stated bounds (float32:
accumulation order only; W4AX: exact int32 blocks, float32 epilogue). On top: the property the
decode loop relies on (a row's result does not depend on the other rows of the call, bit for
bit: QSpec's gamma + 1 verification rows against autoregressive decoding's one), dispatch's
choice, and the clear failures when the kernels cannot be built.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_test_base import W4A16Base, W4AXBase, random_activation_codes, random_weight

from pallas_kernels import cpu_kernels, dispatch

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}",
)


class TestW4A16Cpu(W4A16Base):
    IMPL = "cpu"


class TestW4AXCpu(W4AXBase):
    IMPL = "cpu"


_w4a16 = jax.jit(cpu_kernels.w4a16_matmul_cpu)
_w4ax = jax.jit(cpu_kernels.w4ax_matmul_cpu)


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("m", [2, 4, 5, 8, 17])
def test_rows_are_independent_w4a16(m, asym):
    """Row i of an M-row call equals the same row computed alone, bit for bit."""
    k, n = 576, 960
    packed, scales, mins = random_weight(jax.random.key(m), k, n, 32 if asym else 64, asym)
    x = jax.random.normal(jax.random.key(100 + m), (m, k))  # [M, K]
    y = np.asarray(_w4a16(x, packed, scales, mins))  # [M, N]
    for i in range(m):
        np.testing.assert_array_equal(
            y[i], np.asarray(_w4a16(x[i : i + 1], packed, scales, mins))[0]
        )


@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("m", [3, 8])
def test_rows_are_independent_w4ax(m, asym):
    k, n = 1536, 576
    packed, scales, mins = random_weight(jax.random.key(m), k, n, 32, asym)
    a, sa = random_activation_codes(jax.random.key(200 + m), m, k, 8, 32)
    y = np.asarray(_w4ax(a, sa, packed, scales, mins))  # [M, N]
    for i in range(m):
        one = _w4ax(a[i : i + 1], sa[i : i + 1], packed, scales, mins)
        np.testing.assert_array_equal(y[i], np.asarray(one)[0])


def test_w4ax_integer_part_is_exact():
    """Per-channel weights, per-token activations: one int32 block over all of K, so the
    result is float(int32 dot) * sa * sw exactly (the float epilogue's two products only)."""
    m, k, n = 3, 1536, 576
    a, sa = random_activation_codes(jax.random.key(7), m, k, 8, 0)
    packed, scales, _ = random_weight(jax.random.key(8), k, n, 0, False)
    from pallas_kernels.int4 import unpack_int4

    codes = np.asarray(unpack_int4(packed, signed=True), np.int64)  # [K, N]
    dot = np.asarray(a, np.int64) @ codes  # exact
    want = (dot.astype(np.float32) * np.asarray(sa, np.float32)) * np.asarray(scales, np.float32)
    np.testing.assert_array_equal(np.asarray(_w4ax(a, sa, packed, scales)), want)


def test_auto_picks_cpu_kernels_at_any_row_count_but_prefill_keeps_xla():
    packed, scales, mins = random_weight(jax.random.key(9), 576, 960, 32, True)

    def custom_calls(m, impl=None):
        x = jnp.ones((m, 576))
        fn = jax.jit(lambda x: dispatch.w4a16_matmul(x, packed, scales, mins, impl=impl))
        return fn.lower(x).as_text().count("qspec_w4a16_int4")

    assert dispatch.default_impl() == "cpu"
    assert custom_calls(1) == 1 and custom_calls(300) == 1  # decode / verify of any width
    assert dispatch.prefill_impl(None) == "xla" and custom_calls(300, "xla") == 0
    assert dispatch.prefill_impl("cpu") == "cpu"  # an explicit choice is kept


def test_unsupported_shape_falls_back_under_auto():
    # N = 36 is not a multiple of 8 columns: "cpu" refuses it, auto runs the XLA path.
    packed, scales, mins = random_weight(jax.random.key(10), 128, 36, 64, True)
    x = jax.random.normal(jax.random.key(11), (3, 128))
    with pytest.raises(NotImplementedError, match="multiple of 8"):
        dispatch.w4a16_matmul(x, packed, scales, mins, impl="cpu")
    y = dispatch.w4a16_matmul(x, packed, scales, mins)
    np.testing.assert_array_equal(
        np.asarray(y), np.asarray(dispatch.w4a16_matmul(x, packed, scales, mins, impl="xla"))
    )


def test_switched_off_and_build_failure_say_why(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert cpu_kernels.unavailable_reason() == f"turned off by {cpu_kernels.ENV_SWITCH}"
    assert not cpu_kernels.available()
    with pytest.raises(NotImplementedError, match="turned off"):
        cpu_kernels.w4a16_matmul_cpu(
            jnp.ones((1, 64)), *random_weight(jax.random.key(1), 64, 8, 32, True)
        )

    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1")
    monkeypatch.setenv("QSPEC_JAX_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CXX", "/bin/false")
    reason = cpu_kernels.unavailable_reason()
    assert reason.startswith("building / loading the CPU kernels failed")
    assert not list((tmp_path / "cpu-kernels").glob("*.so"))  # no partial library left


@pytest.mark.parametrize("kernel", ["w4a16", "w4ax"])
def test_identical_calls_give_identical_results(kernel):
    """Spread over XLA's thread pool, every chunk must round the same way on every thread.

    Regression: built with g++'s default floating-point contraction, the W4AX epilogue was
    fused into FMAs differently in the calling thread's and the pool's inlined copies, and about
    one call in four returned other float32 roundings (now built with -ffp-contract=off).
    """
    m, k, n = 8, 1536, 576
    packed, scales, mins = random_weight(jax.random.key(41), k, n, 32, True)
    if kernel == "w4a16":
        x = jax.random.normal(jax.random.key(42), (m, k))
        call = lambda: _w4a16(x, packed, scales, mins)  # noqa: E731
    else:
        a, sa = random_activation_codes(jax.random.key(43), m, k, 8, 32)
        call = lambda: _w4ax(a, sa, packed, scales, mins)  # noqa: E731
    first = np.asarray(call())
    for _ in range(40):
        np.testing.assert_array_equal(np.asarray(call()), first)


_W4AX_ISA_CASES = [  # (m, k, n, g, ga, bits, asym): every MB tail, both code kinds, c = 96
    (1, 576, 960, 32, 32, 8, True),
    (3, 1536, 576, 64, 32, 4, False),
    (8, 576, 3072, 32, 0, 8, True),
    (5, 576, 1536, 96, 192, 4, True),
    (2, 1536, 576, 0, 128, 8, False),
]


@pytest.mark.skipif(not cpu_kernels.has_vnni(), reason="this CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("m,k,n,g,ga,bits,asym", _W4AX_ISA_CASES)
def test_w4ax_vnni_equals_avx2(m, k, n, g, ga, bits, asym):
    """The two builds of the W4AX body sum the same exact int32 blocks and run the same float
    epilogue, so they agree bit for bit (the AVX2 one is what a CPU without VNNI runs)."""
    a, sa = random_activation_codes(jax.random.key(m + k), m, k, bits, ga)
    packed, scales, mins = random_weight(jax.random.key(n + g), k, n, g, asym)
    auto = jax.jit(lambda *x: cpu_kernels.w4ax_matmul_cpu(*x, isa="auto"))
    avx2 = jax.jit(lambda *x: cpu_kernels.w4ax_matmul_cpu(*x, isa="avx2"))
    np.testing.assert_array_equal(
        np.asarray(auto(a, sa, packed, scales, mins)), np.asarray(avx2(a, sa, packed, scales, mins))
    )


@pytest.mark.parametrize("isa", ["auto", "avx2"])
@pytest.mark.parametrize(
    "m,k,n,g,ga,bits,clip,asym",
    [
        (1, 576, 960, 32, 32, 8, 1.0, True),
        (3, 1536, 576, 64, 32, 4, 0.9, False),
        (4, 576, 3072, 32, 0, 4, 1.0, True),
        (5, 576, 1536, 96, 192, 8, 0.85, True),
    ],
)
def test_fused_quantize_matmul_equals_the_two_steps(isa, m, k, n, g, ga, bits, clip, asym):
    """quantize_w4ax_matmul_cpu == XLA's activation quantization then the W4AX kernel, bit for
    bit: the same scales (one float32 product), the same IEEE division and round-half-even, so
    the same codes, then the same kernel body. Rows with large magnitudes exercise the clip, an
    all-zero group the scale-1 branch."""
    from pallas_kernels import act_quant

    x = jax.random.normal(jax.random.key(m), (m, k)) * jnp.exp(
        2 * jax.random.normal(jax.random.key(m + 1), (m, 1))
    )  # [M, K]
    x = x.at[0, : (ga or k)].set(0.0)
    packed, scales, mins = random_weight(jax.random.key(k + n), k, n, g, asym)
    fused = jax.jit(
        lambda x, p, s, mn: cpu_kernels.quantize_w4ax_matmul_cpu(
            x, p, s, mn, bits=bits, group_size=ga, clip_ratio=clip, isa=isa
        )
    )(x, packed, scales, mins)
    codes, sa = act_quant.quantize_activations_xla(x, bits=bits, group_size=ga, clip_ratio=clip)
    two = _w4ax(codes, sa, packed, scales, mins)
    np.testing.assert_array_equal(np.asarray(fused), np.asarray(two))


def test_fused_quantize_matmul_dispatch_and_fallback():
    """Auto on CPU runs the fused kernel (one custom call, no XLA quantization); a width the
    kernel cannot take (N = 48, not a multiple of 32) raises under impl="cpu" and falls back to
    XLA's quantization and matmul under auto."""
    x = jax.random.normal(jax.random.key(6), (2, 576))

    def call(n, impl=None):
        packed, scales, mins = random_weight(jax.random.key(5), 576, n, 32, True)
        return lambda x: dispatch.quantize_w4ax_matmul(
            x, packed, scales, mins, bits=8, group_size=32, impl=impl
        )

    text = jax.jit(call(960)).lower(x).as_text()
    assert text.count("qspec_w4ax_f32_int4") == 1 and "qspec_w4ax_int4" not in text
    with pytest.raises(NotImplementedError, match="multiple of 32"):
        call(48, "cpu")(x)
    np.testing.assert_array_equal(np.asarray(call(48)(x)), np.asarray(call(48, "xla")(x)))


# --------------------------------------------------------------------------------- bfloat16
# bfloat16 activations are converted to float32 at the call boundary (XLA's convert: exact) and
# the float32 result is rounded once to bfloat16 (round to nearest even), elementwise: so a
# bfloat16 call is the float32 kernel on the converted values, rounded, bit for bit, and its rows
# stay independent. (Converting inside the kernel instead would save a [M, K] float32 copy of a
# few KB per decode call; docs/kernels.md, "bfloat16", measures the boundary's cost.)


@pytest.mark.parametrize("m", [1, 5])
def test_w4a16_bfloat16_is_the_float32_kernel_rounded(m):
    k, n = 576, 960
    packed, scales, mins = random_weight(jax.random.key(50 + m), k, n, 32, True)
    x = jax.random.normal(jax.random.key(60 + m), (m, k)).astype(jnp.bfloat16)
    got = _w4a16(x, packed, scales, mins)
    assert got.dtype == jnp.bfloat16
    want = _w4a16(x.astype(jnp.float32), packed, scales, mins).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    for i in range(m):
        one = _w4a16(x[i : i + 1], packed, scales, mins)
        np.testing.assert_array_equal(
            np.asarray(got[i], np.float32), np.asarray(one[0], np.float32)
        )


@pytest.mark.parametrize("bits", [4, 8])
def test_fused_w4ax_bfloat16_is_the_float32_kernel_rounded(bits):
    m, k, n = 3, 576, 960
    packed, scales, mins = random_weight(jax.random.key(70 + bits), k, n, 32, False)
    x = jax.random.normal(jax.random.key(80 + bits), (m, k)).astype(jnp.bfloat16)
    fused = jax.jit(
        cpu_kernels.quantize_w4ax_matmul_cpu, static_argnames=("bits", "group_size", "out_dtype")
    )
    got = fused(x, packed, scales, mins, bits=bits, group_size=32, out_dtype=jnp.bfloat16)
    want = fused(x.astype(jnp.float32), packed, scales, mins, bits=bits, group_size=32)
    np.testing.assert_array_equal(
        np.asarray(got, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32)
    )
