"""Draft-tree primitives (qspec_jax.decoding.tree): topology, ancestor mask, greedy and sampling
acceptance, path compaction, and the one-forward tree verification of the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from qspec_jax.cache import KVCache
from qspec_jax.decoding import tree as tr

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def trees(draw, max_nodes=24):
    """Random topologies: either branching per depth or breadth-first parent lists."""
    if draw(st.booleans()):
        br = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
        return tr.TreeConfig.from_branching(br)
    n = draw(st.integers(2, max_nodes))
    parents, depth = [-1], [0]
    for i in range(1, n):
        # any earlier node whose depth keeps the breadth-first order
        ok = [p for p in range(i) if depth[p] + 1 >= depth[-1]]
        p = draw(st.sampled_from(ok))
        parents.append(p)
        depth.append(depth[p] + 1)
    return tr.TreeConfig(tuple(parents))


def _ancestors(tree, i):
    out = []
    while i >= 0:
        out.append(i)
        i = tree.parents[i]
    return out[::-1]  # root first


# ---------------------------------------------------------------- topology
@SETTINGS
@given(trees())
def test_mask_is_the_ancestor_relation(tree):
    m = tree.ancestor_mask
    n = tree.num_nodes
    for i in range(n):
        anc = set(_ancestors(tree, i))
        assert {j for j in range(n) if m[i, j]} == anc
        assert tree.depths[i] == len(anc) - 1
        assert list(tree.ancestor_at_depth[i, : tree.depths[i] + 1]) == _ancestors(tree, i)
        assert (tree.ancestor_at_depth[i, tree.depths[i] + 1 :] == -1).all()
    # children table and ranks invert the parent list
    for i in range(1, n):
        assert tree.children[tree.parents[i], tree.child_rank[i]] == i
    # each depth is one contiguous slice
    for d in range(tree.depth + 1):
        a, b = tree.depth_slice(d)
        assert (tree.depths[a:b] == d).all() and (tree.depths == d).sum() == b - a
    assert hash(tree) == hash(tr.TreeConfig(tree.parents)) and tree == tr.TreeConfig(tree.parents)


def test_branching_shape_and_bad_trees_rejected():
    t = tr.TreeConfig.from_branching((4, 2, 1))
    assert t.num_nodes == 1 + 4 + 8 + 8 and t.depth == 3
    assert tr.parse_branching("4,2,1") == (4, 2, 1)
    for bad in ("4,x", "0,2", "", "4,,1"):
        with pytest.raises(ValueError):
            tr.parse_branching(bad)
    with pytest.raises(ValueError, match="earlier nodes"):
        tr.TreeConfig((-1, 2, 0))
    with pytest.raises(ValueError, match="breadth first"):
        tr.TreeConfig((-1, 0, 1, 0))
    with pytest.raises(ValueError, match="root"):
        tr.TreeConfig((0, 0))


@SETTINGS
@given(trees(), st.lists(st.integers(0, 5), min_size=2, max_size=2), st.integers(0, 3), st.data())
def test_attention_mask_sees_committed_cache_and_ancestors(tree, bases, start_depth, data):
    start_depth = min(start_depth, tree.depth)
    start, stop = tree.depth_slice(start_depth)
    cap = max(bases) + tree.num_nodes + 3
    base = jnp.asarray(bases, jnp.int32)
    m = np.asarray(tr.attention_mask(tree, base, start, stop, cap))
    assert m.shape == (2, stop - start, cap)
    for b, bs in enumerate(bases):
        for qi, i in enumerate(range(start, stop)):
            want = [
                j < bs or (0 <= j - bs < tree.num_nodes and tree.ancestor_mask[i, j - bs])
                for j in range(cap)
            ]
            assert m[b, qi].tolist() == want
    pos = np.asarray(tr.rope_positions(tree, base, start, stop))
    assert (pos == np.asarray(bases)[:, None] + start_depth).all()


# ---------------------------------------------------------------- greedy acceptance
def _brute_force_greedy(tree, tokens, target):
    """Deepest node whose whole root path matches the verifier's argmax (first on ties)."""
    best, best_d = 0, 0
    for i in range(1, tree.num_nodes):
        path = _ancestors(tree, i)
        if all(tokens[c] == target[tree.parents[c]] for c in path[1:]) and tree.depths[i] > best_d:
            best, best_d = i, tree.depths[i]
    return best, best_d


