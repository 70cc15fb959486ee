"""Property tests of the hierarchical (QuantSpec) KV format: round-trip error bounds of the int4
and int8 views, and the flush / rollback invariants of `HierKVCache`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qspec_jax.cache import HierKVCache, KVCache, make_cache
from qspec_jax.cache.hierarchical import (
    HierLayout,
    dequantize,
    dequantize_layer,
    float_start,
    pack_nibbles,
    quantize,
    rollback,
    split_codes,
    unpack_nibbles,
)
from qspec_jax.config import preset

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23
CFG = preset("tiny").replace(num_layers=2, num_kv_heads=2, head_dim=8)


def _float_slack(x: np.ndarray) -> np.ndarray:
    """Float32 rounding allowance of one dequantized value, per group (keepdims).

    Exact arithmetic gives the bounds below; in float32, scale = (max - min) / 15, the code's
    division, the product code * scale / 16 and the final addition of min each round once, by at
    most half an ulp of a quantity of magnitude <= 2 max|x| (the code is exact: an integer <= 240
    and round() of the quotient is exact). Four such roundings, each <= EPS32 * 2 max|x| / 2,
    plus one ulp of the comparison: 8 * EPS32 * max|x| covers them.
    """
    return 8 * EPS32 * np.max(np.abs(x), axis=-1, keepdims=True)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(1, 6),
    size=st.integers(1, 130),
    log_range=st.floats(-6, 6),
    offset=st.floats(-100, 100),
)
def test_round_trip_bounds_of_upper_and_combined_halves(seed, groups, size, log_range, offset):
    """Round-trip error of the int4 (upper) view and of the int8 (both halves) view.

    Derivation, per group with scale s = (max - min) / 15 and step s / 16 (exact arithmetic):

    * code c = round((x - min) / (s / 16)) lies in [0, 240] because (x - min) / (s / 16) lies in
      [0, 15 * 16]; reconstructing min + c * s / 16 is off by at most half a step:
      |err_int8| <= s / 32.
    * upper u = (c + 8) >> 4 = round-half-up(c / 16) in [0, 15] (c <= 240 gives u <= 15), and
      lower l = c - 16 u in [-8, 7] (so l fits a signed int4 and c = 16 u + l exactly).
      The upper view min + u * s is off by the int8 error plus |l| steps:
      |err_int4| <= s / 32 + 8 * s / 16 = 17 s / 32.

    (QuantSpec's formulation u = round((x - min) / s) would give |err_int4| <= s / 2 but a residual
    in [-8, 8] that a signed int4 cannot hold: clipping +8 to 7 makes |err_int8| up to s / 16.
    Splitting the one int8 code keeps the int8 view at s / 32 and costs the int4 view s / 32.)
    Float32 adds the rounding allowance of `_float_slack`. A constant group (s = 0) is exact.
    """
    rng = np.random.default_rng(seed)
    x = offset + (10.0**log_range) * rng.standard_normal((groups, size))
    x = x.astype(np.float32)
    if size > 2 and seed % 5 == 0:
        x[:, 1:] = x[:, :1]  # constant groups
    codes, scale, mn = quantize(jnp.asarray(x), axis=-1)
    codes, scale, mn = np.asarray(codes), np.asarray(scale), np.asarray(mn)
    assert codes.min() >= 0 and codes.max() <= 240
    upper, lower = (np.asarray(a) for a in split_codes(jnp.asarray(codes)))
    assert upper.min() >= 0 and upper.max() <= 15
    assert lower.min() >= -8 and lower.max() <= 7
    np.testing.assert_array_equal(16 * upper + lower, codes)
    both = np.asarray(
        dequantize(jnp.asarray(upper), jnp.asarray(lower), jnp.asarray(scale), jnp.asarray(mn))
    )
    up = np.asarray(dequantize(jnp.asarray(upper), None, jnp.asarray(scale), jnp.asarray(mn)))
    slack = _float_slack(x)
    assert (np.abs(both - x) <= scale / 32 + slack).all(), np.max(np.abs(both - x) - scale / 32)
    assert (np.abs(up - x) <= 17 * scale / 32 + slack).all(), np.max(
        np.abs(up - x) - 17 * scale / 32
    )
    const = scale[:, 0] == 0
    np.testing.assert_array_equal(both[const], x[const])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 16))
def test_pack_unpack_nibbles_inverse(seed, n):
    x = np.random.default_rng(seed).integers(0, 16, size=(3, 2 * n))
    np.testing.assert_array_equal(np.asarray(unpack_nibbles(pack_nibbles(jnp.asarray(x)))), x)
    assert pack_nibbles(jnp.asarray(x)).dtype == jnp.uint8


def _truth(seed, b, n):
    rng = np.random.default_rng(seed)
    shape = (CFG.num_layers, b, n, CFG.num_kv_heads, CFG.head_dim)
    k = rng.standard_normal(shape) * rng.uniform(0.1, 4, shape[-1])  # channels of unequal range
    v = rng.standard_normal(shape)
    return k.astype(np.float32), v.astype(np.float32)


@jax.jit
def _write_jit(cache, positions, k, v):
    for layer in range(k.shape[0]):
        cache = cache.write_layer(layer, positions, k[layer], v[layer])
    return cache


_commit_jit = jax.jit(lambda cache, n: cache.commit(n))
# The decoding loop's way: commit stages the chunks, the next step's start quantizes them.
_staged_commit_jit = jax.jit(lambda cache, n: cache.commit(n, flush=False).flush())


def _write_all_layers(cache, positions, k, v):
    """Writes k, v [L, b, t, kvh, hd] for every layer at positions [b, t]."""
    return _write_jit(
        cache,
        jnp.asarray(positions, jnp.int32),
        jnp.asarray(k, jnp.float32),
        jnp.asarray(v, jnp.float32),
    )


def _prefilled(truth_k, truth_v, lens, residual, step_tokens, capacity, prompt_bucket=16):
    b = truth_k.shape[1]
    cache = HierKVCache.init(CFG, b, capacity, residual=residual, step_tokens=step_tokens)
    scratch = cache.prefill_cache(prompt_bucket)
    scratch = scratch.replace(
        k=jnp.asarray(truth_k[:, :, :prompt_bucket]), v=jnp.asarray(truth_v[:, :, :prompt_bucket])
    )
    return cache.finish_prefill(scratch, jnp.asarray(lens, jnp.int32))


def _check_state(cache: HierKVCache, truth_k, truth_v, ref: HierKVCache | None = None):
    """The invariants after a commit; with `ref`, equality with another path to the same lengths."""
    lay = cache.layout
    r = lay.residual
    lens = np.asarray(cache.lengths)
    np.testing.assert_array_equal(np.asarray(cache.q_len), (lens // r) * r)
    np.testing.assert_array_equal(
        np.asarray(cache.buf_start), np.asarray(float_start(jnp.asarray(lens), r))
    )
    assert (lens - np.asarray(cache.buf_start) <= 2 * r).all()
    kb, vb = (np.asarray(x) for x in cache.linear_buffer())  # index i = position buf_start + i
    for bi, n in enumerate(lens):
        s = int(cache.buf_start[bi])
        # the float buffer holds exactly the verified values of [buf_start, length)
        np.testing.assert_array_equal(kb[:, bi, : n - s], truth_k[:, bi, s:n])
        np.testing.assert_array_equal(vb[:, bi, : n - s], truth_v[:, bi, s:n])
        q = int(cache.q_len[bi])
        if q:  # every complete chunk quantized from the verified values (never from drafts)
            for layer in range(CFG.num_layers):
                k_deq, v_deq = (np.asarray(a)[bi, :q] for a in dequantize_layer(cache, layer))
                ks = np.repeat(np.asarray(cache.k_scale)[layer, bi], lay.key_group, axis=0)[:q]
                assert (np.abs(k_deq - truth_k[layer, bi, :q]) <= ks / 32 + 1e-5).all()
                vs = np.asarray(cache.v_scale)[layer, bi, :q, :, None]
                assert (np.abs(v_deq - truth_v[layer, bi, :q]) <= vs / 32 + 1e-5).all()
        if ref is not None:  # the same bits as the other path, wherever either is meaningful
            for name in ("k_hi", "k_lo", "v_hi", "v_lo", "v_scale", "v_min"):
                np.testing.assert_array_equal(
                    np.asarray(getattr(cache, name))[:, bi, :q],
                    np.asarray(getattr(ref, name))[:, bi, :q],
                    err_msg=name,
                )
            g = q // lay.key_group
            for name in ("k_scale", "k_min"):
                np.testing.assert_array_equal(
                    np.asarray(getattr(cache, name))[:, bi, :g],
                    np.asarray(getattr(ref, name))[:, bi, :g],
                    err_msg=name,
                )
            np.testing.assert_array_equal(
                kb[:, bi, : n - s], np.asarray(ref.linear_buffer()[0])[:, bi, : n - s]
            )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    residual=st.sampled_from([2, 4, 8]),
    gamma=st.integers(0, 4),
    prompt_lens=st.lists(st.integers(1, 16), min_size=2, max_size=2),
    accepts=st.lists(st.lists(st.integers(0, 4), min_size=2, max_size=2), min_size=1, max_size=14),
)
def test_flush_invariants_and_path_independence(seed, residual, gamma, prompt_lens, accepts):
    """Speculative steps (drafts written, verified entries overwritten, a prefix committed) keep
    the invariants, flush only verified values, and end in the same bits as a prefill of the
    same tokens: the cache is a function of the verified lengths alone. The loop's staged
    commit (`commit(flush=False)`, then `flush()`) gives the same bits as the eager
    one at every step."""
    gamma = min(gamma, residual)
    step = gamma + 1
    cap = 16 + step * 15
    truth_k, truth_v = _truth(seed, 2, cap + 16)
    rng = np.random.default_rng(seed + 1)
    cache = _prefilled(truth_k, truth_v, prompt_lens, residual, step, cap)
    _check_state(cache, truth_k, truth_v)
    for acc in accepts:
        base = np.asarray(cache.lengths)
        pos = base[:, None] + np.arange(step)[None]  # [b, step]
        junk = rng.standard_normal((CFG.num_layers, 2, step, CFG.num_kv_heads, CFG.head_dim))
        cache = _write_all_layers(
            cache, pos, junk.astype(np.float32), junk.astype(np.float32)
        )  # drafts
        take = lambda a, pos=pos: np.stack([a[:, bi, pos[bi]] for bi in range(2)], 1)  # noqa: E731
        cache = _write_all_layers(
            cache, pos, take(truth_k), take(truth_v)
        )  # the verifier's overwrite
        n = np.minimum(np.asarray(acc) % (step + 1), step)
        n = np.minimum(base + n, cache.capacity)
        staged = _staged_commit_jit(cache, jnp.asarray(n, jnp.int32))
        cache = _commit_jit(cache, jnp.asarray(n, jnp.int32))
        _check_state(cache, truth_k, truth_v)
        for name in ("lengths", "q_len", "buf_start"):
            np.testing.assert_array_equal(getattr(staged, name), getattr(cache, name), name)
        _check_state(staged, truth_k, truth_v, ref=cache)
    final = np.asarray(cache.lengths)
    bucket = int(2 ** np.ceil(np.log2(max(final.max(), 16))))
    ref = _prefilled(truth_k, truth_v, final, residual, step, cap, prompt_bucket=bucket)
    _check_state(cache, truth_k, truth_v, ref=ref)


def test_rollback_moves_only_the_length_and_stops_at_q_len():
    truth_k, truth_v = _truth(0, 2, 64)
    cache = _prefilled(truth_k, truth_v, [13, 6], residual=4, step_tokens=4, capacity=40)
    drafted = _write_all_layers(
        cache, np.array([[13, 14, 15], [6, 7, 8]]), truth_k[:, :, :3] * 0, truth_v[:, :, :3] * 0
    )
    drafted = drafted.replace(lengths=drafted.lengths + 3)  # as during drafting
    back = rollback(drafted, cache.lengths)
    np.testing.assert_array_equal(np.asarray(back.lengths), [13, 6])
    for name in ("k_hi", "k_scale", "q_len", "buf_start", "k_buf"):
        assert getattr(back, name) is getattr(drafted, name)  # nothing but the length moves
    # rollback never goes below the quantized prefix: q_len = 12 and 4
    np.testing.assert_array_equal(np.asarray(rollback(cache, jnp.asarray([0, 5])).lengths), [12, 5])


def test_kv_bytes_per_token_smollm2_shape():
    """SmolLM2-135M: 30 layers, 3 KV heads of 64. Float32: 2 * 30 * 192 * 4 = 46080 B/token.
    Hierarchical: codes 1 B/value (two int4 halves), key scale+min per channel per 128 tokens
    (8 * 192 / 128 = 12 B), value scale+min per head per token (8 * 3 = 24 B), per layer
    192 + 12 + 192 + 24 = 420 B: 12600 B/token, 0.273x of float32. Holding a sequence also
    costs its float buffer (R + 1 to 2R tokens in float32, whose complete chunks are also held
    quantized): at exactly 8192 tokens the buffer is full (2R = 256 tokens), 0.305x; at 8000
    tokens (192 in float) 0.295x."""
    cfg = preset("smollm2-135m")
    h = jax.eval_shape(lambda: make_cache("hier", cfg, 1, 8192, residual=128, step_tokens=6))
    f = jax.eval_shape(lambda: make_cache("float", cfg, 1, 8192))
    h_bytes = HierKVCache.kv_bytes_per_token(h)
    f_bytes = KVCache.kv_bytes_per_token(f)
    assert f_bytes == 46080 and h_bytes == 12600
    ratio = HierKVCache.kv_bytes(h, [8192]) / KVCache.kv_bytes(f, [8192])
    assert ratio == (8192 * 12600 + 256 * 46080) / (8192 * 46080)  # 0.3047
    ratio = HierKVCache.kv_bytes(h, [8000]) / KVCache.kv_bytes(f, [8000])
    assert ratio == (7936 * 12600 + 192 * 46080) / (8000 * 46080)  # 0.2952


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(residual=0), "residual"),
        (dict(residual=8, key_group=3), "divide"),
        (dict(residual=4, step_tokens=6), "gamma <= 4"),
        (dict(residual=8, block=12), "multiple"),
    ],
)
def test_bad_layouts_rejected_in_one_sentence(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HierLayout.make(64, **kwargs)
    with pytest.raises(ValueError, match="unknown kv_cache"):
        make_cache("int8", CFG, 1, 16)
