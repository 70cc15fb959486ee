"""The hierarchical-cache attention CPU kernel (`pallas_kernels.cpu_attention`, the "cpu" impl).

Against `hier_attention_reference` (dequantize everything, one exact float32 softmax) on real
`HierKVCache`s from hier_attention_test_base.py: both views, mixed lengths in one batch (79, 37, 5
with R = 16: sequence 37's float buffer wraps around the ring, sequence 5 has no quantized key),
query rows straddling float_start (rows 79..82 read positions 48..63 from floats, then codes),
head_dim 32 and 64, several 256-token splits and key groups of 32 and 128.

Tolerance: ATOL[float32] = 4e-6 * max|V| absolute, the bound hier_attention_test_base.py derives
for two float32 softmax orders (the kernel's online softmax over 32-key blocks and 256-key splits
against the reference's exact one). The kernel does not form the dequantized keys and values: it
folds the key scales into the query (score = (sum_d q[d] x0[d] + sum_d (q[d] step[d]) c[d]) /
sqrt(hd), c the integer code) and the value scales into the softmax weights (sum_j (p_j step_j) c_j
+ sum_j p_j x0_j). Each score then differs from the reference's by float32 rounding of the same
sum of hd products (a few ulps of sum_d |q[d]| |k[d]| / sqrt(hd), as the reference's own dot
product), which moves the output by at most 2 max|V| times that to first order; each value term
by a few ulps of its size, <= 3.2 max|V| (|x0| + 255 step); the kernel docstring states the bound
(csrc/hier_attention_cpu.cc, "Error bound"). The kernel's exp is a Cephes polynomial (relative
error about 1e-7). The tolerance is unchanged; measured: <= 6.8e-7 * max|V| on these cases
(2026-12-02, before: 7.3e-7).

Exactness properties checked bit for bit: a row's output is the same alone (t = 1, an
autoregressive step) as inside a t = 6 block (gamma = 5 verification) and in a batch of 3 as
alone; 40 identical calls give identical bits (threads over XLA's pool); entries no row may read
never matter; the cache's `attend` runs the kernel by default on CPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hier_attention_test_base import CASES, LAYER, Case, layer_args, max_err, reference, step, vmax

from pallas_kernels import cpu_attention, cpu_kernels, dispatch
from qspec_jax.cache import HierKVCache
from qspec_jax.cache.hierarchical import default_attention_impl
from qspec_jax.config import preset

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}",
)

ATOL = 4e-6  # times max|V|, see the module docstring

# float32 cases: the base's four, the base's R = 128 case in float32, and a SmolLM2-like head
# (hd 64, 9 query heads on 3 KV heads) at R = 32, G = 32 with codes over three 256-token splits.
F32_CASES = tuple(c for c in CASES if c.dtype == jnp.float32) + (
    Case("target-t8-r128", "target", 8, lens=(300, 700), residual=128, capacity=640),
    Case("draft-t8-r128", "draft", 8, lens=(300, 700), residual=128, capacity=640),
    Case("target-t6-hd64", "target", 6, 9, 3, 64, (700, 150, 1), 32, capacity=720, seed=5),
    Case("draft-t6-hd64", "draft", 6, 9, 3, 64, (700, 150, 1), 32, capacity=720, seed=5),
)
HD64 = {c.view: c for c in F32_CASES if c.head_dim == 64}


_cpu = jax.jit(cpu_attention.hier_attention_cpu, static_argnames=("residual", "view"))


def _run(cache, q, pos, view, **kw):
    return np.asarray(_cpu(*layer_args(cache, q, pos, view, **kw), residual=cache.layout.residual,
                           view=view))  # fmt: skip


@pytest.mark.parametrize("case", F32_CASES, ids=[c.name for c in F32_CASES])
def test_matches_reference(case):
    cache, q, pos = step(case)
    args = layer_args(cache, q, pos, case.view)
    y = _run(cache, q, pos, case.view)
    ref = reference(*args, residual=case.residual, view=case.view)
    b, t = pos.shape
    assert y.shape == (b, t, case.heads * case.head_dim) and y.dtype == np.float32
    assert np.isfinite(y).all()
    assert max_err(y, ref) <= ATOL * vmax(cache)


def test_dispatch_cpu_is_the_kernel():
    case = CASES[0]
    cache, q, pos = step(case)
    args = layer_args(cache, q, pos, case.view)
    got = dispatch.hier_attention(*args, residual=case.residual, view=case.view, impl="cpu")
    np.testing.assert_array_equal(np.asarray(got), _run(cache, q, pos, case.view))


def test_views_differ():
    """Sensitivity: the int4 and int8 views differ far beyond the tolerance."""
    cache, q, pos = step(CASES[0])
    tgt, dft = _run(cache, q, pos, "target"), _run(cache, q, pos, "draft")
    assert max_err(tgt, dft) > 100 * ATOL * vmax(cache)


@pytest.mark.parametrize("view", ["target", "draft"])
def test_rows_are_independent_of_t(view):
    """Each row of a t = 6 call (gamma = 5 verification) equals the same row computed alone
    (t = 1, an autoregressive step), bit for bit, for every sequence (codes over three splits,
    rows straddling float_start, a sequence with no quantized key). With 3 query heads per KV
    head the t = 1 call converts the codes in registers (3 rows) and the t = 6 call through the
    float tile (18 rows): both paths give the same bits."""
    case = HD64[view]
    cache, q, pos = step(case)
    block = _run(cache, q, pos, view)
    for i in range(case.t):
        alone = _run(cache, q[:, i : i + 1], pos[:, i : i + 1], view)
        np.testing.assert_array_equal(alone[:, 0], block[:, i])
    # and the R = 16 case, whose rows 79..82 cross float_start (48 -> 64)
    cache, q, pos = step(dataclasses.replace(CASES[0], t=4))
    block = _run(cache, q, pos, view)
    for i in range(4):
        np.testing.assert_array_equal(_run(cache, q[:, i : i + 1], pos[:, i : i + 1], view)[:, 0],
                                      block[:, i])  # fmt: skip


def _sequence(cache: HierKVCache, b: int) -> HierKVCache:
    """Sequence b of the cache alone (batch 1)."""
    sl = lambda x: x[:, b : b + 1]  # noqa: E731  [layers, 1, ...]
    return cache.replace(
        k_hi=sl(cache.k_hi), k_lo=sl(cache.k_lo), k_scale=sl(cache.k_scale),
        k_min=sl(cache.k_min), v_hi=sl(cache.v_hi), v_lo=sl(cache.v_lo),
        v_scale=sl(cache.v_scale), v_min=sl(cache.v_min), k_buf=sl(cache.k_buf),
        v_buf=sl(cache.v_buf), lengths=cache.lengths[b : b + 1], q_len=cache.q_len[b : b + 1],
        buf_start=cache.buf_start[b : b + 1],
    )  # fmt: skip


@pytest.mark.parametrize("view", ["target", "draft"])
def test_rows_are_independent_of_the_batch(view):
    """Batch 3 (lengths 700, 150, 1) == each sequence alone, bit for bit."""
    case = HD64[view]
    cache, q, pos = step(case)
    batch = _run(cache, q, pos, view)
    for b in range(3):
        alone = _run(_sequence(cache, b), q[b : b + 1], pos[b : b + 1], view)
        np.testing.assert_array_equal(alone[0], batch[b])


def test_repeated_calls_are_identical():
    """40 identical calls (items spread over XLA's intra-op threads) give identical bits."""
    case = HD64["target"]
    cache, q, pos = step(case)
    args = layer_args(cache, q, pos, "target")
    first = _run(cache, q, pos, "target")
    for _ in range(40):
        got = _cpu(*args, residual=case.residual, view="target")
        np.testing.assert_array_equal(np.asarray(got), first)


def _set(x, seq, positions, value, ring=None):
    idx = np.asarray(positions) % ring if ring else np.asarray(positions)
    return x.at[LAYER, seq, idx].set(jnp.asarray(value, x.dtype))


@pytest.mark.parametrize("view", ["target", "draft"])
def test_unread_entries_never_matter(view):
    """Codes at or past each sequence's last float_start, buffer slots past its last row (future
    or rejected drafts), and for the draft view every lower half: garbage there changes nothing,
    bit for bit; the same garbage in a read slot does change the result."""
    case = CASES[0]
    cache, q, pos = step(case)
    nb = cache.layout.buffer
    base = _run(cache, q, pos, view, lo=True)
    junk = cache
    for seq, first in ((0, 64), (1, 16), (2, 0)):
        rest = range(first, cache.layout.q_capacity)
        junk = junk.replace(
            k_hi=_set(junk.k_hi, seq, rest, 0xAB), k_lo=_set(junk.k_lo, seq, rest, 0xCD),
            v_hi=_set(junk.v_hi, seq, rest, 0xEF), v_scale=_set(junk.v_scale, seq, rest, 1e4),
            v_min=_set(junk.v_min, seq, rest, -1e4),
        )  # fmt: skip
    for seq, last in ((0, 82), (1, 40), (2, 8)):
        future = range(last + 1, int(cache.buf_start[seq]) + nb)
        junk = junk.replace(
            k_buf=_set(junk.k_buf, seq, future, 1e3, nb),
            v_buf=_set(junk.v_buf, seq, future, -1e3, nb),
        )
    if view == "draft":
        junk = junk.replace(k_lo=junk.k_lo.at[LAYER].set(0x77), v_lo=junk.v_lo.at[LAYER].set(0x88))
    np.testing.assert_array_equal(_run(junk, q, pos, view, lo=True), base)
    spoiled = cache.replace(v_buf=_set(cache.v_buf, 0, [79], -1e3, nb))
    assert not np.array_equal(_run(spoiled, q, pos, view, lo=True), base)


# ------------------------------------------------------------------------- the cache's attend

_attend = jax.jit(
    lambda cache, q, pos, view: cache.attend(LAYER, q, pos, view), static_argnames="view"
)


def _with_impl(cache: HierKVCache, impl: str) -> HierKVCache:
    return cache.replace(layout=dataclasses.replace(cache.layout, attention_impl=impl))


@pytest.mark.parametrize("view", ["target", "draft"])
def test_attend_defaults_to_the_kernel(view):
    """On CPU a float32 cache picks "cpu"; its attend (the stacked arrays plus a traced layer
    index) gives the per-layer kernel's bits, and the XLA path's result within ATOL."""
    case = HD64[view]
    cache, q, pos = step(case)
    assert default_attention_impl(case.head_dim, jnp.float32) == "cpu"
    fresh = HierKVCache.init(
        preset("tiny").replace(head_dim=64, num_kv_heads=3, num_heads=9), 1, 64
    )
    assert fresh.layout.attention_impl == "cpu"
    got = np.asarray(_attend(_with_impl(cache, "cpu"), q, pos, view))
    np.testing.assert_array_equal(got, _run(cache, q, pos, view))
    auto = np.asarray(_attend(_with_impl(cache, "auto"), q, pos, view))
    np.testing.assert_array_equal(auto, got)
    xla = _attend(_with_impl(cache, "xla"), q, pos, view)
    assert max_err(got, xla) <= ATOL * vmax(cache)


def test_uncovered_shapes_refuse_or_fall_back():
    """float16 queries and head_dim 8 are refused (NotImplementedError); dispatch's auto and
    the cache's default then use XLA."""
    f16 = dataclasses.replace(CASES[0], dtype=jnp.float16)
    cache, q, pos = step(f16)
    args = layer_args(cache, q, pos, "target")
    with pytest.raises(NotImplementedError, match="bfloat16"):
        cpu_attention.hier_attention_cpu(*args, residual=16)
    auto = dispatch.hier_attention(*args, residual=16)
    np.testing.assert_array_equal(
        np.asarray(auto, np.float32),
        np.asarray(dispatch.hier_attention(*args, residual=16, impl="xla"), np.float32),
    )
    assert default_attention_impl(32, jnp.float16) == "xla"
    assert default_attention_impl(8, jnp.float32) == "xla"
    cfg = preset("tiny").replace(num_layers=2, num_kv_heads=2, head_dim=8)
    small = HierKVCache.init(cfg, 1, 32, residual=4)
    assert small.layout.attention_impl == "xla"
    q8 = jnp.ones((1, 1, cfg.num_heads, 8))
    with pytest.raises(NotImplementedError, match="head_dim 8"):
        _with_impl(small, "cpu").attend(0, q8, jnp.zeros((1, 1), jnp.int32))


# bfloat16 (queries and float ring buffer): the queries are converted at the call boundary and the
# buffer's rows inside the kernel, both exactly, so the output is the float32 kernel's on the
# converted inputs bit for bit (its accuracy is checked above); rows stay independent of t. The
# bfloat16 reference rounds the dequantized keys to bfloat16 before the dot, the kernel does not:
# against the cache's own XLA path in bfloat16 the bound is the base's bfloat16 one,
# ATOL[bfloat16] = 2^-8 max|V| (measured below it on this case).
BF16 = dataclasses.replace(CASES[0], name="target-t4-bf16", dtype=jnp.bfloat16)


@pytest.mark.parametrize("view", ["target", "draft"])
def test_bfloat16_is_the_float32_kernel_on_converted_values(view):
    cache, q, pos = step(dataclasses.replace(BF16, view=view))
    assert cache.k_buf.dtype == jnp.bfloat16 and q.dtype == jnp.bfloat16
    assert default_attention_impl(32, jnp.bfloat16) == "cpu"
    got = _run(cache, q, pos, view)
    up = cache.replace(k_buf=cache.k_buf.astype(jnp.float32), v_buf=cache.v_buf.astype(jnp.float32))
    np.testing.assert_array_equal(got, _run(up, q.astype(jnp.float32), pos, view))
    for ti in range(q.shape[1]):  # a row alone (t = 1) equals the row inside the block
        one = _run(cache, q[:, ti : ti + 1], pos[:, ti : ti + 1], view)
        np.testing.assert_array_equal(got[:, ti : ti + 1], one)
    xla = _attend(_with_impl(cache, "xla"), q, pos, view)
    kernel = _attend(_with_impl(cache, "cpu"), q, pos, view)
    assert kernel.dtype == jnp.bfloat16
    assert max_err(kernel, xla) <= 2.0**-8 * vmax(cache)
