"""Draft trees with a static topology: the ancestor mask, tree acceptance, path compaction.

A tree of N nodes is fixed at trace time (`TreeConfig`). Node 0 is the root (the last committed
token, whose K/V are not yet in the cache); every other node is a drafted token whose parent has
a smaller index, and nodes are ordered by depth (breadth first), so the nodes of one depth form a
contiguous slice and one forward per depth drafts the next level. During a step node i lives at
cache slot `base + i` (base = the committed length) with RoPE position `base + depth(i)`, and it
attends to the committed cache and to its own ancestors (`attention_mask`).

After verification the longest accepted root-to-node path is kept: its K/V are gathered from
the tree slots into the contiguous positions base + 0..n (`compact_path`); the rest is dropped by
the cache length, as after a QSpec step.

Acceptance:

* greedy (`accept_greedy`): node c is accepted iff its token equals the verifier's argmax at its
  parent and its parent is accepted; the deepest accepted node (first by index on ties) ends the
  path, and the verifier's argmax there is the bonus token.
* sampling (`accept_sampling`): the children of a node are drawn i.i.d. from the drafter's
  distribution q at that node. Multi-draft recursive rejection sampling (SpecInfer's rule with
  one q): try the children in order, accept child x with probability min(1, p(x) / q(x)); on a
  rejection set p <- normalize(max(0, p - q)) and try the next sibling; when every child is
  rejected, draw from the residual p. By induction over the siblings the emitted token is
  distributed as the verifier's p (each step outputs min(q, p_j) + max(0, p_j - q) = p_j), and
  the accepted child's subtree was drawn given its path only, so the whole output sequence is
  distributed as autoregressive sampling from the verifier.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qspec_jax.cache.kv_cache import KVCache
from qspec_jax.decoding.sampling import sample_from_probs

MAX_TREE_NODES = 256


@dataclasses.dataclass(frozen=True)
class TreeConfig:
    """A static draft-tree topology (hashable: part of the jit-static decode config).

    Attributes:
        parents: parents[i] is the parent of node i; parents[0] = -1 (the root). Every parent
            index is smaller than its child's and depths never decrease along the indices.
    """

    parents: tuple[int, ...]

    def __post_init__(self):
        par = tuple(int(p) for p in self.parents)
        object.__setattr__(self, "parents", par)
        if not par or par[0] != -1:
            raise ValueError("a tree's node 0 is the root: parents must start with -1")
        if len(par) > MAX_TREE_NODES:
            raise ValueError(f"a tree has at most {MAX_TREE_NODES} nodes, got {len(par)}")
        if len(par) < 2:
            raise ValueError("a tree needs at least one drafted node besides the root")
        depth = [0]
        for i, p in enumerate(par[1:], start=1):
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must be earlier nodes")
            depth.append(depth[p] + 1)
        if any(b < a for a, b in zip(depth, depth[1:])):
            raise ValueError("nodes must be ordered by depth (breadth first)")

    @classmethod
    def from_branching(cls, branching: Sequence[int]) -> TreeConfig:
        """Every node at depth d gets branching[d] children, e.g. (4, 2, 1): 4 + 8 + 8 drafts.

        Children of one node are consecutive, in the order of their parent.
        """
        branching = tuple(int(k) for k in branching)
        if not branching or any(k < 1 for k in branching):
            raise ValueError(f"branching must be positive integers per depth, got {branching}")
        parents, level = [-1], [0]
        for k in branching:
            nxt = []
            for p in level:
                for _ in range(k):
                    nxt.append(len(parents))
                    parents.append(p)
                    if len(parents) > MAX_TREE_NODES:
                        raise ValueError(
                            f"branching {branching} gives more than {MAX_TREE_NODES} nodes"
                        )
            level = nxt
        return cls(tuple(parents))

    # ---------------------------------------------------------------- derived static arrays
    @property
    def num_nodes(self) -> int:
        """N, the root included."""
        return len(self.parents)

    @functools.cached_property
    def depths(self) -> np.ndarray:
        """int32 [N], depth of each node (root 0)."""
        d = np.zeros(self.num_nodes, np.int32)
        for i in range(1, self.num_nodes):
            d[i] = d[self.parents[i]] + 1
        return d

    @property
    def depth(self) -> int:
        """D, the longest root-to-leaf path in drafted tokens."""
        return int(self.depths.max())

    @functools.cached_property
    def ancestor_mask(self) -> np.ndarray:
        """bool [N, N]: mask[i, j] iff node j is node i or one of its ancestors."""
        n = self.num_nodes
        m = np.eye(n, dtype=bool)
        for i in range(1, n):
            m[i] |= m[self.parents[i]]
        return m

    @functools.cached_property
    def ancestor_at_depth(self) -> np.ndarray:
        """int32 [N, D + 1]: the ancestor of node i at depth d (i itself at its depth), -1 deeper."""
        out = np.full((self.num_nodes, self.depth + 1), -1, np.int32)
        for i in range(self.num_nodes):
            j = i
            while j >= 0:
                out[i, self.depths[j]] = j
                j = self.parents[j]
        return out

    @functools.cached_property
    def children(self) -> np.ndarray:
        """int32 [N, K]: the children of each node in index order, -1 padded (K = max fan-out)."""
        kids = [[] for _ in range(self.num_nodes)]
        for i in range(1, self.num_nodes):
            kids[self.parents[i]].append(i)
        k = max(len(c) for c in kids)
        out = np.full((self.num_nodes, k), -1, np.int32)
        for i, c in enumerate(kids):
            out[i, : len(c)] = c
        return out

    @functools.cached_property
    def child_rank(self) -> np.ndarray:
        """int32 [N]: the index of each node among its siblings (root 0)."""
        r = np.zeros(self.num_nodes, np.int32)
        for row in self.children:
            for j, c in enumerate(row):
                if c >= 0:
                    r[c] = j
        return r

    def depth_slice(self, d: int) -> tuple[int, int]:
        """[start, stop) of the nodes at depth d (contiguous: nodes are ordered by depth)."""
        idx = np.nonzero(self.depths == d)[0]
        return int(idx[0]), int(idx[-1]) + 1


def parse_branching(text: str) -> tuple[int, ...]:
    """Parses "4,2,1" into (4, 2, 1); raises ValueError (one sentence) on anything else."""
    try:
        out = tuple(int(s) for s in str(text).split(","))
    except ValueError:
        raise ValueError(
            f"tree {text!r} is not a comma-separated list of branching factors such as 4,2,1"
        ) from None
    TreeConfig.from_branching(out)  # validates
    return out


# -------------------------------------------------------------------- attention over a tree
def attention_mask(
    tree: TreeConfig, base: jnp.ndarray, start: int, stop: int, capacity: int
) -> jnp.ndarray:
    """Which cache slots the tree nodes start..stop-1 see, bool [batch, stop - start, capacity].

    Slot j is visible to node i iff j < base (the committed cache) or j = base + a for an
    ancestor a of i (itself included).

    Args:
        tree: the topology.
        base: int32 [batch], committed cache length (slot of the root).
        start, stop: static node range (the queries).
        capacity: cache capacity.
    """
    n = tree.num_nodes
    anc = jnp.asarray(tree.ancestor_mask[start:stop])  # [t, N]
    rel = jnp.arange(capacity, dtype=jnp.int32)[None, :] - base[:, None]  # [batch, capacity]
    in_tree = (rel >= 0) & (rel < n)  # [batch, capacity]
    col = jnp.clip(rel, 0, n - 1)  # [batch, capacity]
    tree_vis = anc[:, col]  # [t, batch, capacity]
    tree_vis = jnp.transpose(tree_vis, (1, 0, 2)) & in_tree[:, None, :]  # [batch, t, capacity]
    return (rel < 0)[:, None, :] | tree_vis


def rope_positions(tree: TreeConfig, base: jnp.ndarray, start: int, stop: int) -> jnp.ndarray:
    """RoPE positions base + depth of nodes start..stop-1, int32 [batch, stop - start]."""
    return base[:, None] + jnp.asarray(tree.depths[start:stop])[None, :]


# -------------------------------------------------------------------- acceptance
def _emit(tokens: jnp.ndarray, path: jnp.ndarray, n: jnp.ndarray, bonus: jnp.ndarray):
    """emitted [batch, D + 1]: the path's drafted tokens (depth 1..n) then the bonus token."""
    d = path.shape[1] - 1
    drafted = jnp.take_along_axis(tokens, jnp.maximum(path[:, 1:], 0), axis=1)  # [batch, D]
    drafted = jnp.concatenate([drafted, bonus[:, None]], axis=1)  # [batch, D + 1]
    j = jnp.arange(d + 1)[None, :]
    return jnp.where(j < n[:, None], drafted, bonus[:, None]).astype(jnp.int32)


