"""Decode attention over the hierarchical (QuantSpec) KV cache: `pallas_kernels.hier_attention`.

* the shared cases (hier_attention_test_base.py) through the XLA path and the Pallas kernel in
  interpret mode, against `hier_attention_reference`;
* the reference against the model's CPU path, `HierKVCache.attend` (so the reference is the
  function the cache defines, not a re-reading of it);
* which stored entries a row reads (the float_start switch between codes and floats, future draft
  entries, other sequences), bit for bit;
* flash-decoding splits and block sizes, a hypothesis property over lengths and views;
* the dispatch entry (NotImplementedError, fallback) and the `HierLayout.attention_impl` wiring
  of `attend` (default: the CPU kernel on CPU where it builds, else the XLA path; Pallas opt-in).

The CUDA lowering (jax.export) and Triton cubin checks live in test_kernels_lowering.py and
test_kernels_triton_compile.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hier_attention_test_base import (
    ATOL,
    CASES,
    LAYER,
    HierAttentionBase,
    layer_args,
    max_err,
    reference,
    step,
    vmax,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import dispatch
from pallas_kernels.hier_attention import BlockSizes, hier_attention
from qspec_jax.cache import HierKVCache
from qspec_jax.config import preset


class TestHierAttentionXla(HierAttentionBase):
    IMPL = "xla"


class TestHierAttentionPallasInterpret(HierAttentionBase):
    IMPL = "pallas_interpret"


_attend = jax.jit(
    lambda cache, q, pos, view: cache.attend(LAYER, q, pos, view), static_argnames="view"
)


def _with_impl(cache: HierKVCache, impl: str) -> HierKVCache:
    return cache.replace(layout=dataclasses.replace(cache.layout, attention_impl=impl))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reference_matches_cache_attend(case):
    """The reference is the function `HierKVCache.attend` computes (ATOL: two float32 softmax
    orders, or one bfloat16 output rounding; see hier_attention_test_base)."""
    cache, q, pos = step(case)
    ref = reference(*layer_args(cache, q, pos, case.view), residual=case.residual, view=case.view)
    got = _attend(cache, q, pos, case.view)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert max_err(got, ref) <= ATOL[case.dtype] * vmax(cache)


# ------------------------------------------------------------------------- what a row reads

_kernel = functools.partial(hier_attention, interpret=True)


def _impls():
    """name -> f(cache, q, pos, view): the implementations whose reads are checked (the lower
    halves are passed for the draft view too: it must ignore them)."""
    return {
        "reference": lambda c, q, p, v: reference(
            *layer_args(c, q, p, v, lo=True), residual=c.layout.residual, view=v
        ),
        "pallas_interpret": lambda c, q, p, v: _kernel(
            *layer_args(c, q, p, v, lo=True), residual=c.layout.residual, view=v
        ),
        "attend": _attend,
    }


def _set_positions(x, seq, positions, value, ring=None):
    """x [layers, batch, tokens, ...] with LAYER, sequence `seq`, `positions` (mod ring) set."""
    idx = np.asarray(positions) % ring if ring else np.asarray(positions)
    return x.at[LAYER, seq, idx].set(jnp.asarray(value, x.dtype))


@pytest.mark.parametrize("impl", ["reference", "pallas_interpret", "attend"])
def test_float_start_switch_reads_codes_or_floats(impl):
    """Sequence 0 (length 79, R = 16) steps rows at 79..82: rows 79, 80 read positions 48..63 from
    the float buffer (float_start 48), rows 81, 82 from the codes (float_start 64), although the
    buffer still holds them. Spoiling one copy changes exactly the rows that read it; every other
    row, and the other sequences, stay bit for bit the same."""
    f = _impls()[impl]
    case = CASES[0]
    cache, q, pos = step(case)
    assert [int(x) for x in cache.buf_start] == [48, 16, 0]
    base = np.asarray(f(cache, q, pos, "target"))
    nb = cache.layout.buffer
    spoil_floats = cache.replace(
        k_buf=_set_positions(cache.k_buf, 0, range(48, 64), 50.0, nb),
        v_buf=_set_positions(cache.v_buf, 0, range(48, 64), -40.0, nb),
    )
    spoil_codes = cache.replace(
        k_hi=_set_positions(cache.k_hi, 0, range(48, 64), 0xF0),
        v_lo=_set_positions(cache.v_lo, 0, range(48, 64), 0x0F),
    )
    for spoiled, changed in ((spoil_floats, [0, 1]), (spoil_codes, [2, 3])):
        got = np.asarray(f(spoiled, q, pos, "target"))
        kept = [r for r in range(4) if r not in changed]
        np.testing.assert_array_equal(got[0, kept], base[0, kept])
        np.testing.assert_array_equal(got[1:], base[1:])
        assert (np.abs(got[0, changed] - base[0, changed]).max(axis=-1) > 1e-2).all()


@pytest.mark.parametrize("impl", ["reference", "pallas_interpret"])
def test_unread_entries_never_matter(impl):
    """Entries no row may read (codes at or past float_start, buffer slots past a row's own
    position: rejected or future drafts, the draft view's lower halves) are never read: filling
    them with garbage changes nothing, bit for bit."""
    f = _impls()[impl]
    case = CASES[0]
    cache, q, pos = step(case)
    nb = cache.layout.buffer
    for view in ("target", "draft"):
        base = np.asarray(f(cache, q, pos, view))
        junk = cache
        # sequence 0: rows read codes below 64 only; sequence 1 (rows 37..40): below 16 only
        for seq, first in ((0, 64), (1, 16), (2, 0)):
            rest = range(first, cache.layout.q_capacity)
            junk = junk.replace(
                k_hi=_set_positions(junk.k_hi, seq, rest, 0xAB),
                k_lo=_set_positions(junk.k_lo, seq, rest, 0xCD),
                v_hi=_set_positions(junk.v_hi, seq, rest, 0xEF),
                v_scale=_set_positions(junk.v_scale, seq, rest, 1e4),
                v_min=_set_positions(junk.v_min, seq, rest, -1e4),
            )
        # buffer slots past each sequence's last row (ring slots not holding a read position)
        for seq, last in ((0, 82), (1, 40), (2, 8)):
            start = int(cache.buf_start[seq])
            future = range(last + 1, start + nb)
            junk = junk.replace(
                k_buf=_set_positions(junk.k_buf, seq, future, 1e3, nb),
                v_buf=_set_positions(junk.v_buf, seq, future, -1e3, nb),
            )
        if view == "draft":  # every lower half, read or not
            junk = junk.replace(
                k_lo=junk.k_lo.at[LAYER].set(0x77), v_lo=junk.v_lo.at[LAYER].set(0x88)
            )
        np.testing.assert_array_equal(np.asarray(f(junk, q, pos, view)), base)
    # sensitivity: the same garbage in a read slot (sequence 0's row 79 reads position 79) shows
    spoiled = cache.replace(v_buf=_set_positions(cache.v_buf, 0, [79], -1e3, nb))
    assert not np.array_equal(np.asarray(f(spoiled, q, pos, "target")), base)


# ------------------------------------------------------------------------- blocks and splits


SPLITS = BlockSizes(block_k=16, block_buffer=16, split_tokens=32)


def test_splits_and_block_sizes():
    """Flash-decoding splits (Q = 96 in three 32-token splits of two 16-token blocks: sequence 0's
    codes span two splits, sequence 1's one, sequence 2 has none) give the reference's result."""
    case = CASES[0]
    cache, q, pos = step(case)
    args = layer_args(cache, q, pos, case.view)
    ref = reference(*args, residual=case.residual, view=case.view)
    y = _kernel(*args, residual=case.residual, view=case.view, block_sizes=SPLITS)
    assert max_err(y, ref) <= ATOL[jnp.float32] * vmax(cache)


# Lengths up to 92: the step's last row (length + 3) stays inside the 96-token capacity.
@settings(max_examples=12, deadline=None)
@given(
    lens=st.lists(st.integers(1, 92), min_size=3, max_size=3),
    view=st.sampled_from(["target", "draft"]),
    seed=st.integers(0, 2**16),
)
def test_property_kernel_matches_reference(lens, view, seed):
    """Any lengths (ends mid-block, no quantized part, rows crossing float_start) and data, with
    the three-split configuration."""
    case = CASES[0]
    cache, q, pos = step(case, tuple(lens), seed)
    args = layer_args(cache, q, pos, view)
    y = _kernel(*args, residual=case.residual, view=view, block_sizes=SPLITS)
    ref = reference(*args, residual=case.residual, view=view)
    assert max_err(y, ref) <= ATOL[jnp.float32] * vmax(cache)


# ------------------------------------------------------------------------- dispatch


def _small_head_cache():
    """head_dim 8: hd/2 = 4 is below Triton's dot minimum, the kernel refuses it."""
    cfg = preset("tiny").replace(num_layers=2, num_kv_heads=2, head_dim=8)
    cache = HierKVCache.init(cfg, 1, 32, residual=4, step_tokens=1)
    q = jax.random.normal(jax.random.key(1), (1, 1, cfg.num_heads, 8))
    return cache, q, jnp.asarray([[0]], jnp.int32)


@pytest.fixture
def auto_is_pallas(monkeypatch):
    """Pretend the default backend is a GPU, so auto picks "pallas"."""
    monkeypatch.setattr(dispatch, "default_impl", lambda: "pallas")


def test_dispatch_refuses_and_falls_back(auto_is_pallas):
    cache, q, pos = _small_head_cache()
    args = layer_args(cache, q, pos, "target")
    for impl in ("pallas", "pallas_interpret"):
        with pytest.raises(NotImplementedError, match="head_dim 8"):
            dispatch.hier_attention(*args, residual=4, impl=impl)
    y = dispatch.hier_attention(*args, residual=4)  # auto: Pallas refuses -> XLA
    np.testing.assert_array_equal(
        np.asarray(y), np.asarray(dispatch.hier_attention(*args, residual=4, impl="xla"))
    )


def test_unsupported_and_invalid_inputs():
    case = CASES[0]
    cache, q, pos = step(case)
    args = list(layer_args(cache, q, pos, "target"))
    f = functools.partial(hier_attention, residual=16, interpret=True)
    rows = [
        jax.ShapeDtypeStruct((3, 8, 34, 32), jnp.float32),
        jax.ShapeDtypeStruct((3, 8), jnp.int32),
    ]
    with pytest.raises(NotImplementedError, match="136 query rows"):
        jax.eval_shape(f, *rows, *args[2:])  # t = 8 rows x 17 heads per KV head
    with pytest.raises(NotImplementedError, match="power of two"):
        jax.eval_shape(functools.partial(f, block_sizes=BlockSizes(block_k=24)), *args)
    with pytest.raises(ValueError, match="unknown KV view"):
        jax.eval_shape(functools.partial(f, view="int2"), *args)
    with pytest.raises(ValueError, match="pass k_lo and v_lo"):
        jax.eval_shape(f, *args[:3], None, *args[4:])
    bad = args[:4] + [args[4][:, :-1]] + args[5:]
    with pytest.raises(ValueError, match="k_scale"):
        jax.eval_shape(f, *bad)


# ------------------------------------------------------------------------- attend wiring


def test_attend_default_and_auto():
    """The default layout takes `default_attention_impl`: on CPU the AVX2 kernel where it builds
    (tests/kernels/test_hier_attention_cpu.py), else the XLA path; "auto" on CPU runs the same
    program as that default, bit for bit; "xla" stays available explicitly."""
    from qspec_jax.cache.hierarchical import default_attention_impl

    case = CASES[0]
    cache, q, pos = step(case)
    want = default_attention_impl(case.head_dim, case.dtype)
    assert cache.layout.attention_impl == want
    assert want == ("cpu" if dispatch.default_impl() == "cpu" else "xla")
    base = np.asarray(_attend(cache, q, pos, "target"))
    auto = np.asarray(_attend(_with_impl(cache, "auto"), q, pos, "target"))
    np.testing.assert_array_equal(auto, base)
    xla = _attend(_with_impl(cache, "xla"), q, pos, "target")
    assert max_err(xla, base) <= ATOL[jnp.float32] * vmax(cache)
    with pytest.raises(ValueError, match="attention_impl"):
        HierKVCache.init(preset("tiny"), 1, 32, attention_impl="cuda")


def test_attend_runs_the_kernel_when_asked():
    """attention_impl="pallas_interpret": attend gives the kernel's result (the draft view: the
    lower halves are not even passed)."""
    case, view = CASES[1], "draft"
    cache, q, pos = step(case)
    got = _attend(_with_impl(cache, "pallas_interpret"), q, pos, view)
    base = _attend(cache, q, pos, view)
    assert got.shape == base.shape and got.dtype == base.dtype
    assert max_err(got, base) <= ATOL[jnp.float32] * vmax(cache)
    assert not np.array_equal(np.asarray(got), np.asarray(base))  # another program did run


def test_attend_auto_falls_back_to_xla(auto_is_pallas):
    """auto on a "GPU" with a shape the kernel refuses: `_attend_kernel` declines, so attend runs
    its XLA path; an explicit "pallas" lets the refusal through."""
    cache, q, pos = _small_head_cache()
    assert _with_impl(cache, "auto")._attend_kernel(LAYER, q, pos, "target") is None
    assert cache._attend_kernel(LAYER, q, pos, "target") is None  # "xla": never tried
    with pytest.raises(NotImplementedError, match="head_dim 8"):
        _with_impl(cache, "pallas").attend(LAYER, q, pos)
