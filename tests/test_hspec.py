"""SpecMQuant's hierarchy (mode "hspec") on the tiny random model with real int4 weights: greedy
output equal to W4A16 greedy for every hierarchy, at batch 1 and on a mixed-length batch, and
the sampling distribution at temperature > 0."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from qspec_jax.cache import KVCache
from qspec_jax.decoding import DecodeConfig, SamplingConfig, generate
from qspec_jax.decoding.loop import LENGTH
from qspec_jax.decoding.tree import TreeConfig
from qspec_jax.quant import quantize_model

MAX_NEW = 20
HIERARCHIES = [
    ((4, 2, 1), ("w4a4", "w4a8", "w4a16")),  # the paper's: tree -> W4A8 -> W4A16
    ((4, 2, 1), ("w4a4", "w4a16")),  # tree straight into W4A16 (path K/V compacted)
    ((1, 1, 1), ("w4a4", "w4a8", "w4a16")),  # W4A4 sequence -> W4A8 -> W4A16
    ((3, 1, 1, 1), ("w4a8", "w4a16")),  # a W4A8 tree drafter, uneven branching
]


@pytest.fixture(scope="module")
def tiny_q(tiny_cfg, tiny_params):
    return quantize_model(tiny_params, tiny_cfg, "rtn", 32, progress=False)


def _run(tiny_cfg, tiny_q, toks, lens, dc, cap=96, seed=0):
    params, qcfg = tiny_q
    cache = KVCache.init(tiny_cfg, toks.shape[0], cap)
    return generate(
        params, cache, toks, lens, jax.random.PRNGKey(seed), cfg=tiny_cfg, qcfg=qcfg, dc=dc
    )


def _prompts(lens, t=16, seed=3):
    toks = np.array(jax.random.randint(jax.random.PRNGKey(seed), (len(lens), t), 3, 250), np.int32)
    for i, n in enumerate(lens):
        toks[i, n:] = 0
    return jnp.asarray(toks), jnp.asarray(lens, jnp.int32)


def _tokens(s):
    return [
        np.asarray(s.out_tokens[b, : s.num_generated[b]]).tolist() for b in range(s.done.shape[0])
    ]


@pytest.mark.parametrize("branching,levels", HIERARCHIES)
def test_greedy_hspec_equals_w4a16(tiny_cfg, tiny_q, branching, levels):
    """Token-identical to W4A16 greedy on a mixed-length batch of 8 and at batch 1, with the
    tree really pruned (some but not all drafted tokens accepted) and sequences progressing
    at their own pace."""
    toks, lens = _prompts([3, 16, 9, 12, 5, 7, 16, 1])
    ar = _tokens(
        _run(tiny_cfg, tiny_q, toks, lens, DecodeConfig(mode="w4a16", max_new_tokens=MAX_NEW))
    )
    dc = DecodeConfig(
        mode="hspec",
        max_new_tokens=MAX_NEW,
        tree=TreeConfig.from_branching(branching),
        levels=levels,
    )
    hs = _run(tiny_cfg, tiny_q, toks, lens, dc)
    assert _tokens(hs) == ar
    acc = np.asarray(hs.draft_accepted) / np.asarray(hs.draft_proposed)
    assert 0.0 < acc.mean() < 1.0, acc
    assert len(set(np.asarray(hs.verify_steps).tolist())) > 1  # ragged progress
    if len(levels) == 3:  # the tree level accepted something and handed it on
        assert int(hs.tree_accepted.sum()) > 0
    for b in (0, 3):  # batch 1
        alone = _run(tiny_cfg, tiny_q, toks[b : b + 1], lens[b : b + 1], dc)
        assert _tokens(alone)[0] == ar[b]


def test_greedy_hspec_stops_on_eos_and_capacity_like_w4a16(tiny_cfg, tiny_q):
    toks, lens = _prompts([5, 16, 9])
    free = _tokens(
        _run(tiny_cfg, tiny_q, toks, lens, DecodeConfig(mode="w4a16", max_new_tokens=MAX_NEW))
    )
    eos = (free[0][5], free[1][10])
    ar = _run(
        tiny_cfg,
        tiny_q,
        toks,
        lens,
        DecodeConfig(mode="w4a16", max_new_tokens=MAX_NEW, eos_ids=eos),
    )
    dc = DecodeConfig(
        mode="hspec", max_new_tokens=MAX_NEW, eos_ids=eos, tree=TreeConfig.from_branching((4, 2, 1))
    )
    hs = _run(tiny_cfg, tiny_q, toks, lens, dc)
    assert _tokens(hs) == _tokens(ar)
    np.testing.assert_array_equal(np.asarray(hs.finish), np.asarray(ar.finish))
    # a small cache: the 21-node tree needs 21 free slots per step; it stops early, never overflows
    small = _run(
        tiny_cfg,
        tiny_q,
        toks,
        lens,
        DecodeConfig(mode="hspec", max_new_tokens=MAX_NEW, tree=dc.tree),
        cap=48,
    )
    got = _tokens(small)
    for b, t in enumerate(got):
        assert t == free[b][: len(t)] and int(small.cache.lengths[b]) <= 48
        if len(t) < MAX_NEW:  # stopped for room: another step would not have fitted
            assert int(small.cache.lengths[b]) + 21 > 48 and int(small.finish[b]) == LENGTH
    assert len(got[1]) < MAX_NEW  # the 16-token prompt runs out of room


@pytest.mark.parametrize("levels", [("w4a4", "w4a8", "w4a16"), ("w4a4", "w4a16")])
def test_hspec_sampling_matches_w4a16_distribution(tiny_cfg, tiny_q, levels):
    """At temperature > 0 a hierarchy's tokens are distributed as W4A16 sampling's.

    Same design as QSpec's test (tests/test_qspec.py): 2048 rows of one prompt, top-k 4 on
    every level, the 2nd and 3rd generated tokens (the first produced by a hierarchy step),
    two-sample chi-square on their joint distribution with categories under 20 total counts
    merged, significance 1e-3 (a correct rule fails once in a thousand seeds). The tree
    level must reject a fair share of drafts (W4A4 against W4A8 or W4A16), else a rule that
    passed drafts through unverified would go unnoticed.
    """
    b = 2048
    toks = jnp.broadcast_to(jnp.asarray([[5, 6, 7, 8, 9, 10, 11, 12]], jnp.int32), (b, 8))
    lens = jnp.full((b,), 8, jnp.int32)
    sc = SamplingConfig(temperature=1.0, top_k=4)
    ar = _run(
        tiny_cfg,
        tiny_q,
        toks,
        lens,
        DecodeConfig(mode="w4a16", max_new_tokens=3, sampling=sc),
        cap=32,
        seed=1,
    )
    tree = TreeConfig.from_branching((2, 1))
    dc = DecodeConfig(mode="hspec", max_new_tokens=3, sampling=sc, tree=tree, levels=levels)
    hs = _run(tiny_cfg, tiny_q, toks, lens, dc, cap=32, seed=2)
    tree_acc = float(hs.tree_accepted.sum() / (hs.verify_steps.sum() * tree.depth))
    assert tree_acc < 0.95, f"tree drafts nearly always accepted ({tree_acc}): not sensitive"
    a = np.asarray(ar.out_tokens[:, 1:3])
    q = np.asarray(hs.out_tokens[:, 1:3])
    keys = sorted({tuple(r) for r in a} | {tuple(r) for r in q})
    index = {k: i for i, k in enumerate(keys)}
    ca = np.bincount([index[tuple(r)] for r in a], minlength=len(keys))
    cq = np.bincount([index[tuple(r)] for r in q], minlength=len(keys))
    big = (ca + cq) >= 20
    table = np.stack([np.append(ca[big], ca[~big].sum()), np.append(cq[big], cq[~big].sum())])
    table = table[:, table.sum(0) > 0]
    assert table.shape[1] >= 5, "too few categories for a meaningful test"
    assert stats.chi2_contingency(table)[1] > 1e-3


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(tree=None), "needs a draft tree"),
        (dict(levels=("w4a4", "w4a8")), "not a hierarchy"),
        (dict(levels=("w4a16", "w4a4", "w4a16")), "cheaper to more exact"),
        (dict(levels=("w4a4",)), "not a hierarchy"),
        (dict(levels=("fp", "w4a16")), "not a hierarchy"),
        (dict(tree=(0, 2)), "positive integers"),
        (dict(tree=(1,) * 17), "depth must be at most 16"),
    ],
)
def test_bad_hierarchies_are_rejected(kw, match):
    kw = {"tree": (4, 2, 1), **kw}
    with pytest.raises(ValueError, match=match):
        DecodeConfig(mode="hspec", **kw)


# ---------------------------------------------------------------- API and CLI
@pytest.fixture(scope="module")
def tiny_engine():
    import qspec_jax

    return qspec_jax.load("tiny", quant="rtn", group_size=32, progress=False)


def test_api_hspec_equals_w4a16_and_reports_statistics(tiny_engine):
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20]]
    ref = tiny_engine.generate(prompts, mode="w4a16", max_new_tokens=12)
    got = tiny_engine.generate(
        prompts, mode="hspec", max_new_tokens=12, tree="3,1", levels="w4a4,w4a8,w4a16"
    )
    assert got.tokens == ref.tokens and got.finish_reasons == ref.finish_reasons
    s = got.stats
    assert s["levels"] == ["w4a4", "w4a8", "w4a16"] and s["tree_nodes"] == 7
    assert s["tree_depth"] == 2 and 1.0 <= s["mean_tokens_per_step"] <= 4.0
    assert 0 <= s["draft_tokens_accepted"] <= s["draft_tokens_proposed"]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(tree="4,x"), "not a comma-separated list"),
        (dict(tree=(4, 0)), "positive integers"),
        (dict(levels="w4a16,w4a4"), "not a hierarchy"),
        (dict(levels=("w4a8", "w4a4", "w4a16")), "cheaper to more exact"),
        (dict(adaptive_gamma=True), "qspec only"),
    ],
)
def test_api_rejects_bad_hierarchy_in_one_sentence(tiny_engine, kw, match):
    import qspec_jax

    with pytest.raises(qspec_jax.UsageError, match=match) as e:
        tiny_engine.generate([[5, 6]], mode="hspec", **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--tree", "4,two,1"], "not a comma-separated list"),
        (["--levels", "w4a4,w4a4,w4a16"], "cheaper to more exact"),
        (["--levels", "w4a4,w4a8"], "not a hierarchy"),
    ],
)
def test_cli_rejects_bad_tree_or_levels_with_exit_2(capsys, extra, needle):
    from qspec_jax.cli import main

    code = main(["generate", "--mode", "hspec", "--prompt", "x", *extra])
    out, err = capsys.readouterr()
    assert code == 2 and needle in err and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
