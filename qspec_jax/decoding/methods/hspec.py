"""SpecMQuant's hierarchy on one int4 weight copy and one KV cache (`HSpec`, mode "hspec").

One step, for every sequence of the batch at once:

1. level 1 drafts a static tree (`qspec_jax.decoding.tree.TreeConfig`) in the cheapest precision
   (default W4A4): one forward per depth over that depth's nodes, each node attending to the
   committed cache and its ancestors, at RoPE position base + depth; the children of a node are
   the drafter's top-k tokens there (greedy) or i.i.d. draws from its distribution (sampling).
2. with three levels, level 2 (default W4A8) verifies the whole tree in ONE forward, overwriting
   the tree's K/V, keeps the longest accepted root-to-node path and appends its own next token:
   a sequence draft of n2 + 1 tokens.
3. the last level (W4A16) verifies that sequence exactly as QSpec verifies its drafts: one
   forward over [last token, sequence] at the contiguous positions base + 0..D+1, overwriting
   their K/V; the accepted prefix plus the verifier's own next token is committed and the
   length moves back past the rest.

With two levels the tree goes straight to W4A16: the tree verification is the last level, and
the accepted path's K/V are moved from the tree slots to contiguous positions
(`tree.compact_path`). A chain tree, e.g. (1, 1, 1), makes level 1 a sequence drafter (W4A4
sequence into W4A8 into W4A16).

Exactness: every committed token is the last level's greedy choice (or, when sampling, drawn so
that the output is distributed as the last level's sampling): the levels below only propose.
For sampling, level 2 accepts the tree with multi-draft recursive rejection (its output sequence
is distributed as autoregressive sampling from level 2), so the last level applies standard
speculative sampling with q = level 2's distribution at each position of the sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qspec_jax.config import LEVEL_PRECISIONS, LlamaConfig, QuantConfig
from qspec_jax.decoding import tree as tr
from qspec_jax.decoding.accept import accept_greedy, accept_sampling
from qspec_jax.decoding.methods.base import DecodingMethod, MethodError
from qspec_jax.decoding.sampling import filtered_probs, sample_from_probs
from qspec_jax.decoding.state import commit
from qspec_jax.model.llama import forward
from qspec_jax.model.params import Params

MAX_TREE_DEPTH = 16


def check_levels(levels) -> tuple[str, ...]:
    """Validates a hierarchy's precisions; returns them as a tuple or raises ValueError.

    Two or three of "w4a4" < "w4a8" < "w4a16", strictly increasing, ending in "w4a16" (the
    precision whose greedy output the hierarchy reproduces).
    """
    if isinstance(levels, str):
        levels = tuple(s.strip() for s in levels.split(","))
    levels = tuple(levels)
    if "model" in levels:
        raise NotImplementedError(
            "a separate draft model as SpecMQuant's first level (model -> w4a8 -> w4a16) is "
            "not built yet: use mode 'draftmodel', the draft model as a sequence drafter"
        )
    bad = [lv for lv in levels if lv not in LEVEL_PRECISIONS]
    if bad or len(levels) not in (2, 3) or levels[-1] != "w4a16":
        raise MethodError(
            f"levels {','.join(map(str, levels))!r} are not a hierarchy: give 2 or 3 of "
            f"{', '.join(LEVEL_PRECISIONS)} from cheapest to w4a16, e.g. w4a4,w4a8,w4a16"
        )
    order = [LEVEL_PRECISIONS.index(lv) for lv in levels]
    if any(b <= a for a, b in zip(order, order[1:])):
        raise MethodError(
            f"levels {','.join(levels)!r} must go from cheaper to more exact without repeats, "
            "e.g. w4a4,w4a8,w4a16 or w4a4,w4a16"
        )
    return levels


def check_tree(tree) -> tr.TreeConfig:
    """A TreeConfig from a TreeConfig or branching factors per depth; raises ValueError."""
    if isinstance(tree, str):
        tree = tr.parse_branching(tree)
    if not isinstance(tree, tr.TreeConfig):
        try:
            tree = tr.TreeConfig.from_branching(tuple(tree))
        except TypeError:
            raise MethodError(
                f"tree {tree!r} is not a list of branching factors such as (4, 2, 1)"
            ) from None
    if tree.depth > MAX_TREE_DEPTH:
        raise MethodError(f"tree depth must be at most {MAX_TREE_DEPTH}, got {tree.depth}")
    return tree


def tokens_per_step(tree: tr.TreeConfig, levels: tuple[str, ...]) -> int:
    """Cache positions one step may write: the tree, or the sequence of the last level."""
    return max(tree.num_nodes, tree.depth + 2) if len(levels) == 3 else tree.num_nodes


def _tree_forward(params, tokens, cache, base, tree, start, stop, precision, cfg, qcfg, impl):
    """Forward of tree nodes start..stop-1 (tokens [batch, stop - start]) at their tree slots."""
    cap = cache.capacity
    logits, cache = forward(
        params,
        tokens,
        cache.replace(lengths=base + start),
        cfg,
        qcfg,
        precision,
        impl=impl,
        rope_positions=tr.rope_positions(tree, base, start, stop),
        attn_mask=tr.attention_mask(tree, base, start, stop, cap),
    )  # [batch, stop - start, V]
    return logits, cache.replace(lengths=base)


def draft_tree(state, params: Params, cfg: LlamaConfig, qcfg: QuantConfig, dc, m):
    """Level 1: drafts the tree depth by depth in `m.levels[0]`, writing its K/V.

    `m` is the `HSpec` method (its tree and levels); `dc` the decode config.
    Returns (cache, tokens int32 [batch, N] with tokens[:, 0] = last_token, q_probs float32
    [batch, N, V] the drafter's distribution at each node (None when greedy), key).
    """
    tree, sc = m.tree, dc.sampling
    b = state.last_token.shape[0]
    base = state.cache.lengths  # [batch]
    tokens = jnp.zeros((b, tree.num_nodes), jnp.int32).at[:, 0].set(state.last_token)
    q_probs = None if sc.greedy else jnp.zeros((b, tree.num_nodes, cfg.vocab_size), jnp.float32)
    cache, key = state.cache, state.key
    parents = np.asarray(tree.parents)
    for d in range(tree.depth):
        s, e = tree.depth_slice(d)
        ns, ne = tree.depth_slice(d + 1)
        with jax.named_scope(f"draft_depth{d}"):
            logits, cache = _tree_forward(
                params, tokens[:, s:e], cache, base, tree, s, e, m.levels[0], cfg, qcfg, dc.impl
            )  # [batch, e - s, V]
            par = parents[ns:ne] - s  # [ne - ns] parent of each child, local to this depth
            rank = tree.child_rank[ns:ne]  # [ne - ns]
            if sc.greedy:
                k = int(rank.max()) + 1
                top = jax.lax.top_k(logits, k)[1]  # [batch, e - s, k]
                child = top[:, par, rank]  # [batch, ne - ns]
            else:
                q = filtered_probs(logits, sc)  # [batch, e - s, V]
                key, sub = jax.random.split(key)
                child = sample_from_probs(q[:, par], sub)  # [batch, ne - ns] i.i.d. per child
                q_probs = q_probs.at[:, s:e].set(q)
            tokens = tokens.at[:, ns:ne].set(child.astype(jnp.int32))
    return cache, tokens, q_probs, key


def hspec_step(state, params: Params, cfg: LlamaConfig, qcfg: QuantConfig, dc, m):
    """One hierarchical round: tree draft, tree verify (-> sequence), sequence verify."""
    tree, sc, levels = m.tree, dc.sampling, m.levels
    n_nodes, depth = tree.num_nodes, tree.depth
    base = state.cache.lengths  # [batch]
    cache, tokens, q_probs, key = draft_tree(state, params, cfg, qcfg, dc, m)

    with jax.named_scope("verify_tree"):  # level 2 (or the last level with two levels)
        logits2, cache = _tree_forward(
            params,
            tokens,
            cache,
            base,
            tree,
            0,
            n_nodes,
            levels[-2 if len(levels) == 3 else -1],
            cfg,
            qcfg,
            dc.impl,
        )  # [batch, N, V]
        key, sub = jax.random.split(key)
        if sc.greedy:
            n2, path, emitted = tr.accept_greedy(tree, tokens, logits2)
            p2 = None
        else:
            p2 = filtered_probs(logits2, sc)  # [batch, N, V]
            n2, path, emitted = tr.accept_sampling(tree, tokens, q_probs, p2, sub)
    # emitted [batch, D + 1]: n2 accepted tree tokens, then the level's own next token

    if len(levels) == 2:
        cache = tr.compact_path(cache, base, path, n2)
        n, n_emit, proposed = n2, n2 + 1, jnp.full_like(n2, depth)
        # emitted[:, j] was chosen from the tree verifier's logits at path node j
        out_logits = None
        if dc.logprobs:
            out_logits = jnp.take_along_axis(
                logits2, jnp.maximum(path, 0)[:, :, None], axis=1
            )  # [batch, D + 1, V]
    else:
        with jax.named_scope("verify_sequence"):  # level 3, as QSpec's verification
            seq = jnp.concatenate([state.last_token[:, None], emitted], axis=1)  # [batch, D + 2]
            m = n2 + 1  # [batch] draft tokens handed to the last level
            logits3, cache = forward(
                params, seq, cache, cfg, qcfg, levels[-1], impl=dc.impl
            )  # [batch, D + 2, V]
            key, sub = jax.random.split(key)
            if sc.greedy:
                n, emitted = accept_greedy(seq, logits3, m[:, None])
            else:
                # q of sequence token i + 1 = level 2's distribution at path node i (i <= n2);
                # zero rows past the draft make the residual there p itself (the bonus draw)
                q_seq = jnp.take_along_axis(
                    p2, jnp.maximum(path, 0)[:, :, None], axis=1
                )  # [batch, D + 1, V]
                real = jnp.arange(depth + 1)[None, :, None] < m[:, None, None]
                q_seq = jnp.where(real, q_seq, 0.0)
                p3 = filtered_probs(logits3, sc)  # [batch, D + 2, V]
                n, emitted = accept_sampling(seq, q_seq, p3, sub, m[:, None])
        n_emit, proposed = n + 1, m
        out_logits = logits3  # emitted[:, j] was chosen from logits3[:, j]

    act = (~state.done).astype(jnp.int32)
    carry: HSpecCarry = state.carry
    carry = carry.replace(
        draft_proposed=carry.draft_proposed + proposed * act,
        draft_accepted=carry.draft_accepted + n * act,
        tree_accepted=carry.tree_accepted + n2 * act,
        spec_steps=carry.spec_steps + 1,
    )
    return commit(state.replace(key=key, carry=carry), emitted, n_emit, cache, dc, out_logits)


@struct.dataclass
class HSpecCarry:
    """What the hierarchy counts.

    Attributes:
        draft_proposed: int32 [batch], tokens handed to the last level (three levels: the
            tree verifier's path + 1; two levels: the tree depth) while the sequence was active.
        draft_accepted: int32 [batch], of those, tokens the last level accepted.
        tree_accepted: int32 [batch], drafted tokens the tree verifier accepted.
        spec_steps: int32 [], steps run.
    """

    draft_proposed: jnp.ndarray
    draft_accepted: jnp.ndarray
    tree_accepted: jnp.ndarray
    spec_steps: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class HSpec(DecodingMethod):
    """SpecMQuant's hierarchy (arXiv 2505.22179) on one int4 weight copy and one KV cache.

    Attributes:
        tree: the static draft tree: a `TreeConfig`, branching factors per depth such as
            (4, 2, 1), or the string "4,2,1".
        levels: two or three precisions, cheapest first, ending in "w4a16": the tree drafter,
            (the tree verifier,) the sequence verifier; a tuple or "w4a4,w4a8,w4a16".
    """

    name: ClassVar[str] = "hspec"
    summary: ClassVar[str] = (
        "SpecMQuant's hierarchy: a W4A4 draft tree, verified into a sequence by W4A8, "
        "verified by W4A16"
    )
    kv_caches: ClassVar[tuple[str, ...]] = ("float",)

    tree: Any = (4, 2, 1)
    levels: tuple[str, ...] = ("w4a4", "w4a8", "w4a16")

    def __post_init__(self):
        if self.tree is None:
            raise MethodError("mode 'hspec' needs a draft tree, e.g. tree=(4, 2, 1)")
        object.__setattr__(self, "tree", check_tree(self.tree))
        object.__setattr__(self, "levels", check_levels(self.levels))

    @property
    def tokens_per_step(self) -> int:
        return tokens_per_step(self.tree, self.levels)

    @property
    def main_precision(self) -> str:
        return self.levels[-1]

    @property
    def precisions(self) -> tuple[str, ...]:
        return self.levels

    @property
    def draft_precision(self) -> str:
        return self.levels[0]

    def _cache_refusal(self, kv_cache: str) -> str:
        return "mode 'hspec' verifies trees, which need kv_cache='float'"

    def init_carry(self, batch: int) -> HSpecCarry:
        zeros = jnp.zeros((batch,), jnp.int32)
        return HSpecCarry(zeros, zeros, zeros, jnp.zeros((), jnp.int32))

    def step(self, state, params, cfg, qcfg, dc):
        return hspec_step(state, params, cfg, qcfg, dc, self)

    def stats(self, carry, rows, generated, verify_steps) -> dict[str, Any]:
        prop = int(carry.draft_proposed[:rows].sum())
        acc = int(carry.draft_accepted[:rows].sum())
        v = verify_steps
        tree_acc = int(carry.tree_accepted[:rows].sum())
        return dict(
            tree=list(self.tree.parents),
            tree_nodes=self.tree.num_nodes,
            tree_depth=self.tree.depth,
            levels=list(self.levels),
            # drafted tokens the tree verifier kept per step (three levels: W4A8's path)
            tree_accepted_per_step=tree_acc / v if v else float("nan"),
            # tokens handed to the last level (three levels: path + 1; two: tree depth)
            draft_tokens_proposed=prop,
            draft_tokens_accepted=acc,
            acceptance_rate=acc / prop if prop else float("nan"),
            mean_tokens_per_step=(generated - rows) / v if v else float("nan"),
            verify_steps=v,
        )