def accept_greedy(tree: TreeConfig, tokens: jnp.ndarray, target_logits: jnp.ndarray):
    """Greedy tree acceptance: the longest root-to-node path the verifier's argmax agrees with.

    Args:
        tree: the topology.
        tokens: int32 [batch, N], node tokens (tokens[:, 0] is the root).
        target_logits: [batch, N, V] verifier logits at every node.

    Returns:
        (n int32 [batch] accepted drafted tokens = depth of the last accepted node,
        path int32 [batch, D + 1] node indices of the accepted path by depth (valid up to n),
        emitted int32 [batch, D + 1] the n accepted tokens then the verifier's token after them).
    """
    target = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [batch, N]
    parent = jnp.asarray(np.maximum(np.asarray(tree.parents), 0))  # [N]
    match = tokens == target[:, parent]  # [batch, N]
    match = match.at[:, 0].set(True)
    anc = jnp.asarray(tree.ancestor_mask)  # [N, N]
    accepted = ~jnp.any(anc[None] & ~match[:, None, :], axis=-1)  # [batch, N]
    depth = jnp.asarray(tree.depths)  # [N]
    score = jnp.where(accepted, depth[None, :], -1)  # [batch, N]
    best = jnp.argmax(score, axis=-1).astype(jnp.int32)  # [batch] deepest, first on ties
    n = depth[best]  # [batch]
    path = jnp.asarray(tree.ancestor_at_depth)[best]  # [batch, D + 1]
    bonus = jnp.take_along_axis(target, best[:, None], axis=1)[:, 0]  # [batch]
    return n, path, _emit(tokens, path, n, bonus)


