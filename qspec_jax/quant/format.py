"""The quantized weight pytree: one packed int4 copy read by every precision."""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from pallas_kernels.int4 import dequantize_int4


@struct.dataclass
class QuantizedWeight:
    """A [..., K, N] weight stored as packed int4 codes (layout in `pallas_kernels.int4`).

    Attributes:
        packed: uint8 [..., K // 2, N], two 4-bit codes a byte along K.
        scales: float32 [..., K // G, N], one scale per group of G input rows per output column.
        mins: float32 [..., K // G, N] for asymmetric codes in [0, 15] (w = code * scale + min),
            or None for symmetric codes in [-8, 7] (w = code * scale).

    The group size G and the logical shape are derived from the array shapes, so they are static
    under `jit` without extra fields. Leading axes (e.g. the stacked layer axis) are allowed.
    """

    packed: jnp.ndarray
    scales: jnp.ndarray
    mins: jnp.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, k2, n = self.packed.shape
        return (*lead, 2 * k2, n)

    @property
    def in_features(self) -> int:
        return self.shape[-2]

    @property
    def out_features(self) -> int:
        return self.shape[-1]

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[-2]

    @property
    def symmetric(self) -> bool:
        return self.mins is None

    @property
    def nbytes(self) -> int:
        n = self.packed.nbytes + self.scales.nbytes
        return n + (self.mins.nbytes if self.mins is not None else 0)

    def dequantize(self, dtype=jnp.float32) -> jnp.ndarray:
        """The float weight [..., K, N] this represents."""
        return dequantize_int4(self.packed, self.scales, self.mins, dtype)


Weight = jnp.ndarray | QuantizedWeight
