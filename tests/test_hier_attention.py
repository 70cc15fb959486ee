"""Attention over the hierarchical cache: block-wise online softmax against a dense reference, and
the row-independence (block of rows == one row at a time, with commits and flushes in between)
that speculative exactness rests on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax.cache import HierKVCache, KVCache
from qspec_jax.cache.hierarchical import dequantize_layer, float_start
from qspec_jax.config import QuantConfig
from qspec_jax.model.llama import forward

NO_QUANT = QuantConfig()


def _random_cache(cfg, lens, residual, block, prompt_bucket=64, seed=0):
    rng = np.random.default_rng(seed)
    shape = (cfg.num_layers, len(lens), prompt_bucket, cfg.num_kv_heads, cfg.head_dim)
    k = (rng.standard_normal(shape) * rng.uniform(0.2, 3.0, shape[-1])).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    cache = HierKVCache.init(cfg, len(lens), 96, residual=residual, block=block, step_tokens=4)
    scratch = cache.prefill_cache(prompt_bucket).replace(k=jnp.asarray(k), v=jnp.asarray(v))
    return cache.finish_prefill(scratch, jnp.asarray(lens, jnp.int32))


def _dense_reference(cache: HierKVCache, layer, q, positions, view):
    """Dequantize everything, then ordinary softmax attention in float64, row by row.

    Row p reads key j < float_start(p) dequantized (upper halves only for the draft view) and
    every other j <= p from the float buffer.
    """
    kq, vq = (np.asarray(a, np.float64) for a in dequantize_layer(cache, layer, view))
    kb, vb = (np.asarray(x[layer], np.float64) for x in cache.linear_buffer())  # [b, buffer, ..]
    b, t, h, hd = q.shape
    kvh = kb.shape[2]
    out = np.zeros((b, t, h, hd))
    for bi in range(b):
        s0 = int(cache.buf_start[bi])
        for ti in range(t):
            p = int(positions[bi, ti])
            cut = int(float_start(jnp.asarray(p), cache.layout.residual))
            keys = np.concatenate([kq[bi, :cut], kb[bi, cut - s0 : p + 1 - s0]])  # [p+1, kvh, hd]
            vals = np.concatenate([vq[bi, :cut], vb[bi, cut - s0 : p + 1 - s0]])
            for hi in range(h):
                kv = hi // (h // kvh)
                sc = keys[:, kv] @ np.asarray(q[bi, ti, hi], np.float64) / np.sqrt(hd)
                w = np.exp(sc - sc.max())
                out[bi, ti, hi] = (w / w.sum()) @ vals[:, kv]
    return out.reshape(b, t, h * hd)


@pytest.mark.parametrize("view", ["target", "draft"])
def test_blockwise_attention_matches_dense_reference(tiny_cfg, view):
    """Tolerance 2e-6 * max|v| absolute: the block-wise result is a float32 online softmax (each
    block rescales the running sum once, exp and the dot products round at 2^-24 relative, a row
    here reads <= 80 keys in <= 11 blocks), the reference the same attention in float64; the
    float32 error of a convex combination of values is a few tens of ulps of max|v| at most.
    Both views are exact functions of the stored codes, so the tolerance does not depend on the
    quantization error."""
    lens = [64, 13]  # R = 4: 64 and 12 positions quantized, buffers from 56 and 8
    cache = _random_cache(tiny_cfg, lens, residual=4, block=8)
    rng = np.random.default_rng(1)
    t = 3
    pos = np.asarray(lens)[:, None] + np.arange(t)[None]  # verifier-like rows crossing float_start
    kv_shape = (2, t, tiny_cfg.num_kv_heads, tiny_cfg.head_dim)
    cache = cache.write_layer(
        1,
        jnp.asarray(pos),
        jnp.asarray(rng.standard_normal(kv_shape), jnp.float32),
        jnp.asarray(rng.standard_normal(kv_shape), jnp.float32),
    )
    q = rng.standard_normal((2, t, tiny_cfg.num_heads, tiny_cfg.head_dim)).astype(np.float32) * 2
    got = np.asarray(
        jax.jit(lambda c, q, p: c.attend(1, q, p, view))(cache, jnp.asarray(q), jnp.asarray(pos))
    )
    ref = _dense_reference(cache, 1, q, pos, view)
    vmax = np.abs(np.asarray(cache.v_buf)).max()
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * vmax)
    # the row at p = 65 reads [56, 60) as codes although the buffer (from 56) still holds them
    assert int(float_start(jnp.asarray(65), 4)) == 60 and int(cache.buf_start[0]) == 56


def test_draft_view_differs_from_target_view(tiny_cfg):
    cache = _random_cache(tiny_cfg, [61], residual=4, block=8)
    q = jnp.asarray(
        np.random.default_rng(2).standard_normal((1, 1, tiny_cfg.num_heads, tiny_cfg.head_dim)),
        jnp.float32,
    )
    pos = jnp.asarray([[61]])
    cache = cache.write_layer(0, pos, q[:, :, :2] * 0, q[:, :, :2] * 0)
    tgt = np.asarray(cache.attend(0, q, pos, "target"))
    dft = np.asarray(cache.attend(0, q, pos, "draft"))
    assert not np.array_equal(tgt, dft)
    with pytest.raises(ValueError, match="unknown KV view"):
        cache.attend(0, q, pos, "int2")


@pytest.mark.parametrize("stacked", [False, True])
def test_block_forward_equals_token_by_token_across_flushes(tiny_cfg, tiny_params, stacked):
    """A verifier block of 5 rows gives bit-identical logits and flushed state to 5 single-token
    steps, each committed (and so quantizing and flushing) before the next, with R = 4 so the
    rows cross two flushes. This is the property speculative exactness on this cache needs."""
    from qspec_jax.model.params import unstack_layers

    params = tiny_params if stacked else unstack_layers(tiny_params)
    fwd = jax.jit(forward, static_argnames=("cfg", "qcfg", "precision"))
    commit = jax.jit(lambda c, n: c.commit(n))
    toks = jax.random.randint(jax.random.PRNGKey(5), (2, 32), 3, 250)
    cache = HierKVCache.init(tiny_cfg, 2, 64, residual=4, block=8, step_tokens=5)
    scratch = cache.prefill_cache(16)
    _, scratch = fwd(params, toks[:, :16], scratch, cfg=tiny_cfg, qcfg=NO_QUANT, precision="fp")
    lens = jnp.asarray([15, 11], jnp.int32)
    cache = cache.finish_prefill(scratch, lens)
    block_logits, block_cache = fwd(
        params, toks[:, 16:21], cache, cfg=tiny_cfg, qcfg=NO_QUANT, precision="fp"
    )
    block_cache = commit(block_cache, lens + 5)
    step_logits = []
    for i in range(5):
        lg, cache = fwd(
            params, toks[:, 16 + i : 17 + i], cache, cfg=tiny_cfg, qcfg=NO_QUANT, precision="fp"
        )
        cache = commit(cache, cache.lengths + 1)
        step_logits.append(lg)
    np.testing.assert_array_equal(
        np.asarray(block_logits), np.asarray(jnp.concatenate(step_logits, 1))
    )
    for a, b in zip(jax.tree_util.tree_leaves(block_cache), jax.tree_util.tree_leaves(cache)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(cache.q_len[0]) == 20 and int(cache.buf_start[0]) == 12  # flushed during the steps
    assert isinstance(scratch, KVCache)
