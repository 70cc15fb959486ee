"""Decode-time attention over the float KV cache on the CPU kernel (`cpu_kernels.attention_cpu`).

Tolerance against a float64 reference of the same function: the kernel's float32 steps are a
D-term dot per score, a polynomial exp with relative error about 2e-7, a sum of at most S
weights and an S-term weighted sum, so |out - ref| <= 2e-5 * max|v| + 1e-6 covers S <= 300
keys with margin (each weighted value's rounding is relative to max|v|, and the softmax weights
sum to one); measured about 1e-6 of max|v|.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import cpu_kernels, dispatch
from qspec_jax.model.attention import attention, dense_attention

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}",
)

_attn = jax.jit(cpu_kernels.attention_cpu)


def _inputs(seed, b=2, t=4, h=9, kvh=3, d=64, s=200):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, d)) * 2.0  # [B, T, H, D]
    k = jax.random.normal(ks[1], (b, s, kvh, d))  # [B, S, KVH, D]
    v = jax.random.normal(ks[2], (b, s, kvh, d))
    return q, k, v


def _reference(q, k, v, pos):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for ti in range(t):
            n = min(int(pos[bi, ti]) + 1, k.shape[1])
            for hi in range(h):
                sc = k[bi, :n, hi // g] @ q[bi, ti, hi] / math.sqrt(d)
                p = np.exp(sc - sc.max())
                out[bi, ti, hi] = (p / p.sum()) @ v[bi, :n, hi // g]
    return out.reshape(b, t, h * d)


@pytest.mark.parametrize("t", [1, 4])
def test_matches_reference(t):
    q, k, v = _inputs(t, t=t)
    pos = jnp.array([[5 + i for i in range(t)], [190 + i for i in range(t)]], jnp.int32)
    out = np.asarray(_attn(q, k, v, pos))
    atol = 2e-5 * float(jnp.abs(v).max()) + 1e-6
    np.testing.assert_allclose(out, _reference(q, k, v, pos), rtol=0, atol=atol)


def test_positions_past_capacity_see_every_key_and_position_zero_sees_one():
    q, k, v = _inputs(3, b=1, t=2, s=40)
    pos = jnp.array([[0, 1000]], jnp.int32)
    out = np.asarray(_attn(q, k, v, pos))
    np.testing.assert_allclose(out, _reference(q, k, v, pos), rtol=0, atol=1e-4)
    # position 0 sees only key 0: the output is v_0 exactly up to the division by 1
    np.testing.assert_allclose(out[0, 0, :64], np.asarray(v[0, 0, 0]), rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rows_are_independent_bit_for_bit(dtype):
    """A query row's output does not depend on the other rows or sequences in the call."""
    q, k, v = _inputs(4, b=3, t=6) if dtype == "float32" else _bf16(*_inputs(9, b=3, t=6))
    pos = jnp.array([[10, 11, 12, 13, 14, 15], [100] * 6, [150, 151, 152, 153, 154, 155]])
    pos = pos.astype(jnp.int32)
    full = np.asarray(_attn(q, k, v, pos))
    for bi in range(3):
        for ti in range(6):
            one = _attn(q[bi : bi + 1, ti : ti + 1], k[bi : bi + 1], v[bi : bi + 1],
                        pos[bi : bi + 1, ti : ti + 1])  # fmt: skip
            np.testing.assert_array_equal(full[bi, ti], np.asarray(one)[0, 0])


def test_identical_calls_give_identical_results():
    q, k, v = _inputs(5, b=4, t=4)
    pos = jnp.full((4, 4), 150, jnp.int32)
    first = np.asarray(_attn(q, k, v, pos))
    for _ in range(40):
        np.testing.assert_array_equal(np.asarray(_attn(q, k, v, pos)), first)


def test_model_attention_dispatch():
    """Decode-sized calls take the kernel, prompt-sized calls and tree masks XLA's dense path."""
    q, k, v = _inputs(6, b=1, t=4)
    pos = jnp.arange(4, dtype=jnp.int32)[None] + 50

    def hlo(t, mask=None):
        qq = jnp.zeros((1, t, 9, 64))
        pp = jnp.arange(t, dtype=jnp.int32)[None]
        return jax.jit(lambda a: attention(a, k[:1], v[:1], pp, mask)).lower(qq).as_text()

    assert "qspec_attention_f32" in hlo(4)
    assert "qspec_attention_f32" not in hlo(dispatch.DECODE_QUERY_ROWS + 1)
    assert "qspec_attention_f32" not in hlo(4, mask=jnp.ones((1, 4, k.shape[1]), bool))
    np.testing.assert_allclose(
        np.asarray(attention(q, k[:1], v[:1], pos)),
        np.asarray(dense_attention(q, k[:1], v[:1], pos)),
        rtol=0,
        atol=1e-5 * float(jnp.abs(v).max()),
    )


# --------------------------------------------------------------------------------- bfloat16
# The kernel reads a bfloat16 cache directly and converts it to float32 in registers (exact), and
# cpu_kernels.attention_cpu converts bfloat16 queries at the boundary (exact), so a bfloat16 call
# returns exactly the float32 kernel's output on the converted inputs: checked bit for bit. The
# float32 kernel's accuracy is checked above, so nothing more is needed for the kernel itself.
# Against the model's dense bfloat16 path, which rounds the softmax weights to bfloat16 before
# the value sum (relative 2^-9 each, so at most 2^-9 max|v| on the convex combination) and its
# output to bfloat16 (2^-9 |out| <= 2^-9 max|v|), with the kernel's output rounded to bfloat16 too
# (another 2^-9 max|v|): |kernel - dense| <= 3 * 2^-9 max|v| < 2^-7 max|v| (the registry's
# bfloat16 attention bound); measured about 1.7e-3 max|v| (0.4 * 2^-8).


def _bf16(*arrays):
    return tuple(a.astype(jnp.bfloat16) for a in arrays)


@pytest.mark.parametrize("t", [1, 4])
def test_bfloat16_is_the_float32_kernel_on_the_converted_values(t):
    q, k, v = _bf16(*_inputs(7 + t, t=t))
    pos = jnp.array([[5 + i for i in range(t)], [190 + i for i in range(t)]], jnp.int32)
    got = np.asarray(_attn(q, k, v, pos))
    up = np.asarray(_attn(*(a.astype(jnp.float32) for a in (q, k, v)), pos))
    np.testing.assert_array_equal(got, up)
    dense = np.asarray(dense_attention(q, k, v, pos), np.float32)
    atol = 2.0**-7 * float(jnp.abs(v.astype(jnp.float32)).max())
    rounded = np.asarray(jnp.asarray(got).astype(jnp.bfloat16), np.float32)
    np.testing.assert_allclose(rounded, dense, rtol=0, atol=atol)


def test_bfloat16_model_attention_takes_the_kernel_and_other_dtypes_refuse():
    q, k, v = _bf16(*_inputs(6, b=1, t=4))
    pp = jnp.arange(4, dtype=jnp.int32)[None] + 50
    hlo = jax.jit(lambda a: attention(a, k, v, pp)).lower(q).as_text()
    assert "qspec_attention_f32" in hlo
    out = attention(q, k, v, pp)
    assert out.dtype == jnp.bfloat16
    ref = _attn(q, k, v, pp).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    with pytest.raises(NotImplementedError, match="float32 or bfloat16"):
        cpu_kernels.attention_cpu(q, k.astype(jnp.float16), v.astype(jnp.float16), pp)
    with pytest.raises(NotImplementedError, match="float32 or bfloat16"):
        cpu_kernels.attention_cpu(q, k, v.astype(jnp.float32), pp)
