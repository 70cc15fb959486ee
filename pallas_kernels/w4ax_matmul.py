"""W4A4 / W4A8 matmul: pre-quantized integer activations times packed int4 weights.

Inputs: activation codes ``a_code`` int8 [M, K] (int4 values in [-8, 7] for A4, int8 values in
[-128, 127] for A8), activation scales ``a_scale`` float32 [M, K/Ga] (Ga = activation group size;
per token means Ga = K, shape [M, 1]), a packed int4 weight (layout of `pallas_kernels.int4`:
uint8 [K/2, N], codes ``w_code``), weight scales ``w_scale`` [K/G, N] and, for asymmetric weights,
mins ``w_min`` [K/G, N]. Mathematically

    out[m, n] = sum_k (a_code[m, k] * a_scale[m, k // Ga]) * w[k, n],
    w[k, n]   = w_code[k, n] * w_scale[k // G, n]  (+ w_min[k // G, n] when asymmetric),

and it is computed exactly as follows. Let c = gcd(G, Ga) (a multiple of 32): both scales are
constant on each block b of c consecutive K rows. Per block, an integer dot with int32
accumulation (exact)

    acc[m, b, n] = sum_{k in b} a_code[m, k] * w_code[k, n]                     (int32)
    rs[m, b]     = sum_{k in b} a_code[m, k]                                     (int32, asym only)

then a float32 epilogue summed over blocks b in increasing order

    out[m, n] = sum_b  f32(acc[m, b, n]) * a_scale[m, b*c // Ga] * w_scale[b*c // G, n]
              (+ sum_b (f32(rs[m, b]) * a_scale[m, b*c // Ga]) * w_min[b*c // G, n]   asym)

i.e. for asymmetric weights the min term is sum over groups of (sum_{k in group} a_code *
a_scale) * min[g, n]. Output dtype ``out_dtype`` (float32 by default). The kernel and
`w4ax_matmul_reference` differ only in float32 rounding of the epilogue (the order in which the
per-block terms are added; when c is an odd multiple of 32, e.g. 96, the kernel applies the
epilogue per 32-row half, which is the same function up to that rounding).

On GPU the int4 values run through int8 dots (s8 x s8 -> s32, Triton ``tl.dot`` with an int32
accumulator); Hopper has no int4 MMA. Unsigned asymmetric weight codes [0, 15] fit in int8.

Kernel structure (Triton lowering): grid (M / block_m, N / block_n); an outer loop over c-blocks
and an inner loop over K steps of gcd(block_k, c) rows; per 64-row pack tile, two int8 dots
``a_ref[:, half0] @ lo`` and ``a_ref[:, half1] @ hi`` into an int32 tile, then the float32 epilogue
with the scale column ``a_scale_ref[:, pl.ds(b, 1)]`` and scale row ``w_scale_ref[pl.ds(g, 1), :]``.

Supported: K a multiple of 64; G and Ga multiples of 32 dividing K; N with a power-of-two block
>= 16 dividing it; any M >= 1 (padded to the row block). Anything else raises
NotImplementedError.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util
from pallas_kernels.int4 import HALF_TILE, PACK_TILE, unpack_int4


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes of the W4AX kernel.

    Attributes:
      block_m: rows per program (power of two >= 16; smaller M is padded up to 16).
      block_n: output columns per program (power of two >= 16 dividing N).
      block_k: K rows per loop step at most (power of two, multiple of 64, dividing K); the step
        actually used is gcd(block_k, c) so that a step never crosses a scale block.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages.
    """

    block_m: int = 16
    block_n: int = 128
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3


def default_block_sizes(m: int, k: int, n: int) -> BlockSizes:
    """Shape-adapted defaults: 16 rows for decode, 64 for prefill; N, K blocks that divide."""
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn = _util.pick_block(n, 128, _util.MIN_DOT, "N")
    bk = _util.pick_block(k, 256, PACK_TILE, "K")
    return BlockSizes(block_m=bm, block_n=bn, block_k=bk, num_warps=4, num_stages=3)


