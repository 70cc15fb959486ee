"""The packed int4 weight layout shared by every kernel, quantizer and checkpoint.

A weight matrix W of shape [K, N] (K = input features, N = output features) is stored as
4-bit codes packed two per byte along K, in tiles of ``PACK_TILE`` = 64 rows:

    packed[t * 32 + r, n] = code[t * 64 + r, n]  |  code[t * 64 + 32 + r, n] << 4,   0 <= r < 32

so each byte holds an element of the lower half of a 64-row tile in its low nibble and the element
32 rows further down in its high nibble. A kernel that walks K in steps that are multiples of 64
therefore sees two contiguous 32-row halves per tile and never needs to interleave nibbles or
reshape loaded values (which Triton lowering does not allow): it multiplies ``x[:, 0:32]`` with
the low nibbles and ``x[:, 32:64]`` with the high nibbles. N is never packed, so column (tensor)
parallel splits never cut a byte.

Codes are either signed two's-complement nibbles in [-8, 7] (symmetric quantization,
w = code * scale) or unsigned in [0, 15] (asymmetric, w = code * scale + min, which holds
GGUF Q4_1 blocks exactly). Scales and mins have shape [K // G, N] for group size G (G = K for
one group per output channel); G must be a multiple of 32 so each 32-row half lies in one group.
"""

from __future__ import annotations

import jax.numpy as jnp

PACK_TILE = 64
HALF_TILE = PACK_TILE // 2


def check_packable(k: int, group_size: int) -> None:
    """Raises ValueError if a [k, n] weight cannot use group size ``group_size`` (0 = per channel)."""
    if k % PACK_TILE:
        raise ValueError(
            f"int4 packing needs the input dimension to be a multiple of {PACK_TILE}, got {k}"
        )
    g = group_size or k
    if g % HALF_TILE or k % g:
        raise ValueError(
            f"group size {group_size} must be a multiple of {HALF_TILE} that divides the input dimension {k}"
        )


def pack_int4(codes: jnp.ndarray) -> jnp.ndarray:
    """Packs int4 codes [..., K, N] (signed [-8, 7] or unsigned [0, 15]) into uint8 [..., K//2, N]."""
    *lead, k, n = codes.shape
    if k % PACK_TILE:
        raise ValueError(f"pack_int4: K={k} is not a multiple of {PACK_TILE}")
    nib = (codes.astype(jnp.int32) & 0xF).astype(jnp.uint8)
    nib = nib.reshape(*lead, k // PACK_TILE, 2, HALF_TILE, n)  # [..., tiles, 2, 32, N]
    packed = nib[..., 0, :, :] | (nib[..., 1, :, :] << 4)  # [..., tiles, 32, N]
    return packed.reshape(*lead, k // 2, n)


def unpack_int4(packed: jnp.ndarray, signed: bool) -> jnp.ndarray:
    """Inverse of `pack_int4`: uint8 [..., K//2, N] -> int8 codes [..., K, N]."""
    *lead, k2, n = packed.shape
    p = packed.reshape(*lead, k2 // HALF_TILE, HALF_TILE, n)  # [..., tiles, 32, N]
    lo = (p & 0xF).astype(jnp.int8)
    hi = (p >> 4).astype(jnp.int8)
    codes = jnp.stack([lo, hi], axis=-3)  # [..., tiles, 2, 32, N]
    if signed:
        codes = ((codes ^ 8) - 8).astype(jnp.int8)  # sign-extend the nibble
    return codes.reshape(*lead, 2 * k2, n)


def expand_groups(per_group: jnp.ndarray, k: int) -> jnp.ndarray:
    """Repeats per-group rows [..., K//G, N] to per-row [..., K, N]."""
    g = k // per_group.shape[-2]
    return jnp.repeat(per_group, g, axis=-2)


def dequantize_int4(
    packed: jnp.ndarray,
    scales: jnp.ndarray,
    mins: jnp.ndarray | None,
    dtype=jnp.float32,
) -> jnp.ndarray:
    """Dequantizes packed int4 to float [..., K, N]: code * scale (+ min when asymmetric)."""
    codes = unpack_int4(packed, signed=mins is None)
    k = codes.shape[-2]
    w = codes.astype(jnp.float32) * expand_groups(scales.astype(jnp.float32), k)
    if mins is not None:
        w = w + expand_groups(mins.astype(jnp.float32), k)
    return w.astype(dtype)