@SETTINGS
@given(trees(), st.integers(0, 2**31 - 1))
def test_greedy_acceptance_picks_the_longest_matching_path(tree, seed):
    rng = np.random.default_rng(seed)
    v, b = 3, 4  # a tiny vocabulary so that matches are common
    tokens = rng.integers(0, v, (b, tree.num_nodes)).astype(np.int32)
    target = rng.integers(0, v, (b, tree.num_nodes))
    logits = np.eye(v, dtype=np.float32)[target] + rng.uniform(0, 0.1, (b, tree.num_nodes, v))
    n, path, emitted = tr.accept_greedy(tree, jnp.asarray(tokens), jnp.asarray(logits, jnp.float32))
    n, path, emitted = np.asarray(n), np.asarray(path), np.asarray(emitted)
    for r in range(b):
        best, d = _brute_force_greedy(tree, tokens[r], target[r])
        assert n[r] == d
        assert list(path[r, : d + 1]) == _ancestors(tree, best)
        want = [tokens[r, c] for c in _ancestors(tree, best)[1:]] + [target[r, best]]
        assert list(emitted[r, : d + 1]) == want


# ---------------------------------------------------------------- compaction
@SETTINGS
@given(trees(), st.data())
def test_compaction_moves_exactly_the_path(tree, data):
    b, layers, kvh, hd = 3, 2, 1, 2
    bases = data.draw(st.lists(st.integers(0, 6), min_size=b, max_size=b))
    cap = max(bases) + tree.num_nodes + 2
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    k = rng.normal(size=(layers, b, cap, kvh, hd)).astype(np.float32)
    v = rng.normal(size=(layers, b, cap, kvh, hd)).astype(np.float32)
    ends = [data.draw(st.integers(0, tree.num_nodes - 1)) for _ in range(b)]
    path = np.zeros((b, tree.depth + 1), np.int32)
    for r, e in enumerate(ends):
        path[r] = tree.ancestor_at_depth[e]
    n = np.asarray([tree.depths[e] for e in ends], np.int32)
    cache = KVCache(k=jnp.asarray(k), v=jnp.asarray(v), lengths=jnp.asarray(bases, jnp.int32))
    out = tr.compact_path(cache, jnp.asarray(bases, jnp.int32), jnp.asarray(path), jnp.asarray(n))
    for name, before, after in (("k", k, np.asarray(out.k)), ("v", v, np.asarray(out.v))):
        want = before.copy()
        for r in range(b):
            for d in range(1, n[r] + 1):
                want[:, r, bases[r] + d] = before[:, r, bases[r] + path[r, d]]
        np.testing.assert_array_equal(after, want, err_msg=name)


# ---------------------------------------------------------------- sampling acceptance
def _chain_probs(rng, v, depth, conc):
    """Markov-chain distributions: row [d, x] is the next-token distribution at depth d after x."""
    return rng.dirichlet(np.full(v, conc), size=(depth + 1, v)).astype(np.float32)


def _tree_draws(tree, q_tab, p_tab, n, root_tok, seed):
    """n independent draft trees (children i.i.d. from q at their parent) and their p / q rows."""
    rng = np.random.default_rng(seed)
    v = q_tab.shape[-1]
    toks = np.zeros((n, tree.num_nodes), np.int32)
    toks[:, 0] = root_tok
    for i in range(1, tree.num_nodes):
        par = tree.parents[i]
        q = q_tab[tree.depths[par], toks[:, par]]  # [n, V]
        cdf = np.cumsum(q, axis=1)
        u = rng.random((n, 1)) * cdf[:, -1:]
        toks[:, i] = np.minimum((u > cdf).sum(1), v - 1)
    dep = tree.depths[None, :]
    return toks, q_tab[dep, toks], p_tab[dep, toks]  # [n, N], [n, N, V], [n, N, V]


def _complete(emitted, n, p_tab, seed):
    """Continues each emitted prefix autoregressively from p up to D + 1 tokens."""
    rng = np.random.default_rng(seed)
    out = emitted.copy()
    rows, width = out.shape
    for j in range(1, width):
        need = n + 1 <= j  # token j was not emitted by the tree step
        q = p_tab[j, out[:, j - 1]]  # [rows, V]
        cdf = np.cumsum(q, axis=1)
        u = rng.random((rows, 1)) * cdf[:, -1:]
        draw = np.minimum((u > cdf).sum(1), q.shape[1] - 1)
        out[:, j] = np.where(need, draw, out[:, j])
    return out