def _check_shapes(a_codes, a_scales, packed, scales, mins) -> tuple[int, int, int]:
    """Validates shapes; returns (G, Ga, c)."""
    m, k = a_codes.shape
    n = packed.shape[1]
    g = _util.weight_group_size(
        k, n, packed.shape, scales.shape, None if mins is None else mins.shape
    )
    if a_codes.dtype != jnp.int8:
        raise ValueError(f"a_codes must be int8, got {a_codes.dtype}")
    ma, nga = a_scales.shape
    if ma != m or nga < 1 or k % nga:
        raise NotImplementedError(
            f"a_scales shape {a_scales.shape} does not tile [M, K]=[{m}, {k}]"
        )
    ga = k // nga
    if ga % HALF_TILE:
        raise NotImplementedError(f"activation group size {ga} is not a multiple of {HALF_TILE}")
    return g, ga, math.gcd(g, ga)


def _w4ax_kernel(
    a_ref, as_ref, p_ref, ws_ref, *rest, group_size, act_group_size, c, block_k, signed
):
    """One [block_m, block_n] output tile; refs are this program's blocks."""
    if len(rest) == 2:
        mins_ref, o_ref = rest
    else:
        (o_ref,) = rest
        mins_ref = None
    bm = a_ref.shape[0]
    bn = o_ref.shape[1]
    k = a_ref.shape[1]

    def halves(row):
        """int32 dots of the two 32-row halves of the pack tile starting at ``row``."""
        prow = pl.multiple_of(row // 2, HALF_TILE)
        p = p_ref[pl.ds(prow, HALF_TILE), :].astype(jnp.int32)  # [32, bn]
        lo = p & 0xF  # [32, bn]
        hi = (p >> 4) & 0xF  # [32, bn]
        if signed:
            lo = (lo ^ 8) - 8
            hi = (hi ^ 8) - 8
        out = []
        for h, codes in ((0, lo), (1, hi)):
            a = a_ref[:, pl.ds(row + h * HALF_TILE, HALF_TILE)]  # int8 [bm, 32]
            d = jnp.dot(a, codes.astype(jnp.int8), preferred_element_type=jnp.int32)  # [bm, bn]
            rs = None
            if mins_ref is not None:
                rs = jnp.sum(a.astype(jnp.int32), axis=1, keepdims=True)  # [bm, 1]
            out.append((d, rs))
        return out

    def epilogue(acc, acc_i, rs, row):
        """acc += f32(acc_i) * a_scale * w_scale (+ f32(rs) * a_scale * w_min) for ``row``'s block."""
        sa = as_ref[:, pl.ds(row // act_group_size, 1)].astype(jnp.float32)  # [bm, 1]
        g = row // group_size
        sw = ws_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, bn]
        acc = acc + acc_i.astype(jnp.float32) * sa * sw  # [bm, bn]
        if mins_ref is not None:
            mn = mins_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, bn]
            acc = acc + (rs.astype(jnp.float32) * sa) * mn  # [bm, bn]
        return acc

    acc = jnp.zeros((bm, bn), jnp.float32)  # [bm, bn]
    if c % PACK_TILE == 0:
        step = math.gcd(block_k, c)  # multiple of 64, divides c

        def outer(b, acc):
            def inner(s, carry):
                acc_i, rs = carry
                for t in range(step // PACK_TILE):
                    row = pl.multiple_of(b * c + s * step + t * PACK_TILE, PACK_TILE)
                    for d, r in halves(row):
                        acc_i = acc_i + d
                        if r is not None:
                            rs = rs + r
                return acc_i, rs

            init = (jnp.zeros((bm, bn), jnp.int32), jnp.zeros((bm, 1), jnp.int32))
            acc_i, rs = jax.lax.fori_loop(0, c // step, inner, init)  # [bm, bn], [bm, 1]
            return epilogue(acc, acc_i, rs, b * c)

        acc = jax.lax.fori_loop(0, k // c, outer, acc)
    else:  # c is an odd multiple of 32: every 32-row half gets its own epilogue.

        def body(kb, acc):
            for t in range(block_k // PACK_TILE):
                row = pl.multiple_of(kb * block_k + t * PACK_TILE, PACK_TILE)
                for h, (d, r) in enumerate(halves(row)):
                    acc = epilogue(acc, d, r, row + h * HALF_TILE)
            return acc

        acc = jax.lax.fori_loop(0, k // block_k, body, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret"))
def w4ax_matmul(
    a_codes: jax.Array,
    a_scales: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    mins: jax.Array | None = None,
    *,
    out_dtype=jnp.float32,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Pallas W4A4/W4A8 matmul (see module docstring for the exact function).

    Args:
      a_codes: int8 activation codes [M, K].
      a_scales: float32 activation scales [M, K/Ga] ([M, 1] per token).
      packed: uint8 packed int4 weight codes [K/2, N].
      scales: float weight scales [K/G, N].
      mins: float weight mins [K/G, N] (asymmetric, unsigned codes) or None (symmetric).
      out_dtype: output dtype.
      block_sizes: block sizes; None picks `default_block_sizes` for the shape.
      interpret: run in Pallas interpret mode (CPU testing).

    Returns:
      [M, N] array of out_dtype.

    Raises:
      NotImplementedError: for shapes or block sizes the kernel does not support.
    """
    m, k = a_codes.shape
    n = packed.shape[1]
    g, ga, c = _check_shapes(a_codes, a_scales, packed, scales, mins)
    bs = block_sizes or default_block_sizes(m, k, n)
    _util.check_block(n, bs.block_n, _util.MIN_DOT, "N")
    _util.check_block(k, bs.block_k, PACK_TILE, "K")
    if not _util.is_pow2(bs.block_m) or bs.block_m < _util.MIN_DOT:
        raise NotImplementedError(f"block_m={bs.block_m} must be a power of two >= 16")
    bm, mp = _util.row_block(m, bs.block_m)
    ap = _util.pad_rows(a_codes, mp)  # [mp, K]
    asp = _util.pad_rows(a_scales.astype(jnp.float32), mp)  # [mp, K/Ga]
    kernel = functools.partial(
        _w4ax_kernel,
        group_size=g,
        act_group_size=ga,
        c=c,
        block_k=bs.block_k,
        signed=mins is None,
    )
    ng = k // g
    in_specs = [
        pl.BlockSpec((bm, k), lambda i, j: (i, 0)),  # a_codes [bm, K]
        pl.BlockSpec((bm, k // ga), lambda i, j: (i, 0)),  # a_scales [bm, K/Ga]
        pl.BlockSpec((k // 2, bs.block_n), lambda i, j: (0, j)),  # packed [K/2, bn]
        pl.BlockSpec((ng, bs.block_n), lambda i, j: (0, j)),  # w scales [K/G, bn]
    ]
    args = [ap, asp, packed, scales]
    if mins is not None:
        in_specs.append(pl.BlockSpec((ng, bs.block_n), lambda i, j: (0, j)))  # mins [K/G, bn]
        args.append(mins)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
        grid=(mp // bm, n // bs.block_n),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bs.block_n), lambda i, j: (i, j)),
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="w4ax_matmul",
    )(*args)  # [mp, N]
    return out[:m]


def w4ax_matmul_reference(
    a_codes: jax.Array,
    a_scales: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    mins: jax.Array | None = None,
    *,
    out_dtype=jnp.float32,
) -> jax.Array:
    """Pure-jnp reference: per-block int32 einsum, then float32 scaling and a sum over blocks.

    Args:
      a_codes: int8 activation codes [M, K].
      a_scales: float32 activation scales [M, K/Ga].
      packed: uint8 packed int4 weight codes [K/2, N].
      scales: float weight scales [K/G, N].
      mins: float weight mins [K/G, N] or None (symmetric).
      out_dtype: output dtype.

    Returns:
      [M, N] array of out_dtype.
    """
    m, k = a_codes.shape
    g, ga, c = _check_shapes(a_codes, a_scales, packed, scales, mins)
    nb = k // c
    w_codes = unpack_int4(packed, signed=mins is None)  # int8 [K, N]
    n = w_codes.shape[1]
    a3 = a_codes.reshape(m, nb, c)  # [M, nb, c]
    w3 = w_codes.reshape(nb, c, n)  # [nb, c, N]
    acc = jnp.einsum("mgk,gkn->mgn", a3, w3, preferred_element_type=jnp.int32)  # [M, nb, N]
    starts = jnp.arange(nb) * c  # [nb]
    sa = a_scales.astype(jnp.float32)[:, starts // ga]  # [M, nb]
    sw = scales.astype(jnp.float32)[starts // g]  # [nb, N]
    terms = acc.astype(jnp.float32) * sa[:, :, None] * sw[None]  # [M, nb, N]
    if mins is not None:
        rs = jnp.sum(a3.astype(jnp.int32), axis=-1)  # [M, nb]
        mn = mins.astype(jnp.float32)[starts // g]  # [nb, N]
        terms = terms + (rs.astype(jnp.float32) * sa)[:, :, None] * mn[None]  # [M, nb, N]
    return jnp.sum(terms, axis=1).astype(out_dtype)  # [M, N]


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def w4ax_matmul_xla(
    a_codes: jax.Array,
    a_scales: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    mins: jax.Array | None = None,
    *,
    out_dtype=jnp.float32,
) -> jax.Array:
    """The XLA path used off-GPU: integer dot_general with int32 accumulation, float epilogue.

    A ``lax.scan`` over the c-blocks, each step one 2-D int8 ``dot_general`` [M, c] x [c, N] ->
    int32 and its float32 epilogue added to the carry (block order, as the kernel); a single
    [M, K] x [K, N] dot when c = K (per-token activations and per-channel weights). XLA CPU runs
    this much faster, and compiles it much faster, than one batched per-block einsum or an
    unrolled loop of dots.

    Args:
      a_codes: int8 activation codes [M, K].
      a_scales: float32 activation scales [M, K/Ga].
      packed: uint8 packed int4 weight codes [K/2, N].
      scales: float weight scales [K/G, N].
      mins: float weight mins [K/G, N] or None (symmetric).
      out_dtype: output dtype.

    Returns:
      [M, N] array of out_dtype.
    """
    m, k = a_codes.shape
    g, ga, c = _check_shapes(a_codes, a_scales, packed, scales, mins)
    nb = k // c
    w_codes = unpack_int4(packed, signed=mins is None)  # int8 [K, N]
    n = w_codes.shape[1]
    starts = np.arange(nb) * c  # [nb] static
    sa = a_scales.astype(jnp.float32)[:, starts // ga].T[:, :, None]  # [nb, M, 1]
    sw = scales.astype(jnp.float32)[starts // g][:, None, :]  # [nb, 1, N]
    a3 = a_codes.reshape(m, nb, c).transpose(1, 0, 2)  # [nb, M, c]
    w3 = w_codes.reshape(nb, c, n)  # [nb, c, N]
    xs = [a3, w3, sa, sw]
    if mins is not None:
        rs = jnp.sum(a3.astype(jnp.int32), axis=-1, keepdims=True).astype(jnp.float32)  # [nb, M, 1]
        mn = mins.astype(jnp.float32)[starts // g][:, None, :]  # [nb, 1, N]
        xs += [rs, mn]

    def block(out, xs_b):
        a_b, w_b, sa_b, sw_b = xs_b[:4]
        acc = jax.lax.dot_general(
            a_b, w_b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
        )  # [M, N]
        term = acc.astype(jnp.float32) * sa_b * sw_b  # [M, N]
        if mins is not None:
            rs_b, mn_b = xs_b[4:]
            term = term + (rs_b * sa_b) * mn_b  # [M, N]
        return out + term, None

    if nb == 1:
        out, _ = block(jnp.zeros((m, n), jnp.float32), [x[0] for x in xs])
    else:
        out, _ = jax.lax.scan(block, jnp.zeros((m, n), jnp.float32), xs)  # [M, N]
    return out.astype(out_dtype)
