"""The int8 (Q8_0) LM head: its exact-grid detection, the CPU kernel and the model's use of it.

Tolerance of the kernel against a float64 reference: each output is a float32 sum of D products
in a fixed order with about D / 8 + D / 32 + 3 sequential roundings per lane path (four per
group of 32, one per group into the accumulator, three in the lane tree); for D = 576 that is
under 100 steps of at most 2^-24 relative to the running sum of |x * w|, so
|out - ref| <= 1e-5 * sum_d |x_d w_vd| holds with margin (measured: about 1e-7 of the same sum).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cpu_kernels, dispatch
from qspec_jax.model.llama import lm_head
from qspec_jax.model.params import attach_q8_head, float_head
from qspec_jax.quant.format import Q8Head, q8_head_from_float

needs_kernels = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}",
)

V, D = 1000, 576
_q8 = jax.jit(cpu_kernels.q8_matmul_cpu)


def _grid_head(seed=0, v=V, d=D):
    """A float32 [V, D] head on the Q8_0 grid (fp16 scales, largest code +-127), with its codes."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(-127, 128, (v, d)).astype(np.int8)
    codes[:, ::32] = 127 * rng.choice([-1, 1], (v, d // 32))  # each group reaches +-127
    codes[3, 64:96] = 0  # an all-zero group
    codes[3, 64] = 0
    scales = (rng.random((v, d // 32)) * 0.02 + 1e-3).astype(np.float16).astype(np.float32)
    scales[3, 2] = 0.0
    w = codes.astype(np.float32) * np.repeat(scales, 32, axis=1)
    return w, codes, scales


def _check_close(out, x, codes, scales):
    w = codes.astype(np.float64) * np.repeat(scales.astype(np.float64), 32, axis=1)  # [V, D]
    x64 = np.asarray(x, np.float64)
    ref = x64 @ w.T
    bound = 1e-5 * (np.abs(x64) @ np.abs(w).T)
    assert np.all(np.abs(np.asarray(out, np.float64) - ref) <= bound + 1e-30)


def test_detection_recovers_the_exact_codes():
    w, codes, scales = _grid_head()
    head = q8_head_from_float(w)
    assert head is not None
    np.testing.assert_array_equal(
        np.asarray(head.codes)[np.asarray(head.scales).repeat(32, 1) > 0],
        codes[scales.repeat(32, 1) > 0],
    )
    np.testing.assert_array_equal(np.asarray(head.dequantize()), w)  # the same weights, bit for bit


@pytest.mark.parametrize(
    "change",
    ["scaled", "one_value", "not_float32", "d_not_multiple_of_32"],
)
def test_detection_rejects_anything_off_the_grid(change):
    w, _, _ = _grid_head()
    if change == "scaled":  # e.g. a rotated / re-quantized head
        w = w * np.float32(1.0001)
    elif change == "one_value":  # one value off the grid, past the probed rows
        w = w.copy()
        w[900, 5] = np.nextafter(w[900, 5], np.float32(1))
    elif change == "not_float32":
        w = w.astype(np.float64)
    else:
        w = w[:, :560]
    assert q8_head_from_float(w) is None


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 8])
def test_kernel_matches_reference(m):
    _, codes, scales = _grid_head(m)
    x = np.random.default_rng(10 + m).standard_normal((m, D)).astype(np.float32)
    _check_close(_q8(x, codes, scales), x, codes, scales)
    xla = jax.jit(dispatch.q8_matmul_xla)(x, codes, scales)  # the XLA reference, same bound
    _check_close(xla, x, codes, scales)


@needs_kernels
@pytest.mark.parametrize("m", [2, 4, 5, 9])
def test_rows_are_independent(m):
    """Row i of an M-row call equals the same row alone, bit for bit (one-row and many-row paths)."""
    _, codes, scales = _grid_head(1)
    x = jax.random.normal(jax.random.key(m), (m, D))  # [M, D]
    y = np.asarray(_q8(x, codes, scales))  # [M, V]
    for i in range(m):
        np.testing.assert_array_equal(y[i], np.asarray(_q8(x[i : i + 1], codes, scales))[0])


@needs_kernels
def test_identical_calls_give_identical_results():
    _, codes, scales = _grid_head(2, v=8192)  # enough columns to spread over the thread pool
    x = jax.random.normal(jax.random.key(7), (8, D))
    first = np.asarray(_q8(x, codes, scales))
    for _ in range(40):
        np.testing.assert_array_equal(np.asarray(_q8(x, codes, scales)), first)


@needs_kernels
def test_lm_head_uses_the_kernel_and_keeps_the_weights(tiny_params):
    d = tiny_params.embed.shape[1]
    w, _, _ = _grid_head(3, v=tiny_params.embed.shape[0], d=d)
    params = attach_q8_head(tiny_params.replace(embed=jnp.asarray(w), lm_head=None))
    assert isinstance(params.head_q8, Q8Head)
    x = jax.random.normal(jax.random.key(3), (2, 3, d))  # [batch, t, D]
    hlo = jax.jit(lambda p, x: lm_head(p, x, "cpu")).lower(params, x).as_text()
    assert "qspec_q8_head" in hlo
    out = np.asarray(lm_head(params, x, "cpu"))  # [batch, t, V]
    xla = np.asarray(lm_head(params, x, "xla"))  # float head, XLA's dot
    _check_close(out.reshape(-1, w.shape[0]), np.asarray(x).reshape(-1, d), *_codes(params))
    np.testing.assert_allclose(out, xla, rtol=0, atol=1e-5 * float(np.abs(xla).max()))


def _codes(params):
    return np.asarray(params.head_q8.codes), np.asarray(params.head_q8.scales)


def test_float_heads_off_the_grid_keep_the_float_path(tiny_params):
    assert attach_q8_head(tiny_params).head_q8 is None  # random init is not on the grid


def test_real_model_head_is_the_gguf_q8_0_head(smollm2_fp):
    """The shipped GGUF stores the tied embedding as Q8_0: the engine finds its exact codes."""
    head = smollm2_fp.params.head_q8
    assert head is not None and head.codes.shape == (49152, 576)
    np.testing.assert_array_equal(
        np.asarray(head.dequantize()), np.asarray(float_head(smollm2_fp.params).T)
    )


# ------------------------------------------------------------------ bfloat16 and the float head
# bfloat16 activations are converted to float32 at the call boundary (exact), so the kernels'
# bfloat16 results are their float32 results on the converted values, bit for bit. The float
# head kernel (`cpu_kernels.float_head_cpu`, the "float_matmul" op: the LM head of a model
# without Q8_0 codes) reads float32 or bfloat16 weights; per output it is D float32 FMAs in
# order from 0, so against a float64 reference of the same (converted) values the worst case is
# |out - ref| <= D * 2^-24 * sum_d |x_d w_dv| (3.4e-5 of that sum for D = 576), and independent
# roundings grow like sqrt(D) * 2^-24 (1.4e-6); we assert 1e-5 of it, as for the Q8_0 kernel
# (measured about 1e-7).

_fhead = jax.jit(cpu_kernels.float_head_cpu)


@needs_kernels
@pytest.mark.parametrize("m", [1, 4, 6])
def test_q8_kernel_takes_bfloat16_activations(m):
    _, codes, scales = _grid_head(4)
    x = jax.random.normal(jax.random.key(m), (m, D)).astype(jnp.bfloat16)
    got = np.asarray(_q8(x, codes, scales))
    np.testing.assert_array_equal(got, np.asarray(_q8(x.astype(jnp.float32), codes, scales)))


@needs_kernels
@pytest.mark.parametrize("wdtype", [jnp.float32, jnp.bfloat16])
def test_float_head_matches_reference_and_rows_are_independent(wdtype):
    v = 1008  # a multiple of 16 spread over the thread pool
    w = (0.05 * jax.random.normal(jax.random.key(5), (D, v))).astype(wdtype)  # [D, V]
    x = jax.random.normal(jax.random.key(6), (6, D)).astype(wdtype)  # [M, D]
    full = np.asarray(_fhead(x, w))  # [M, V] float32
    for i in range(6):
        np.testing.assert_array_equal(full[i], np.asarray(_fhead(x[i : i + 1], w))[0])
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    bound = 1e-5 * (np.abs(x64) @ np.abs(w64))
    assert np.all(np.abs(full - x64 @ w64) <= bound + 1e-30)
    if wdtype == jnp.bfloat16:  # bfloat16 weights: the float32 kernel on the converted values
        up = _fhead(x.astype(jnp.float32), w.astype(jnp.float32))
        np.testing.assert_array_equal(full, np.asarray(up))


@needs_kernels
def test_float_lm_head_takes_the_kernel_in_bfloat16(tiny_params):
    """A head off the Q8_0 grid (random init) runs the float head kernel on CPU in bfloat16
    (auto) and in float32 when impl is "cpu"; float32 under auto and forced "xla" keep XLA's dot;
    uncovered shapes fall back."""
    p16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), tiny_params)
    d = tiny_params.embed.shape[1]

    def hlo(params, x, impl):
        return jax.jit(lambda p, x: lm_head(p, x, impl)).lower(params, x).as_text()

    for params, dt, auto_kernel in ((tiny_params, jnp.float32, False), (p16, jnp.bfloat16, True)):
        x = jax.random.normal(jax.random.key(8), (2, 3, d)).astype(dt)  # [batch, t, D]
        assert ("qspec_float_head" in hlo(params, x, None)) == auto_kernel
        assert "qspec_float_head" in hlo(params, x, "cpu")
        assert "qspec_float_head" not in hlo(params, x, "xla")
        out = np.asarray(lm_head(params, x, "cpu"))
        xla = np.asarray(lm_head(params, x, "xla"))
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, xla, rtol=0, atol=1e-5 * float(np.abs(xla).max()))
    with pytest.raises(NotImplementedError, match="multiple of 16"):
        cpu_kernels.float_head_cpu(jnp.ones((1, 8)), jnp.ones((8, 20)))
    out = dispatch.float_matmul(jnp.ones((1, 8), jnp.bfloat16), jnp.ones((8, 20), jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(out), np.full((1, 20), 8.0, np.float32))  # XLA
