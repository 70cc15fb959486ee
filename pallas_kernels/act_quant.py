"""Activation quantization to int4 / int8 codes with per-token or per-group scales.

`quantize_activations` computes, for x [M, K] (any float dtype, math in float32), bits b in
{4, 8}, qmax = 2^(b-1) - 1 (7 or 127), group size Ga (0 = per token, i.e. Ga = K) and a clip
ratio r:

    amax[m, j]  = max_{k in group j} |x[m, k]|
    scale[m, j] = amax[m, j] * float32(r / qmax),   replaced by 1 where it is 0 (all-zero group:
                  no NaN; r / qmax is computed in float64 then rounded once to float32)
    code[m, k]  = clip(round_half_even(x[m, k] / scale[m, k // Ga]), -qmax - 1, qmax)   (int8)

and returns (codes int8 [M, K], scales float32 [M, K / Ga]). Within the clip range
(|x| <= r * amax) the error is |x - code * scale| <= scale / 2.

`rmsnorm_quantize` first applies RMSNorm in float32,

    y[m, k] = (x[m, k] * rsqrt(sum_k x[m, k]^2 / K + eps)) * w[k],

then quantizes y exactly as above. Kernel and reference differ only in the order of the sum of
squares (so a code can differ by one where y / scale lies within rounding of a .5 boundary).

Kernel structure (Triton lowering): grid (M / block_m,); per row block, for each group a first
pass over power-of-two column chunks (block_k columns, dividing Ga) takes the running max of
|x|, then a second pass writes the codes; the scale column is stored with
``scales_ref[:, pl.ds(j, 1)]``. Rounding is done with floor/compare (Triton has no round op),
bit-identical to ``jnp.round``.

Supported: Ga a multiple of 32 dividing K (per token: any K that is a multiple of 32); any M.
Otherwise NotImplementedError.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _util


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes of the activation-quantization kernels.

    Attributes:
      block_m: rows per program (power of two; M is zero-padded up to it).
      block_n: unused (kept for a uniform block-size interface).
      block_k: the largest column chunk per load (power of two; the chunk used is the largest
        power of two <= block_k dividing the group size, at least 32).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages.
    """

    block_m: int = 16
    block_n: int = 0
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 1


def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise NotImplementedError(f"activation quantization supports 4 or 8 bits, got {bits}")
    return 2 ** (bits - 1) - 1


def _group(k: int, group_size: int) -> int:
    ga = group_size or k
    if k % ga:
        raise NotImplementedError(f"activation group size {ga} does not divide K={k}")
    return ga


def _scale_from_amax(amax: jax.Array, clip_ratio: float, qmax: int) -> jax.Array:
    scale = amax * jnp.float32(clip_ratio / qmax)  # one rounding: r / qmax folded in float64
    return jnp.where(scale > 0, scale, jnp.float32(1.0))


