"""Property tests (hypothesis): int4 pack/unpack round trip, activation-quantization error bound."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import dispatch, int4

# Jitted once per shape (eager op-by-op dispatch would compile every primitive per shape).
pack_int4 = jax.jit(int4.pack_int4)
unpack_int4 = jax.jit(int4.unpack_int4, static_argnames=("signed",))
dequantize_int4 = jax.jit(int4.dequantize_int4)


@settings(max_examples=40, deadline=None)
@given(
    tiles=st.integers(1, 3),
    n=st.sampled_from([1, 5, 16]),
    signed=st.booleans(),
    lead=st.sampled_from([(), (2,)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(tiles, n, signed, lead, seed):
    k = 64 * tiles
    rng = np.random.default_rng(seed)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = rng.integers(lo, hi, size=(*lead, k, n)).astype(np.int8)
    packed = pack_int4(jnp.asarray(codes))
    assert packed.dtype == jnp.uint8 and packed.shape == (*lead, k // 2, n)
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed, signed=signed)), codes)
    # Layout: byte (t*32 + r) holds rows t*64 + r (low nibble) and t*64 + 32 + r (high nibble).
    p = np.asarray(packed).reshape(*lead, tiles, 32, n)
    c = codes.reshape(*lead, tiles, 2, 32, n).astype(np.int32) & 0xF
    np.testing.assert_array_equal(p, (c[..., 0, :, :] | (c[..., 1, :, :] << 4)).astype(np.uint8))


@settings(max_examples=20, deadline=None)
@given(tiles=st.integers(1, 2), g=st.sampled_from([32, 64]), seed=st.integers(0, 2**31 - 1))
def test_dequantize_matches_definition(tiles, g, seed):
    k, n = 64 * tiles, 5
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, size=(k, n))
    scales = rng.uniform(0.01, 0.1, size=(k // g, n)).astype(np.float32)
    mins = rng.normal(size=(k // g, n)).astype(np.float32)
    w = dequantize_int4(pack_int4(jnp.asarray(codes)), jnp.asarray(scales), jnp.asarray(mins))
    expect = codes * np.repeat(scales, g, 0) + np.repeat(mins, g, 0)
    np.testing.assert_allclose(np.asarray(w), expect, rtol=1e-6, atol=1e-6)


# Fixed shapes keep one compilation per (impl, bits, group, clip); hypothesis draws the data.
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-6.0, 6.0),
    bits=st.sampled_from([4, 8]),
    group_size=st.sampled_from([0, 32, 64]),
    clip=st.sampled_from([1.0, 0.85]),
    impl=st.sampled_from(["xla", "pallas_interpret"]),
)
def test_act_quant_error_bound(seed, log_scale, bits, group_size, clip, impl):
    m, k = 4, 192
    x = jax.random.normal(jax.random.key(seed), (m, k)) * jnp.float32(10.0**log_scale)
    x = x * jax.random.uniform(jax.random.key(seed + 1), (m, 1), minval=0.0, maxval=2.0)
    codes, scales = dispatch.quantize_activations(
        x, bits=bits, group_size=group_size, clip_ratio=clip, impl=impl
    )
    qmax = 2 ** (bits - 1) - 1
    ga = group_size or k
    xs = np.asarray(x, np.float64)
    c = np.asarray(codes, np.int64)
    s = np.repeat(np.asarray(scales, np.float64), ga, axis=1)  # [M, K]
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    assert c.min() >= -qmax - 1 and c.max() <= qmax
    amax = np.repeat(np.abs(xs).reshape(m, k // ga, ga).max(-1), ga, axis=1)  # [M, K]
    inside = np.abs(xs) <= clip * amax  # within the clip range
    err = np.abs(xs - c * s)
    # scale / 2 from rounding, plus float32 rounding of x / scale (a few ulps of |x|).
    assert np.all(err[inside] <= s[inside] / 2 + 4e-7 * np.abs(xs[inside]) + 1e-30)
    # Outside the clip range the code saturates at the boundary.
    outside = ~inside
    assert np.all(np.abs(c[outside]) >= qmax)
