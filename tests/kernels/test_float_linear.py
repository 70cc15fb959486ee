"""The float linear CPU kernel (`cpu_kernels.float_linear_cpu`, the registry's "float_linear" op,
precision "fp"'s matmul in `qspec_jax.model.linear.linear`).

Bounds: per output the kernel computes K float32 FMAs in order from 0 on the (exactly converted)
float32 values, so against a float64 reference of the same values the worst case is
|out - ref| <= K * 2^-24 * sum_k |x_k w_kn| (about 6e-8 K of that sum); independent roundings
grow like sqrt(K) * 2^-24. We assert 1e-5 of the sum for K <= 100 (the worst case is 6e-6 for
K = 100), as for the float head kernel (tests/kernels/test_q8_head.py). Against XLA's dot (another
summation order) the same bound applies to the difference of the two, twice.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cpu_kernels, dispatch, registry

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}",
)

K, N = 42, 80  # K not a multiple of the kernel's 4-row groups; N = 5 tiles of 16
_lin = jax.jit(cpu_kernels.float_linear_cpu)


def _case(wdtype, m, seed=0):
    w = (0.2 * jax.random.normal(jax.random.key(seed), (K, N))).astype(wdtype)  # [K, N]
    x = jax.random.normal(jax.random.key(seed + 1), (m, K)).astype(wdtype)  # [M, K]
    return x, w


@needs_kernels
@pytest.mark.parametrize("wdtype", [jnp.float32, jnp.bfloat16])
def test_rows_independent_and_within_bound(wdtype):
    """Each row's result is bit-identical whatever rows share the call (1..9 rows, every split
    of the row blocks), and within 1e-5 * sum |x w| of the float64 reference."""
    x, w = _case(wdtype, 9)
    full = np.asarray(_lin(x, w))  # [9, N] float32
    for m in (1, 2, 3, 4, 5, 7):
        for i0 in (0, 9 - m):
            part = np.asarray(_lin(x[i0 : i0 + m], w))  # [m, N]
            np.testing.assert_array_equal(part, full[i0 : i0 + m])
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    bound = 1e-5 * (np.abs(x64) @ np.abs(w64))
    assert np.all(np.abs(full - x64 @ w64) <= bound + 1e-30)
    ref = np.asarray(dispatch.float_matmul_xla(x, w))  # XLA's dot, float32 accumulation
    assert np.all(np.abs(full - ref) <= 2 * bound + 1e-30)
    if wdtype == jnp.bfloat16:  # the float32 kernel on the converted values, bit for bit
        up = _lin(x.astype(jnp.float32), w.astype(jnp.float32))
        np.testing.assert_array_equal(full, np.asarray(up))


@needs_kernels
def test_float_linear_op_selection():
    """Auto: the kernel for decode-time rows on CPU (x.dtype out), XLA's dot for a prefill's
    many rows per sequence and for forced "xla"; forced "cpu" on an uncovered shape runs XLA."""
    x, w = _case(jnp.float32, 3)
    x3 = x[None]  # [batch 1, t 3, K]

    def hlo(x, w, impl):
        return jax.jit(lambda x, w: dispatch.float_linear(x, w, impl=impl)).lower(x, w).as_text()

    assert "qspec_float_linear" in hlo(x3, w, None)
    assert "qspec_float_linear" not in hlo(x3, w, "xla")
    many = jnp.zeros((1, dispatch.DECODE_QUERY_ROWS + 1, K), jnp.float32)  # a prefill
    assert "qspec_float_linear" not in hlo(many, w, None)
    assert "qspec_float_linear" in hlo(many, w, "cpu")
    assert registry.auto_name("float_linear", x3, w) == "cpu"
    out = dispatch.float_linear(x3, w)  # [1, 3, N]
    np.testing.assert_array_equal(np.asarray(out)[0], np.asarray(_lin(x, w)))
    x16, w16 = _case(jnp.bfloat16, 2)
    out16 = dispatch.float_linear(x16, w16)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(out16), np.asarray(_lin(x16, w16).astype(jnp.bfloat16))
    )
    odd = jnp.ones((8, 20), jnp.float32)  # N not a multiple of 16
    with pytest.raises(NotImplementedError, match="multiple of 16"):
        cpu_kernels.float_linear_cpu(jnp.ones((1, 8)), odd)
    got = dispatch.float_linear(jnp.ones((1, 8)), odd, impl="cpu")  # forced: runs XLA's dot
    np.testing.assert_array_equal(np.asarray(got), np.full((1, 20), 8.0, np.float32))