def _chi2_pvalue(seqs, p_tab, root_tok):
    """Goodness of fit of the sequences [n, D + 1] to the chain p (cells by exact probability)."""
    v = p_tab.shape[-1]
    width = seqs.shape[1]
    idx = np.zeros(len(seqs), np.int64)
    for j in range(width):
        idx = idx * v + seqs[:, j]
    counts = np.bincount(idx, minlength=v**width)
    probs = np.ones(v**width)
    for cell in range(v**width):
        digits = [(cell // v ** (width - 1 - j)) % v for j in range(width)]
        prev = root_tok
        for j, x in enumerate(digits):
            probs[cell] *= p_tab[j, prev, x]
            prev = x
    expected = probs * len(seqs)
    big = expected >= 10  # cells with fewer than 10 expected counts merged into one
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


@pytest.mark.parametrize("branching", [(3, 2), (2, 2, 1)])
def test_tree_sampling_keeps_the_verifier_distribution(branching):
    """Tree speculative sampling emits sequences distributed as autoregressive sampling from p.

    Synthetic chain distributions over 4 tokens: p and q at a node depend on its depth and its
    token. 100k independent trees (children i.i.d. from q), accepted with `accept_sampling`; the
    emitted prefix is continued from p to D + 1 tokens, and the joint distribution of those
    D + 1 tokens is tested against the exact chain probabilities with a chi-square goodness-of-
    fit test at significance 1e-3: with a fixed seed the test is deterministic, and 1e-3 means
    a correct rule would fail for only one seed in a thousand, while 100k samples detect
    deviations of well under 1% of probability mass in the larger cells. The same test must
    reject the drafter's own sequences (the first child at each depth), so p and q differ
    enough for a wrong acceptance rule to be caught.
    """
    tree = tr.TreeConfig.from_branching(branching)
    v, n, root = 4, 100_000, 1
    rng = np.random.default_rng(7)
    p_tab = _chain_probs(rng, v, tree.depth, 2.0)
    q_tab = _chain_probs(rng, v, tree.depth, 2.0)
    toks, q_rows, p_rows = _tree_draws(tree, q_tab, p_tab, n, root, seed=11)
    acc = jax.jit(tr.accept_sampling, static_argnums=0)
    nacc, path, emitted = acc(
        tree, jnp.asarray(toks), jnp.asarray(q_rows), jnp.asarray(p_rows), jax.random.PRNGKey(3)
    )
    nacc, path, emitted = np.asarray(nacc), np.asarray(path), np.asarray(emitted)
    assert 0 < nacc.mean() < tree.depth, "all or nothing accepted: the test would be vacuous"
    # the path is a real root path of accepted nodes carrying the emitted tokens
    for r in range(200):
        d = nacc[r]
        assert list(path[r, : d + 1]) == list(tree.ancestor_at_depth[path[r, d], : d + 1])
        assert list(emitted[r, :d]) == [toks[r, c] for c in path[r, 1 : d + 1]]
    seqs = _complete(emitted, nacc, p_tab, seed=5)
    assert _chi2_pvalue(seqs, p_tab, root) > 1e-3
    # sensitivity: the drafter's first-child chain is far from p under the same test
    first = [0]
    for _ in range(tree.depth):
        first.append(int(tree.children[first[-1], 0]))
    draft_seqs = np.concatenate([toks[:, first[1:]], np.zeros((n, 1), np.int32)], axis=1)
    draft_seqs = _complete(draft_seqs, np.full(n, tree.depth - 1, np.int32), p_tab, seed=6)
    assert _chi2_pvalue(draft_seqs, p_tab, root) < 1e-6


def test_tree_sampling_with_one_hot_verifier_is_greedy():
    """With a one-hot p (temperature 0) and distinct siblings (as top-k drafting gives),
    sampling acceptance reduces to greedy acceptance. (With duplicate siblings the two differ
    legitimately: sampling takes the first matching sibling, greedy the deepest path.)"""
    tree = tr.TreeConfig.from_branching((3, 2))
    rng = np.random.default_rng(0)
    v, b = 3, 64
    tokens = np.zeros((b, tree.num_nodes), np.int32)
    for r in range(b):
        for kids in tree.children:
            kids = kids[kids >= 0]
            tokens[r, kids] = rng.permutation(v)[: len(kids)]
    logits = rng.normal(size=(b, tree.num_nodes, v)).astype(np.float32)
    p = jax.nn.one_hot(jnp.argmax(logits, -1), v)
    q = jnp.full((b, tree.num_nodes, v), 1.0 / v)
    ns, ps, es = tr.accept_sampling(tree, jnp.asarray(tokens), q, p, jax.random.PRNGKey(0))
    ng, pg, eg = tr.accept_greedy(tree, jnp.asarray(tokens), jnp.asarray(logits))
    np.testing.assert_array_equal(np.asarray(ns), np.asarray(ng))
    np.testing.assert_array_equal(np.asarray(es), np.asarray(eg))
