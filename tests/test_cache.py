"""KV cache invariants: writes land at lengths[b] + i, never past capacity, rollback only shrinks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qspec_jax.cache import KVCache, advance, rollback, set_lengths, write
from qspec_jax.config import preset

CFG = preset("tiny").replace(num_layers=2, num_kv_heads=1, head_dim=4)
CAP = 16


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, CAP), min_size=3, max_size=3),
    t=st.integers(1, 6),
    layer=st.integers(0, 1),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
)
def test_write_lands_at_lengths_and_drops_overflow(lengths, t, layer, seed, dtype):
    # 16-bit caches are written as their uint16 bits (kv_cache.write_layer): same values.
    rng = np.random.default_rng(seed)
    cache = KVCache.init(CFG, 3, CAP)
    cast = lambda a: np.array(jnp.asarray(a, dtype), np.float32)  # noqa: E731 (a copy)
    old_k = cast(rng.normal(size=cache.k.shape))
    cache = cache.replace(k=jnp.asarray(old_k, dtype), v=jnp.asarray(old_k + 1, dtype))
    old_k = cast(old_k)
    cache = set_lengths(cache, jnp.asarray(lengths))
    new = cast(rng.normal(size=(3, t, 1, 4)))
    out = write(cache, layer, jnp.asarray(new), jnp.asarray(new * 2))
    assert out.k.dtype == jnp.dtype(dtype)
    k = np.asarray(out.k, np.float32)
    expect, expect_v = old_k.copy(), cast(old_k + 1)
    for b, n in enumerate(lengths):
        for i in range(t):
            if n + i < CAP:  # past the capacity: dropped, never clamped onto valid entries
                expect[layer, b, n + i] = new[b, i]
                expect_v[layer, b, n + i] = new[b, i] * 2
    np.testing.assert_array_equal(k, expect)
    np.testing.assert_array_equal(np.asarray(out.v, np.float32), expect_v)
    np.testing.assert_array_equal(np.asarray(out.lengths), lengths)  # write commits nothing


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, CAP), min_size=2, max_size=2),
    back=st.lists(st.integers(0, CAP), min_size=2, max_size=2),
    n=st.integers(0, 2 * CAP),
)
def test_rollback_and_advance(lengths, back, n):
    cache = set_lengths(KVCache.init(CFG, 2, CAP), jnp.asarray(lengths))
    rolled = rollback(cache, jnp.asarray(back))
    np.testing.assert_array_equal(np.asarray(rolled.lengths), np.minimum(lengths, back))
    assert rolled.k is cache.k  # rollback touches no K/V: rejected entries are just invalid
    adv = advance(cache, n)
    np.testing.assert_array_equal(np.asarray(adv.lengths), np.minimum(np.asarray(lengths) + n, CAP))


def test_bfloat16_write_converts_no_whole_cache():
    """XLA:CPU has no bfloat16 scatter: written as bfloat16 values, the whole layer-stacked cache
    was converted to float32 and back around each write (2 x layers full passes a decoding step
    for SmolLM2). The compiled write holds no float32 array of the cache's shape."""
    import jax

    cache = KVCache.init(CFG.replace(dtype="bfloat16"), 3, CAP)
    assert cache.k.dtype == jnp.bfloat16
    new = jnp.ones((3, 2, 1, 4), jnp.float32)
    hlo = jax.jit(lambda c, k: write(c, 1, k, k)).lower(cache, new).compile().as_text()
    whole = "f32[" + ",".join(map(str, cache.k.shape)) + "]"  # f32[2,3,16,1,4]
    assert whole not in hlo
