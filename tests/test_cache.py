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
)
def test_write_lands_at_lengths_and_drops_overflow(lengths, t, layer, seed):
    rng = np.random.default_rng(seed)
    cache = KVCache.init(CFG, 3, CAP)
    old_k = rng.normal(size=cache.k.shape).astype(np.float32)
    cache = cache.replace(k=jnp.asarray(old_k), v=jnp.asarray(old_k + 1))
    cache = set_lengths(cache, jnp.asarray(lengths))
    new = rng.normal(size=(3, t, 1, 4)).astype(np.float32)
    out = write(cache, layer, jnp.asarray(new), jnp.asarray(new * 2))
    k = np.asarray(out.k)
    expect = old_k.copy()
    for b, n in enumerate(lengths):
        for i in range(t):
            if n + i < CAP:  # past the capacity: dropped, never clamped onto valid entries
                expect[layer, b, n + i] = new[b, i]
    np.testing.assert_array_equal(k, expect)
    np.testing.assert_array_equal(np.asarray(out.v)[layer], np.where(
        expect[layer] != old_k[layer], expect[layer] * 2, old_k[layer] + 1))
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
