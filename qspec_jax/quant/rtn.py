"""Round-to-nearest (RTN) int4 weight quantization into the packed `QuantizedWeight` format.

A weight w [..., K, N] (stored [in, out], y = x @ w) is split into groups of G consecutive input
rows per output column (G = K for one group per output channel). Per group:

* symmetric: ``scale = r * max|w| / 7``, ``code = clip(round(w / scale), -8, 7)``, ``w ~ code * scale``;
* asymmetric: ``scale = r * (max - min) / 15`` and ``min`` the group minimum (shifted inward when
  r < 1), ``code = clip(round((w - min) / scale), 0, 15)``, ``w ~ code * scale + min``;

with the clip ratio r = 1 (plain RTN) or, with ``clip_search``, the r of `CLIP_GRID` that minimises
the group's squared reconstruction error (r = 1 is in the grid, so the search never does worse
than plain RTN on that error). Rounding is round-half-to-even. A group whose values are all equal
(e.g. all zero) gets scale 1 and is reconstructed exactly.

Everything is vectorised over leading axes (the stacked layer axis).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int4 import HALF_TILE, PACK_TILE, check_packable
from qspec_jax.quant.format import QuantizedWeight

# Clip ratios tried by the clip search (r = 1.0 first: ties keep plain RTN).
CLIP_GRID: tuple[float, ...] = tuple(np.round(np.arange(1.0, 0.49, -0.025), 3).tolist())

SYM_QMIN, SYM_QMAX = -8, 7
ASYM_QMAX = 15


def resolve_group_size(k: int, group_size: int, *, warn: bool = False) -> int:
    """The group size G actually used for an input dimension k.

    0 means per channel (G = k). A requested G that is a multiple of 32 and divides k is used as
    is; otherwise the largest multiple of 32 not above it that divides k (always exists because
    packable k are multiples of 64), e.g. 128 -> 96 for k = 576 (SmolLM2's hidden size).

    Raises:
        ValueError: k is not packable (not a multiple of 64) or group_size is negative.
    """
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0 (0 = per channel), got {group_size}")
    check_packable(k, 0)
    if group_size == 0 or group_size >= k:
        return k
    g = group_size - group_size % HALF_TILE
    while g > HALF_TILE and k % g:
        g -= HALF_TILE
    g = max(g, HALF_TILE)
    if g != group_size and warn:
        warnings.warn(
            f"weight group size {group_size} does not divide the input dimension {k} (or is not a "
            f"multiple of {HALF_TILE}); using {g} for this weight",
            stacklevel=3,
        )
    return g


def pack_codes(codes: np.ndarray) -> jnp.ndarray:
    """`pallas_kernels.int4.pack_int4` in numpy (no per-shape compile): int codes [..., K, N] ->
    uint8 [..., K // 2, N]; byte (t * 32 + r) holds row t * 64 + r low, t * 64 + 32 + r high."""
    *lead, k, n = codes.shape
    nib = (np.asarray(codes).astype(np.int32) & 0xF).astype(np.uint8)
    nib = nib.reshape(*lead, k // PACK_TILE, 2, HALF_TILE, n)
    packed = nib[..., 0, :, :] | (nib[..., 1, :, :] << 4)
    return jnp.asarray(packed.reshape(*lead, k // 2, n))


def _groups(w: np.ndarray, g: int) -> np.ndarray:
    """[..., K, N] -> [..., K // g, g, N] (a view)."""
    *lead, k, n = w.shape
    return w.reshape(*lead, k // g, g, n)


def _xp(a):
    """numpy for numpy arrays, jax.numpy for jax arrays and tracers (the GPTQ loop is jitted)."""
    return jnp if isinstance(a, jax.Array) else np


def symmetric_codes(w, scale):
    """clip(round(w / scale), -8, 7) with broadcasting (scale > 0); numpy or jax arrays."""
    xp = _xp(w)
    return xp.clip(xp.round(w / scale), SYM_QMIN, SYM_QMAX)


def asymmetric_codes(w, scale, mn):
    """clip(round((w - min) / scale), 0, 15) with broadcasting (scale > 0); numpy or jax arrays."""
    xp = _xp(w)
    return xp.clip(xp.round((w - mn) / scale), 0, ASYM_QMAX)


def group_params(wg, symmetric: bool, clip_search: bool = False):
    """Scales (and mins) of grouped weights wg [..., G, N] (the group axis is -2).

    Works on numpy arrays and on jax arrays (inside jit).

    Returns:
        (scale [..., 1, N], min [..., 1, N] or None), float arrays of wg's dtype.
    """
    xp = _xp(wg)
    ratios = CLIP_GRID if clip_search else (1.0,)
    if symmetric:
        amax = xp.max(xp.abs(wg), axis=-2, keepdims=True)
        base = xp.where(amax > 0, amax / SYM_QMAX, 1.0)
    else:
        hi = xp.max(wg, axis=-2, keepdims=True)
        lo = xp.min(wg, axis=-2, keepdims=True)
        base = xp.where(hi > lo, (hi - lo) / ASYM_QMAX, 1.0)
    best_scale = best_min = best_err = None
    for r in ratios:
        if symmetric:
            scale = (base * r).astype(wg.dtype)
            mn = None
            deq = symmetric_codes(wg, scale) * scale
        else:
            # Shrink the range [lo, hi] by r about its centre (as the GPTQ / AWQ grids do).
            if r == 1.0:
                lo_r = lo
            else:
                mid = 0.5 * (hi + lo)
                lo_r = mid - r * (mid - lo)
            scale = (base * r).astype(wg.dtype)
            mn = lo_r.astype(wg.dtype)
            deq = asymmetric_codes(wg, scale, mn) * scale + mn
        if len(ratios) == 1:
            return scale, mn
        err = xp.sum((deq - wg) ** 2, axis=-2, keepdims=True)
        if best_err is None:
            best_scale, best_min, best_err = scale, mn, err
        else:
            better = err < best_err
            best_err = xp.where(better, err, best_err)
            best_scale = xp.where(better, scale, best_scale)
            if mn is not None:
                best_min = xp.where(better, mn, best_min)
    return best_scale, best_min


def quantize_weight_rtn(
    w, group_size: int = 0, symmetric: bool = True, *, clip_search: bool = False
) -> QuantizedWeight:
    """Round-to-nearest int4 quantization of a float weight.

    Args:
        w: float [..., K, N] weight ([in, out]); K a multiple of 64.
        group_size: rows of K per scale; 0 = one group per output channel. A size that does not
            divide K is reduced per `resolve_group_size` (with a warning).
        symmetric: codes in [-8, 7] with a scale per group; else codes in [0, 15] with a scale
            and a min per group.
        clip_search: per group, pick the clip ratio of `CLIP_GRID` with the least squared error.

    Returns:
        QuantizedWeight with packed [..., K/2, N], scales (and mins) float32 [..., K/G, N].
    """
    w = np.asarray(w, dtype=np.float32)
    k = w.shape[-2]
    g = resolve_group_size(k, group_size, warn=True)
    wg = _groups(w, g)  # [..., K/G, G, N]
    scale, mn = group_params(wg, symmetric, clip_search)  # [..., K/G, 1, N]
    if symmetric:
        codes = symmetric_codes(wg, scale)
    else:
        codes = asymmetric_codes(wg, scale, mn)
    codes = codes.reshape(w.shape).astype(np.int8)
    return QuantizedWeight(
        packed=pack_codes(codes),
        scales=jnp.asarray(scale[..., 0, :], jnp.float32),
        mins=None if symmetric else jnp.asarray(mn[..., 0, :], jnp.float32),
    )
