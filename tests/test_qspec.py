"""QSpec on the tiny random model with real int4 weights: exact greedy equality with W4A16
autoregressive decoding, ragged batches, and the sampling distribution at temperature > 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from qspec_jax.cache import KVCache
from qspec_jax.decoding import DecodeConfig, SamplingConfig, generate
from qspec_jax.quant import quantize_model

MAX_NEW = 24


@pytest.fixture(scope="module")
def tiny_q(tiny_cfg, tiny_params):
    params, qcfg = quantize_model(tiny_params, tiny_cfg, "rtn", 32, progress=False)
    return params, qcfg


def _run(tiny_cfg, tiny_q, toks, lens, dc, cap=64, seed=0):
    params, qcfg = tiny_q
    cache = KVCache.init(tiny_cfg, toks.shape[0], cap)
    return generate(params, cache, toks, lens, jax.random.PRNGKey(seed), cfg=tiny_cfg, qcfg=qcfg, dc=dc)


def _prompts(lens, t=16, seed=3):
    toks = np.array(jax.random.randint(jax.random.PRNGKey(seed), (len(lens), t), 3, 250), np.int32)
    for i, n in enumerate(lens):
        toks[i, n:] = 0
    return jnp.asarray(toks), jnp.asarray(lens, jnp.int32)


def _tokens(s):
    return [np.asarray(s.out_tokens[b, : s.num_generated[b]]).tolist() for b in range(s.done.shape[0])]


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_qspec_equals_w4a16_ragged_batch(tiny_cfg, tiny_q, gamma):
    """Token-identical to W4A16 greedy, with drafts really rejected (acceptance strictly in (0, 1))."""
    toks, lens = _prompts([3, 16, 9, 12, 5, 7, 16, 1])
    ar = _run(tiny_cfg, tiny_q, toks, lens, DecodeConfig(mode="w4a16", max_new_tokens=MAX_NEW))
    qs = _run(tiny_cfg, tiny_q, toks, lens,
              DecodeConfig(mode="qspec", max_new_tokens=MAX_NEW, gamma=gamma))
    assert _tokens(qs) == _tokens(ar)
    acc = np.asarray(qs.draft_accepted) / np.asarray(qs.draft_proposed)
    assert 0.0 < acc.mean() < 1.0, acc
    # sequences accept different numbers of drafts: ragged progress, nobody waits for the slowest
    assert len(set(np.asarray(qs.verify_steps).tolist())) > 1 or gamma == 1
    # each sequence alone gives the same tokens as in the batch
    for b in (0, 3):
        alone = _run(tiny_cfg, tiny_q, toks[b : b + 1], lens[b : b + 1],
                     DecodeConfig(mode="qspec", max_new_tokens=MAX_NEW, gamma=gamma))
        assert _tokens(alone)[0] == _tokens(ar)[b]


def test_greedy_qspec_stops_on_eos_like_w4a16(tiny_cfg, tiny_q):
    toks, lens = _prompts([5, 16, 9])
    free = _tokens(_run(tiny_cfg, tiny_q, toks, lens, DecodeConfig(mode="w4a16", max_new_tokens=MAX_NEW)))
    eos = (free[0][5], free[1][10])
    ar = _run(tiny_cfg, tiny_q, toks, lens,
              DecodeConfig(mode="w4a16", max_new_tokens=MAX_NEW, eos_ids=eos))
    qs = _run(tiny_cfg, tiny_q, toks, lens,
              DecodeConfig(mode="qspec", max_new_tokens=MAX_NEW, gamma=4, eos_ids=eos))
    assert _tokens(qs) == _tokens(ar)
    np.testing.assert_array_equal(np.asarray(qs.finish), np.asarray(ar.finish))


def test_sampling_matches_w4a16_distribution(tiny_cfg, tiny_q):
    """At temperature > 0, QSpec's tokens are distributed as W4A16 sampling's.

    2048 samples per method from one fixed prompt (a batch of identical rows, each drawing its
    own randomness), top-k 4 applied to both draft and verifier. The second and third generated
    tokens are the first ones produced through draft + verify (the first comes from prefill).
    Two-sample chi-square test on their joint distribution, categories with fewer than 10
    expected counts merged; significance 0.001, so a correct implementation fails by chance
    once in a thousand runs, while a rule that returned draft tokens unverified would be off.
    """
    b = 2048
    toks = jnp.broadcast_to(jnp.asarray([[5, 6, 7, 8, 9, 10, 11, 12]], jnp.int32), (b, 8))
    lens = jnp.full((b,), 8, jnp.int32)
    sc = SamplingConfig(temperature=1.0, top_k=4)
    ar = _run(tiny_cfg, tiny_q, toks, lens, DecodeConfig(mode="w4a16", max_new_tokens=3, sampling=sc), cap=16, seed=1)
    qs = _run(tiny_cfg, tiny_q, toks, lens, DecodeConfig(mode="qspec", max_new_tokens=3, gamma=2, sampling=sc), cap=16, seed=2)
    acc = float(qs.draft_accepted.sum() / qs.draft_proposed.sum())
    assert acc < 0.95, f"draft and verifier nearly agree ({acc}): the test would not be sensitive"
    a = np.asarray(ar.out_tokens[:, 1:3])
    q = np.asarray(qs.out_tokens[:, 1:3])
    keys = sorted({tuple(r) for r in a} | {tuple(r) for r in q})
    index = {k: i for i, k in enumerate(keys)}
    ca = np.bincount([index[tuple(r)] for r in a], minlength=len(keys))
    cq = np.bincount([index[tuple(r)] for r in q], minlength=len(keys))
    big = (ca + cq) >= 20
    table = np.stack([np.append(ca[big], ca[~big].sum()), np.append(cq[big], cq[~big].sum())])
    table = table[:, table.sum(0) > 0]
    assert table.shape[1] >= 5, "too few categories for a meaningful test"
    p_value = stats.chi2_contingency(table)[1]
    assert p_value > 1e-3, (p_value, table)


@pytest.mark.parametrize("opts", [dict(adaptive_gamma=True), dict(spec_max_active=4),
                                  dict(adaptive_gamma=True, spec_max_active=2)])
def test_adaptive_gamma_and_speculation_switch_keep_exactness(tiny_cfg, tiny_q, opts):
    toks, lens = _prompts([3, 16, 9, 12, 5, 7, 16, 1])
    free = _tokens(_run(tiny_cfg, tiny_q, toks, lens, DecodeConfig(mode="w4a16", max_new_tokens=MAX_NEW)))
    eos = tuple(free[b][4 + b] for b in range(5))  # sequences 0..4 (at least) stop early
    ar = _run(tiny_cfg, tiny_q, toks, lens, DecodeConfig(mode="w4a16", max_new_tokens=MAX_NEW, eos_ids=eos))
    qs = _run(tiny_cfg, tiny_q, toks, lens,
              DecodeConfig(mode="qspec", max_new_tokens=MAX_NEW, gamma=4, eos_ids=eos, **opts))
    assert _tokens(qs) == _tokens(ar)
    if "spec_max_active" in opts:
        # while more sequences run than the threshold, steps are plain W4A16 steps
        assert 0 < int(qs.spec_steps) < int(qs.steps)
    if opts.get("adaptive_gamma"):
        proposed = np.asarray(qs.draft_proposed)
        assert (proposed <= 4 * np.asarray(qs.verify_steps)).all()
        assert 1 <= int(qs.gamma_cur) <= 4


def test_w4a8_draft_is_exact_and_accepted_more_than_w4a4(tiny_cfg, tiny_q):
    """The draft precision is a choice (`draft_precision`): greedy output stays W4A16's, and the
    int8-activation draft, a finer approximation of W4A16 than int4 activations, is accepted
    more often (so the switch really changes the drafter)."""
    toks, lens = _prompts([3, 16, 9, 12, 5, 7, 16, 1])
    ar = _run(tiny_cfg, tiny_q, toks, lens, DecodeConfig(mode="w4a16", max_new_tokens=MAX_NEW))
    acc = {}
    for draft in ("w4a4", "w4a8"):
        qs = _run(tiny_cfg, tiny_q, toks, lens,
                  DecodeConfig(mode="qspec", max_new_tokens=MAX_NEW, gamma=3, draft_precision=draft))
        assert _tokens(qs) == _tokens(ar)
        acc[draft] = float(qs.draft_accepted.sum() / qs.draft_proposed.sum())
    assert acc["w4a8"] > acc["w4a4"], acc


def test_unknown_draft_precision_is_rejected():
    with pytest.raises(ValueError, match="unknown draft precision 'w4a2'"):
        DecodeConfig(mode="qspec", draft_precision="w4a2")