def accept_sampling(
    tree: TreeConfig,
    tokens: jnp.ndarray,
    q_probs: jnp.ndarray,
    p_probs: jnp.ndarray,
    key: jax.Array,
):
    """Multi-draft recursive rejection sampling down the tree (output distributed as p).

    Args:
        tree: the topology.
        tokens: int32 [batch, N]; the children of node i were drawn i.i.d. from q_probs[:, i].
        q_probs: [batch, N, V] the drafter's distributions at each node (rows of leaves unused).
        p_probs: [batch, N, V] the verifier's distributions at each node (same filtering).
        key: PRNG key.

    Returns:
        (n [batch], path [batch, D + 1], emitted [batch, D + 1]) as in `accept_greedy`.
    """
    b = tokens.shape[0]
    d_max = tree.depth
    children = jnp.asarray(tree.children)  # [N, K]
    k_max = children.shape[1]

    def row(x, idx):  # x [batch, N, ...], idx [batch] -> [batch, ...]
        return jnp.take_along_axis(x, idx.reshape((b,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]

    cur = jnp.zeros((b,), jnp.int32)
    alive = jnp.ones((b,), bool)
    n = jnp.zeros((b,), jnp.int32)
    bonus = jnp.zeros((b,), jnp.int32)
    path = jnp.zeros((b, d_max + 1), jnp.int32)
    keys = jax.random.split(key, d_max * (k_max + 1) + 1)
    for d in range(d_max):
        p_res = row(p_probs, cur)  # [batch, V]
        q = row(q_probs, cur)  # [batch, V]
        kids = children[cur]  # [batch, K]
        moved = jnp.zeros((b,), bool)
        nxt = cur
        for j in range(k_max):
            c = kids[:, j]  # [batch]
            valid = alive & ~moved & (c >= 0)
            x = jnp.take_along_axis(tokens, jnp.maximum(c, 0)[:, None], axis=1)  # [batch, 1]
            px = jnp.take_along_axis(p_res, x, axis=1)[:, 0]  # [batch]
            qx = jnp.take_along_axis(q, x, axis=1)[:, 0]
            u = jax.random.uniform(keys[d * (k_max + 1) + j], (b,))
            acc = valid & (u * qx < px)  # u < p/q without dividing by a zero q
            nxt = jnp.where(acc, c, nxt)
            moved = moved | acc
            res = jnp.maximum(p_res - q, 0.0)  # [batch, V]
            mass = res.sum(-1, keepdims=True)
            res = jnp.where(mass > 0, res / jnp.where(mass > 0, mass, 1.0), p_res)
            p_res = jnp.where((valid & ~acc)[:, None], res, p_res)
        stop = alive & ~moved  # every child rejected (or none): draw from the residual
        extra = sample_from_probs(p_res, keys[d * (k_max + 1) + k_max])
        bonus = jnp.where(stop, extra, bonus)
        alive = alive & moved
        n = n + alive.astype(jnp.int32)
        cur = jnp.where(alive, nxt, cur)
        path = path.at[:, d + 1].set(jnp.where(alive, cur, -1))
    leaf = sample_from_probs(row(p_probs, cur), keys[-1])  # reached depth D: draw from p
    bonus = jnp.where(alive, leaf, bonus)
    return n, path, _emit(tokens, path, n, bonus)


# -------------------------------------------------------------------- K/V compaction
def compact_path(cache: KVCache, base: jnp.ndarray, path: jnp.ndarray, n: jnp.ndarray) -> KVCache:
    """Moves the accepted path's K/V from the tree slots to contiguous positions.

    For every sequence b and depth 1 <= d <= n[b], slot base[b] + d receives the K/V of slot
    base[b] + path[b, d] (all layers). Nothing else changes; entries past the new length are
    dropped by the caller's length update. Reads happen before writes (a functional gather), so
    overlapping source and destination slots are safe.

    Args:
        cache: the KV cache holding the tree at slots base + 0..N-1.
        base: int32 [batch], the root's slot.
        path: int32 [batch, D + 1], node indices by depth (path[:, 0] is the root).
        n: int32 [batch], accepted depth.
    """
    d = jnp.arange(1, path.shape[1], dtype=jnp.int32)[None, :]  # [1, D]
    cap = cache.capacity
    src = jnp.clip(base[:, None] + path[:, 1:], 0, cap - 1)  # [batch, D]
    dst = jnp.where(d <= n[:, None], base[:, None] + d, cap)  # [batch, D]; cap -> dropped

    def one(c, s, t):  # c [layers, capacity, kv_heads, hd], s/t [D]
        return c.at[:, t].set(c[:, s], mode="drop")

    move = jax.vmap(one, in_axes=(1, 0, 0), out_axes=1)
    with jax.named_scope("compact_path"):
        return cache.replace(k=move(cache.k, src, dst), v=move(cache.v, src, dst))