def _quant_kernel(x_ref, *rest, ga, chunk, qmax, clip_ratio, eps, with_norm):
    """One row block: (optional RMSNorm) then per-group quantization."""
    if with_norm:
        w_ref, codes_ref, scales_ref = rest
    else:
        codes_ref, scales_ref = rest
        w_ref = None
    bm, k = x_ref.shape
    n_chunks = ga // chunk

    inv_rms = None
    if with_norm:

        def sumsq(i, acc):
            xc = x_ref[:, pl.ds(pl.multiple_of(i * chunk, chunk), chunk)].astype(jnp.float32)
            return acc + jnp.sum(xc * xc, axis=1, keepdims=True)  # [bm, 1]

        ss = jax.lax.fori_loop(0, k // chunk, sumsq, jnp.zeros((bm, 1), jnp.float32))  # [bm, 1]
        inv_rms = jax.lax.rsqrt(ss / jnp.float32(k) + jnp.float32(eps))  # [bm, 1]

    def load(col):
        xc = x_ref[:, pl.ds(col, chunk)].astype(jnp.float32)  # [bm, chunk]
        if with_norm:
            wc = w_ref[:, pl.ds(col, chunk)].astype(jnp.float32)  # [1, chunk]
            xc = (xc * inv_rms) * wc  # [bm, chunk]
        return xc

    def group(j, carry):
        def amax_body(i, amax):
            xc = load(pl.multiple_of(j * ga + i * chunk, chunk))  # [bm, chunk]
            return jnp.maximum(amax, jnp.max(jnp.abs(xc), axis=1, keepdims=True))  # [bm, 1]

        amax = jax.lax.fori_loop(0, n_chunks, amax_body, jnp.zeros((bm, 1), jnp.float32))
        scale = _scale_from_amax(amax, clip_ratio, qmax)  # [bm, 1]
        scales_ref[:, pl.ds(j, 1)] = scale

        def code_body(i, c):
            col = pl.multiple_of(j * ga + i * chunk, chunk)
            q = _util.round_half_even(load(col) / scale)  # [bm, chunk]
            q = jnp.clip(q, jnp.float32(-qmax - 1), jnp.float32(qmax))
            codes_ref[:, pl.ds(col, chunk)] = q.astype(jnp.int32).astype(jnp.int8)
            return c

        jax.lax.fori_loop(0, n_chunks, code_body, 0)
        return carry

    jax.lax.fori_loop(0, k // ga, group, 0)


def _quantize_call(x, w, *, bits, group_size, clip_ratio, eps, block_sizes, interpret, name):
    m, k = x.shape
    qmax = _qmax(bits)
    ga = _group(k, group_size)
    if ga % 32:
        raise NotImplementedError(
            f"act-quant kernel needs a group size that is a multiple of 32, got {ga}"
        )
    bs = block_sizes or BlockSizes()
    if not _util.is_pow2(bs.block_m) or not _util.is_pow2(bs.block_k) or bs.block_k < 32:
        raise NotImplementedError(
            f"block_m={bs.block_m}, block_k={bs.block_k} must be powers of two (block_k >= 32)"
        )
    chunk = _util.largest_pow2_divisor(ga, bs.block_k)  # >= 32 since 32 | ga
    bm = min(bs.block_m, _util.next_pow2(m))
    mp = -(-m // bm) * bm
    xp = _util.pad_rows(x, mp)  # [mp, K]
    kernel = functools.partial(
        _quant_kernel,
        ga=ga,
        chunk=chunk,
        qmax=qmax,
        clip_ratio=float(clip_ratio),
        eps=float(eps),
        with_norm=w is not None,
    )
    in_specs = [pl.BlockSpec((bm, k), lambda i: (i, 0))]  # x [bm, K]
    args = [xp]
    if w is not None:
        in_specs.append(pl.BlockSpec((1, k), lambda i: (0, 0)))  # norm weight [1, K]
        args.append(w.reshape(1, k))
    codes, scales = pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((mp, k), jnp.int8),
            jax.ShapeDtypeStruct((mp, k // ga), jnp.float32),
        ),
        grid=(mp // bm,),
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((bm, k), lambda i: (i, 0)),  # codes [bm, K]
            pl.BlockSpec((bm, k // ga), lambda i: (i, 0)),  # scales [bm, K/Ga]
        ),
        compiler_params=pltriton.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        interpret=interpret,
        name=name,
    )(*args)
    return codes[:m], scales[:m]


@functools.partial(
    jax.jit, static_argnames=("bits", "group_size", "clip_ratio", "block_sizes", "interpret")
)
def quantize_activations(
    x: jax.Array,
    *,
    bits: int,
    group_size: int = 0,
    clip_ratio: float = 1.0,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Pallas activation quantization (see module docstring for the exact function).

    Args:
      x: float activations [M, K].
      bits: 4 or 8.
      group_size: activation group size Ga (0 = per token).
      clip_ratio: scale multiplier r in (0, 1].
      block_sizes: block sizes (None = defaults).
      interpret: run in Pallas interpret mode (CPU testing).

    Returns:
      (codes int8 [M, K], scales float32 [M, K / Ga]).

    Raises:
      NotImplementedError: unsupported bits, group size or block sizes.
    """
    return _quantize_call(
        x,
        None,
        bits=bits,
        group_size=group_size,
        clip_ratio=clip_ratio,
        eps=0.0,
        block_sizes=block_sizes,
        interpret=interpret,
        name="quantize_activations",
    )


@functools.partial(
    jax.jit,
    static_argnames=("eps", "bits", "group_size", "clip_ratio", "block_sizes", "interpret"),
)
def rmsnorm_quantize(
    x: jax.Array,
    norm_weight: jax.Array,
    eps: float,
    *,
    bits: int,
    group_size: int = 0,
    clip_ratio: float = 1.0,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Fused Pallas RMSNorm + activation quantization (see module docstring).

    Args:
      x: float activations [M, K].
      norm_weight: RMSNorm weight [K].
      eps: RMSNorm epsilon.
      bits: 4 or 8.
      group_size: activation group size Ga (0 = per token).
      clip_ratio: scale multiplier r in (0, 1].
      block_sizes: block sizes (None = defaults).
      interpret: run in Pallas interpret mode (CPU testing).

    Returns:
      (codes int8 [M, K], scales float32 [M, K / Ga]) of the normalized activations.

    Raises:
      NotImplementedError: unsupported bits, group size or block sizes.
    """
    return _quantize_call(
        x,
        norm_weight,
        bits=bits,
        group_size=group_size,
        clip_ratio=clip_ratio,
        eps=eps,
        block_sizes=block_sizes,
        interpret=interpret,
        name="rmsnorm_quantize",
    )


def quantize_activations_reference(
    x: jax.Array, *, bits: int, group_size: int = 0, clip_ratio: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Pure-jnp reference of `quantize_activations` (float32 math, ``jnp.round``).

    Args:
      x: float activations [M, K].
      bits: 4 or 8.
      group_size: activation group size Ga (0 = per token); any divisor of K.
      clip_ratio: scale multiplier.

    Returns:
      (codes int8 [M, K], scales float32 [M, K / Ga]).
    """
    m, k = x.shape
    qmax = _qmax(bits)
    ga = _group(k, group_size)
    xf = x.astype(jnp.float32).reshape(m, k // ga, ga)  # [M, K/Ga, Ga]
    amax = jnp.max(jnp.abs(xf), axis=-1)  # [M, K/Ga]
    scale = _scale_from_amax(amax, clip_ratio, qmax)  # [M, K/Ga]
    q = jnp.clip(jnp.round(xf / scale[..., None]), -qmax - 1, qmax)  # [M, K/Ga, Ga]
    return q.astype(jnp.int8).reshape(m, k), scale


def rmsnorm_reference(x: jax.Array, norm_weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32: (x * rsqrt(mean(x^2) + eps)) * w -> float32 [M, K]."""
    xf = x.astype(jnp.float32)  # [M, K]
    inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + jnp.float32(eps))  # [M, 1]
    return (xf * inv) * norm_weight.astype(jnp.float32)  # [M, K]


def rmsnorm_quantize_reference(
    x: jax.Array,
    norm_weight: jax.Array,
    eps: float,
    *,
    bits: int,
    group_size: int = 0,
    clip_ratio: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Pure-jnp reference of `rmsnorm_quantize`: `rmsnorm_reference` then quantize.

    Args:
      x: float activations [M, K].
      norm_weight: RMSNorm weight [K].
      eps: RMSNorm epsilon.
      bits: 4 or 8.
      group_size: activation group size Ga (0 = per token).
      clip_ratio: scale multiplier.

    Returns:
      (codes int8 [M, K], scales float32 [M, K / Ga]).
    """
    y = rmsnorm_reference(x, norm_weight, eps)  # [M, K]
    return quantize_activations_reference(
        y, bits=bits, group_size=group_size, clip_ratio=clip_ratio
    )


quantize_activations_xla = jax.jit(
    quantize_activations_reference, static_argnames=("bits", "group_size", "clip_ratio")
)
rmsnorm_quantize_xla = jax.jit(
    rmsnorm_quantize_reference, static_argnames=("eps", "bits", "group_size", "clip_ratio")
)
