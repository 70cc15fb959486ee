"""Generation loop mechanics on the tiny random model (float weights, CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax.cache import KVCache, set_lengths
from qspec_jax.config import NO_QUANT
from qspec_jax.decoding import DecodeConfig, generate, generate_python
from qspec_jax.decoding.loop import LENGTH, STOP, accept_sampling
from qspec_jax.model.llama import forward

MAX_NEW = 24
CAP = 64
_fwd = jax.jit(forward, static_argnums=(3, 4, 5))


def _prompts(lens, seed=1, t=16):
    toks = np.array(jax.random.randint(jax.random.PRNGKey(seed), (len(lens), t), 3, 250), np.int32)
    for i, n in enumerate(lens):
        toks[i, n:] = 0
    return jnp.asarray(toks), jnp.asarray(lens, jnp.int32)


def _gen(params, cfg, toks, lens, dc, cap=CAP, seed=0):
    cache = KVCache.init(cfg, toks.shape[0], cap)
    return generate(params, cache, toks, lens, jax.random.PRNGKey(seed), cfg=cfg, qcfg=NO_QUANT, dc=dc)


def _tokens(state):
    return [np.asarray(state.out_tokens[b, : state.num_generated[b]]).tolist()
            for b in range(state.out_tokens.shape[0])]


def test_block_forward_equals_token_by_token(tiny_cfg, tiny_params):
    """Feeding 4 tokens at once gives the same logits and K/V as feeding them one at a time.

    Exact equality (not a tolerance): on CPU the XLA reference path computes every row the same
    way whatever the row count, which QSpec's exactness against autoregressive decoding needs.
    """
    toks, _ = _prompts([12, 12], t=12)
    cache = KVCache.init(tiny_cfg, 2, CAP)
    _, cache = _fwd(tiny_params, toks[:, :8], cache, tiny_cfg, NO_QUANT, "fp")
    cache = set_lengths(cache, jnp.asarray([8, 8]))
    block_logits, block_cache = _fwd(tiny_params, toks[:, 8:], cache, tiny_cfg, NO_QUANT, "fp")
    step_logits = []
    for i in range(4):
        lg, cache = _fwd(tiny_params, toks[:, 8 + i : 9 + i], cache, tiny_cfg, NO_QUANT, "fp")
        cache = set_lengths(cache, cache.lengths + 1)
        step_logits.append(lg)
    np.testing.assert_array_equal(np.asarray(block_logits), np.asarray(jnp.concatenate(step_logits, 1)))
    np.testing.assert_array_equal(np.asarray(block_cache.k[:, :, :12]), np.asarray(cache.k[:, :, :12]))


def test_jit_loop_equals_python_loop_and_batch_equals_alone(tiny_cfg, tiny_params):
    dc = DecodeConfig(mode="fp", max_new_tokens=MAX_NEW)
    toks, lens = _prompts([5, 16, 9])
    batched = _tokens(_gen(tiny_params, tiny_cfg, toks, lens, dc))
    py = generate_python(tiny_params, KVCache.init(tiny_cfg, 3, CAP), toks, lens, jax.random.PRNGKey(0),
                         cfg=tiny_cfg, qcfg=NO_QUANT, dc=dc)
    assert _tokens(py) == batched
    for b in range(3):
        alone = _tokens(_gen(tiny_params, tiny_cfg, toks[b : b + 1], lens[b : b + 1], dc))
        assert alone[0] == batched[b], f"sequence {b} differs when batched"
    assert all(len(t) == MAX_NEW for t in batched)
    assert len({tuple(t) for t in batched}) == 3  # the random model does depend on its prompt


@pytest.mark.parametrize("gamma", [1, 3])
def test_qspec_with_equal_precisions_accepts_everything(tiny_cfg, tiny_params, gamma):
    """With draft == verify precision every draft is accepted and output equals AR output."""
    toks, lens = _prompts([5, 16, 9])
    ar = _tokens(_gen(tiny_params, tiny_cfg, toks, lens, DecodeConfig(mode="fp", max_new_tokens=MAX_NEW)))
    dc = DecodeConfig(mode="qspec", max_new_tokens=MAX_NEW, gamma=gamma,
                      draft_precision="fp", verify_precision="fp")
    st = _gen(tiny_params, tiny_cfg, toks, lens, dc)
    assert _tokens(st) == ar
    np.testing.assert_array_equal(np.asarray(st.draft_accepted), np.asarray(st.draft_proposed))
    # every step commits gamma + 1 tokens until max_new_tokens (the first came from prefill)
    assert int(st.steps) == -(-(MAX_NEW - 1) // (gamma + 1))


def test_eos_stops_and_capacity_gives_length(tiny_cfg, tiny_params):
    toks, lens = _prompts([5, 16])
    free = _tokens(_gen(tiny_params, tiny_cfg, toks, lens, DecodeConfig(mode="fp", max_new_tokens=MAX_NEW)))
    eos = free[0][6]
    st = _gen(tiny_params, tiny_cfg, toks, lens,
              DecodeConfig(mode="fp", max_new_tokens=MAX_NEW, eos_ids=(eos,)))
    got = _tokens(st)
    cut = free[0].index(eos) + 1
    assert got[0] == free[0][:cut] and int(st.finish[0]) == STOP
    # a cache of 24 positions: sequence 1 (16 prompt tokens) has room for 8 more, then "length"
    st = _gen(tiny_params, tiny_cfg, toks, lens, DecodeConfig(mode="fp", max_new_tokens=MAX_NEW), cap=24)
    got = _tokens(st)
    assert int(st.finish[1]) == LENGTH and int(st.cache.lengths[1]) <= 24
    assert got[1] == free[1][: len(got[1])] and len(got[1]) == 24 - 16 + 1
    # qspec needs gamma + 1 free positions per step and stops early rather than overflow
    dq = DecodeConfig(mode="qspec", max_new_tokens=MAX_NEW, gamma=3, draft_precision="fp",
                      verify_precision="fp")
    st = _gen(tiny_params, tiny_cfg, toks, lens, dq, cap=24)
    assert int(st.finish[1]) == LENGTH and int(st.cache.lengths[1]) + 4 > 24
    assert _tokens(st)[1] == free[1][: int(st.num_generated[1])]


def test_speculative_sampling_rule_preserves_target_distribution():
    """accept_sampling's first emitted token is distributed as p, whatever q (chi-square test).

    200k draws over a 6-token vocabulary; the chi-square statistic with 5 degrees of freedom is
    compared against 20.5 (p = 0.001), so the test fails by chance once in a thousand runs.
    """
    v, n = 6, 200_000
    p = jnp.asarray([0.35, 0.25, 0.2, 0.1, 0.07, 0.03])
    q = jnp.asarray([0.05, 0.1, 0.4, 0.3, 0.1, 0.05])
    key = jax.random.PRNGKey(0)
    kd, ka = jax.random.split(key)
    d1 = jax.random.categorical(kd, jnp.log(q), shape=(n,)).astype(jnp.int32)
    drafts = jnp.stack([jnp.zeros(n, jnp.int32), d1], axis=1)  # gamma = 1
    q_probs = jnp.broadcast_to(q, (n, 1, v))
    p_probs = jnp.broadcast_to(p, (n, 2, v))
    _, emitted = jax.jit(accept_sampling)(drafts, q_probs, p_probs, ka)
    counts = np.bincount(np.asarray(emitted[:, 0]), minlength=v)
    expected = np.asarray(p) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (chi2, counts, expected)


def test_unrolled_layers_equal_scanned_layers(tiny_cfg, tiny_params):
    """The per-layer (unrolled, CPU default) and stacked (lax.scan) layouts compute the same.

    Same math, but two different XLA programs whose fusions may round differently: 1e-6
    relative is float32 rounding territory for values of order 1.
    """
    from qspec_jax.model.params import stack_layers, unstack_layers

    toks, _ = _prompts([12, 12], t=12)
    unstacked = unstack_layers(tiny_params)
    assert isinstance(unstacked.layers, tuple) and len(unstacked.layers) == tiny_cfg.num_layers
    cache = KVCache.init(tiny_cfg, 2, CAP)
    a, ca = _fwd(tiny_params, toks, cache, tiny_cfg, NO_QUANT, "fp")
    b, cb = _fwd(unstacked, toks, cache, tiny_cfg, NO_QUANT, "fp")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ca.k), np.asarray(cb.k), rtol=1e-6, atol=1e-6)
    restacked = stack_layers(unstacked)
    for x, y in zip(jax.tree_util.tree_leaves(restacked), jax.tree_util.tree_leaves(tiny_params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
