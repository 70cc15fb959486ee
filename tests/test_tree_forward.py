"""One-forward tree verification through the model (tree positions and ancestor mask)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax.cache import KVCache, set_lengths
from qspec_jax.config import NO_QUANT
from qspec_jax.decoding import tree as tr
from qspec_jax.model.llama import forward


def _ancestors(tree, i):
    return list(tree.ancestor_at_depth[i, : tree.depths[i] + 1])


_fwd = jax.jit(forward, static_argnums=(3, 4, 5))


@pytest.fixture(scope="module")
def tiny_q(tiny_cfg, tiny_params):
    from qspec_jax.quant import quantize_model

    return quantize_model(tiny_params, tiny_cfg, "rtn", 32, progress=False)


@pytest.mark.parametrize("precision", ["fp", "w4a16"])
def test_tree_forward_equals_sequential_path_forward(tiny_cfg, tiny_params, tiny_q, precision):
    """Each node's logits from ONE tree forward (depth positions, ancestor mask) equal a plain
    forward over that node's root-to-node path, and so do the K/V after path compaction.

    Not bit-exact; atol 1e-5 on logits and K/V of order 1, for two float32 reassociation
    effects, measured on this CPU (2026-11-22): (1) attention sums over the key axis, and a
    tree puts the masked (probability exactly 0) keys between the path's keys, so the same
    nonzero terms are added in a different association: 2.4e-7 on attention outputs with the
    path's K/V moved to contiguous slots and everything else equal; (2) XLA:CPU dot results
    depend on the row count (a [1, 16, 128] x [128, 384] einsum's first row differs from the
    same row alone by 7.6e-6; a plain 16-token block forward's first logits differ from a
    1-token forward's by 9.5e-7, no tree involved). Observed worst case here 1.9e-6; 1e-5
    leaves 5x margin while an error in mask or positions moves logits by 1e-2 or more.
    W4A4 is not compared: per-token int4 activation rounding turns such 1e-7 differences into
    whole quantization steps (0.13 on a logit, measured), and no output depends on draft
    logits matching (the W4A16 level decides every token).
    """
    params, qcfg = (tiny_params, NO_QUANT) if precision == "fp" else tiny_q
    tree = tr.TreeConfig.from_branching((3, 2, 1))
    cap, b = 48, 2
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(3, 250, (b, 8)), jnp.int32)
    base = jnp.asarray([5, 8], jnp.int32)
    cache = KVCache.init(tiny_cfg, b, cap)
    _, cache = _fwd(params, prompt, cache, tiny_cfg, qcfg, precision)
    cache = set_lengths(cache, base)
    tokens = jnp.asarray(rng.integers(3, 250, (b, tree.num_nodes)), jnp.int32)
    mask = tr.attention_mask(tree, base, 0, tree.num_nodes, cap)
    pos = tr.rope_positions(tree, base, 0, tree.num_nodes)
    fwd = jax.jit(
        lambda p, t, c, m, r: forward(
            p, t, c, tiny_cfg, qcfg, precision, rope_positions=r, attn_mask=m
        )
    )
    tree_logits, tree_cache = fwd(params, tokens, cache, mask, pos)  # [batch, N, V]
    tol = dict(rtol=0, atol=1e-5)
    for i in range(tree.num_nodes):
        anc = _ancestors(tree, i)
        seq_logits, seq_cache = _fwd(params, tokens[:, anc], cache, tiny_cfg, qcfg, precision)
        np.testing.assert_allclose(
            np.asarray(tree_logits[:, i]), np.asarray(seq_logits[:, -1]), err_msg=f"node {i}", **tol
        )
        if tree.depths[i] == tree.depth:  # a leaf: compact its path and compare the K/V
            d = tree.depth
            path = jnp.asarray(np.broadcast_to(tree.ancestor_at_depth[i], (b, d + 1)))
            moved = tr.compact_path(tree_cache, base, path, jnp.full((b,), d, jnp.int32))
            for r in range(b):
                sl = slice(int(base[r]), int(base[r]) + d + 1)
                np.testing.assert_allclose(
                    np.asarray(moved.k[:, r, sl]), np.asarray(seq_cache.k[:, r, sl]), **tol
                )
                np.testing.assert_allclose(
                    np.asarray(moved.v[:, r, sl]), np.asarray(seq_cache.v[:, r, sl]), **tol
                )
    # the comparison is sensitive: plain causal attention over the same slots (no tree mask,
    # slot positions) is far from the per-path forwards
    wrong, _ = _fwd(params, tokens, cache, tiny_cfg, qcfg, precision)
    leaf = tree.num_nodes - 1
    seq_logits, _ = _fwd(
        params, tokens[:, _ancestors(tree, leaf)], cache, tiny_cfg, qcfg, precision
    )
    assert np.abs(np.asarray(wrong[:, leaf] - seq_logits[:, -1])).max() > 1e-2


def test_chain_tree_forward_is_the_block_forward_bit_for_bit(tiny_cfg, tiny_params, monkeypatch):
    """A chain tree (branching 1 per depth) is a plain block: the tree arguments then give the
    very same bits as the default causal forward (same rows, same keys, same positions).

    Both on XLA's dense attention: a tree mask always runs there, while an unmasked decode-sized
    block would take the CPU attention kernel (`dispatch.DECODE_QUERY_ROWS`), another rounding.
    """
    from pallas_kernels import dispatch

    monkeypatch.setattr(dispatch, "DECODE_QUERY_ROWS", 0)
    tree = tr.TreeConfig.from_branching((1, 1, 1, 1))
    b, cap = 2, 32
    rng = np.random.default_rng(1)
    base = jnp.asarray([3, 7], jnp.int32)
    cache = set_lengths(KVCache.init(tiny_cfg, b, cap), base)
    cache = cache.replace(
        k=jnp.asarray(rng.normal(size=cache.k.shape), jnp.float32),
        v=jnp.asarray(rng.normal(size=cache.v.shape), jnp.float32),
    )
    tokens = jnp.asarray(rng.integers(3, 250, (b, tree.num_nodes)), jnp.int32)
    mask = tr.attention_mask(tree, base, 0, tree.num_nodes, cap)
    pos = tr.rope_positions(tree, base, 0, tree.num_nodes)
    fwd = jax.jit(
        lambda p, t, c, m, r: forward(
            p, t, c, tiny_cfg, NO_QUANT, "fp", rope_positions=r, attn_mask=m
        )
    )
    a, ca = fwd(tiny_params, tokens, cache, mask, pos)
    block = jax.jit(lambda p, t, c: forward(p, t, c, tiny_cfg, NO_QUANT, "fp"))  # traced now
    b_, cb = block(tiny_params, tokens, cache)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))
    np.testing.assert_array_equal(np.asarray(ca.k), np.asarray(cb.k))
