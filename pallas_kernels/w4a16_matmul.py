"""W4A16 matmul: float activations times packed int4 weights, dequantized on the fly.

Computes, for x [M, K] (float32 / bfloat16 / float16) and a packed int4 weight (layout of
`pallas_kernels.int4`: packed uint8 [K/2, N], scales [K/G, N], optional mins [K/G, N]):

    Wd[k, n]  = round_to_x_dtype( float32(code[k, n]) * float32(scale[k // G, n])
                                  (+ float32(min[k // G, n])) )
    out[m, n] = x.dtype( sum_k float32(x[m, k] * Wd[k, n]) )

with codes signed in [-8, 7] when ``mins is None`` (symmetric) and unsigned in [0, 15] otherwise
(asymmetric). Products are exact and accumulated in float32; only the accumulation order differs
between the kernel and `w4a16_matmul_reference`. For float32 x the dots run at HIGHEST precision
(IEEE float32, not TF32).

Kernel structure (Triton lowering): grid (M / block_m, N / block_n); each program walks K in
steps of block_k (a multiple of 64); per 64-row pack tile it loads the packed tile [32, block_n],
unpacks the low nibbles (rows 0..31 of the tile) and high nibbles (rows 32..63), sign-extends
them when symmetric, dequantizes each 32-row half with its own group's scale (and min) row read
from the scale ref (``scales_ref[pl.ds(g, 1), :]``), and accumulates two dots
``x_ref[:, half0] @ lo`` and ``x_ref[:, half1] @ hi`` into a float32 [block_m, block_n] tile.

Supported: K a multiple of 64; G a multiple of 32 dividing K (G = K is per channel); N with a
power-of-two block >= 16 dividing it; any M >= 1 (rows are zero-padded to the row block, at
least 16, and sliced back). Anything else raises NotImplementedError.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util
from pallas_kernels.int4 import HALF_TILE, PACK_TILE, dequantize_int4


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes of the W4A16 kernel.

    Attributes:
      block_m: rows of x per program (power of two >= 16; smaller M is padded up to 16).
      block_n: output columns per program (power of two >= 16 dividing N).
      block_k: K rows per loop step (power of two, multiple of 64, dividing K).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages of the K loop.
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


def _w4a16_kernel(x_ref, packed_ref, scales_ref, *rest, group_size, block_k, signed, precision):
    """One [block_m, block_n] output tile; refs are this program's blocks."""
    if len(rest) == 2:
        mins_ref, o_ref = rest
    else:
        (o_ref,) = rest
        mins_ref = None
    bm = x_ref.shape[0]
    bn = o_ref.shape[1]
    k = x_ref.shape[1]
    tiles = block_k // PACK_TILE

    def dequant(codes, row):
        # codes: int32 [32, bn]; row: first K row of this 32-row half (traced)
        g = row // group_size
        w = codes.astype(jnp.float32) * scales_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [32, bn]
        if mins_ref is not None:
            w = w + mins_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [32, bn]
        return w.astype(x_ref.dtype)

    def body(kb, acc):
        for t in range(tiles):
            row = pl.multiple_of(kb * block_k + t * PACK_TILE, PACK_TILE)
            prow = pl.multiple_of(kb * (block_k // 2) + t * HALF_TILE, HALF_TILE)
            p = packed_ref[pl.ds(prow, HALF_TILE), :].astype(jnp.int32)  # [32, bn]
            lo = p & 0xF  # [32, bn] rows row .. row+31
            hi = (p >> 4) & 0xF  # [32, bn] rows row+32 .. row+63
            if signed:
                lo = (lo ^ 8) - 8
                hi = (hi ^ 8) - 8
            x_lo = x_ref[:, pl.ds(row, HALF_TILE)]  # [bm, 32]
            x_hi = x_ref[:, pl.ds(row + HALF_TILE, HALF_TILE)]  # [bm, 32]
            acc += jnp.dot(
                x_lo, dequant(lo, row), preferred_element_type=jnp.float32, precision=precision
            )  # [bm, bn]
            acc += jnp.dot(
                x_hi,
                dequant(hi, row + HALF_TILE),
                preferred_element_type=jnp.float32,
                precision=precision,
            )  # [bm, bn]
        return acc

    acc = jnp.zeros((bm, bn), jnp.float32)  # [bm, bn]
    acc = jax.lax.fori_loop(0, k // block_k, body, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def w4a16_matmul(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    mins: jax.Array | None = None,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Pallas W4A16 matmul ``x @ dequant(W)`` (see module docstring for the exact function).

    Args:
      x: float activations [M, K].
      packed: uint8 packed int4 codes [K/2, N].
      scales: float scales [K/G, N].
      mins: float mins [K/G, N] for asymmetric codes, or None for symmetric signed codes.
      block_sizes: block sizes; None picks `default_block_sizes` for the shape.
      interpret: run the kernel in Pallas interpret mode (CPU testing).

    Returns:
      [M, N] array of x.dtype.

    Raises:
      NotImplementedError: for shapes or block sizes the kernel does not support.
    """
    m, k = x.shape
    n = packed.shape[1]
    g = _util.weight_group_size(
        k, n, packed.shape, scales.shape, None if mins is None else mins.shape
    )
    if block_sizes is None:
        block_sizes = default_block_sizes(m, k, n)
    bs = block_sizes
    _util.check_block(n, bs.block_n, _util.MIN_DOT, "N")
    _util.check_block(k, bs.block_k, PACK_TILE, "K")
    if not _util.is_pow2(bs.block_m) or bs.block_m < _util.MIN_DOT:
        raise NotImplementedError(f"block_m={bs.block_m} must be a power of two >= 16")
    bm, mp = _util.row_block(m, bs.block_m)
    xp = _util.pad_rows(x, mp)  # [mp, k]
    ng = k // g
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    kernel = functools.partial(
        _w4a16_kernel,
        group_size=g,
        block_k=bs.block_k,
        signed=mins is None,
        precision=precision,
    )
    in_specs = [
        pl.BlockSpec((bm, k), lambda i, j: (i, 0)),  # x [bm, K]
        pl.BlockSpec((k // 2, bs.block_n), lambda i, j: (0, j)),  # packed [K/2, bn]
        pl.BlockSpec((ng, bs.block_n), lambda i, j: (0, j)),  # scales [K/G, bn]
    ]
    args = [xp, packed, scales]
    if mins is not None:
        in_specs.append(pl.BlockSpec((ng, bs.block_n), lambda i, j: (0, j)))  # mins [K/G, bn]
        args.append(mins)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, n), x.dtype),
        grid=(mp // bm, n // bs.block_n),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bs.block_n), lambda i, j: (i, j)),
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="w4a16_matmul",
    )(*args)  # [mp, N]
    return out[:m]


def w4a16_matmul_reference(
    x: jax.Array, packed: jax.Array, scales: jax.Array, mins: jax.Array | None = None
) -> jax.Array:
    """Pure-jnp reference: dequantize to float32, round to x.dtype, dot with float32 accumulation.

    Args:
      x: float activations [M, K].
      packed: uint8 packed int4 codes [K/2, N].
      scales: float scales [K/G, N].
      mins: float mins [K/G, N] or None (symmetric).

    Returns:
      [M, N] array of x.dtype.
    """
    w = dequantize_int4(packed, scales, mins, jnp.float32).astype(x.dtype)  # [K, N]
    out = jnp.dot(
        x, w, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
    )  # [M, N]
    return out.astype(x.dtype)


@jax.jit
def w4a16_matmul_xla(
    x: jax.Array, packed: jax.Array, scales: jax.Array, mins: jax.Array | None = None
) -> jax.Array:
    """The XLA path used off-GPU: the reference, jitted (dequantize then one jnp.dot).

    Args:
      x: float activations [M, K].
      packed: uint8 packed int4 codes [K/2, N].
      scales: float scales [K/G, N].
      mins: float mins [K/G, N] or None (symmetric).

    Returns:
      [M, N] array of x.dtype.
    """
    return w4a16_matmul_reference(x, packed, scales, mins)
