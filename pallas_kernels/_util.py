"""Small helpers shared by the Pallas kernels: block-size choice, padding, exact rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.int4 import HALF_TILE, PACK_TILE

MIN_DOT = 16  # Triton's tl.dot needs every dimension >= 16.


def is_pow2(n: int) -> bool:
    """True if n is a positive power of two."""
    return n >= 1 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def largest_pow2_divisor(n: int, cap: int) -> int:
    """Largest power of two that divides n and is <= cap."""
    p = 1
    while p * 2 <= cap and n % (p * 2) == 0:
        p *= 2
    return p


def pick_block(dim: int, requested: int, minimum: int, what: str) -> int:
    """The block size for a dimension: ``requested`` if it divides ``dim``, else the largest
    power of two <= requested that divides ``dim``.

    Raises:
      NotImplementedError: if that block would be smaller than ``minimum``.
    """
    b = requested if dim % requested == 0 else largest_pow2_divisor(dim, requested)
    if b < minimum:
        raise NotImplementedError(
            f"{what}={dim} has no power-of-two block >= {minimum} dividing it (requested {requested})"
        )
    return b


def check_block(dim: int, block: int, minimum: int, what: str) -> None:
    """Validates an explicitly requested block size.

    Raises:
      NotImplementedError: if ``block`` is not a power of two >= minimum dividing ``dim``.
    """
    if not is_pow2(block) or block < minimum or dim % block:
        raise NotImplementedError(
            f"block size {block} for {what}={dim} must be a power of two >= {minimum} dividing it"
        )


def row_block(m: int, block_m: int) -> tuple[int, int]:
    """(bm, padded_m): the row block (>= 16, power of two) and M padded to a multiple of it."""
    bm = max(MIN_DOT, min(block_m, next_pow2(m)))
    return bm, -(-m // bm) * bm


def pad_rows(x: jax.Array, rows: int) -> jax.Array:
    """Zero-pads the first axis of x up to ``rows``."""
    if x.shape[0] == rows:
        return x
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def weight_group_size(k: int, n: int, packed_shape, scales_shape, mins_shape=None) -> int:
    """Validates packed/scales/mins shapes against K, N and returns the weight group size G.

    Raises:
      NotImplementedError: K not a multiple of 64, or G not a multiple of 32 dividing K.
      ValueError: inconsistent shapes.
    """
    if k % PACK_TILE:
        raise NotImplementedError(f"K={k} is not a multiple of the int4 pack tile {PACK_TILE}")
    if tuple(packed_shape) != (k // 2, n):
        raise ValueError(f"packed shape {tuple(packed_shape)} != (K/2, N) = {(k // 2, n)}")
    ng, n2 = scales_shape
    if n2 != n or ng < 1 or k % ng:
        raise NotImplementedError(f"scales shape {tuple(scales_shape)} does not tile K={k}, N={n}")
    g = k // ng
    if g % HALF_TILE:
        raise NotImplementedError(f"weight group size {g} is not a multiple of {HALF_TILE}")
    if mins_shape is not None and tuple(mins_shape) != tuple(scales_shape):
        raise ValueError(f"mins shape {tuple(mins_shape)} != scales shape {tuple(scales_shape)}")
    return g


def round_half_even(v: jax.Array) -> jax.Array:
    """Round to nearest, ties to even, from floor/compare only (Triton has no round op).

    Bit-identical to ``jnp.round`` for finite float32 inputs with |v| < 2^23 (``v - floor(v)`` is
    exact there).
    """
    r = jnp.floor(v)
    frac = v - r
    odd = (r - 2.0 * jnp.floor(r * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return jnp.where(up, r + 1.0, r)
