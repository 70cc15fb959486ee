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


Q8_GROUP = 32  # values per scale in GGUF's Q8_0 layout


@struct.dataclass
class Q8Head:
    """An LM head stored as int8 codes with one scale per 32 values (GGUF's Q8_0 layout).

    Only ever built from a float head that lies exactly on this grid (`q8_head_from_float`), so
    it holds the same weights as the float head: SmolLM2's GGUF stores its tied embedding as
    Q8_0, and the loader's float embedding is `scale * code` of it, exactly. The model then reads
    28 MB of codes per token instead of 113 MB of float32 (`pallas_kernels.dispatch.q8_matmul`).

    Attributes:
        codes: int8 [V, D], row v the weights of logit v (the embedding's layout).
        scales: float32 [V, D // 32].
    """

    codes: jnp.ndarray
    scales: jnp.ndarray

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def dequantize(self, dtype=jnp.float32) -> jnp.ndarray:
        """The float head [V, D] this represents (exactly the head it was built from)."""
        v, d = self.codes.shape
        s = jnp.repeat(self.scales.astype(jnp.float32), Q8_GROUP, axis=1)  # [V, D]
        return (self.codes.astype(jnp.float32) * s).astype(dtype)


def q8_head_from_float(w_vd, probe_rows: int = 64) -> Q8Head | None:
    """The `Q8Head` holding exactly the float head w [V, D], or None when w is not on the grid.

    On the grid means: every group of 32 consecutive values of a row equals ``scale * code`` in
    float32 with integer codes in [-127, 127] and scale = max|w| / 127 over the group (how
    llama.cpp's Q8_0 quantizer picks it, so the largest code is +-127). Checked exactly, value by
    value; a rotated or re-quantized head fails the check on its first rows (`probe_rows`) and
    costs almost nothing.

    Args:
        w_vd: float32 [V, D] array (numpy or jax), D a multiple of 32.
        probe_rows: rows checked first, before converting the whole matrix.

    Returns:
        The Q8Head, or None.
    """
    import numpy as np  # noqa: PLC0415

    w = np.asarray(w_vd)
    if w.ndim != 2 or w.dtype != np.float32 or w.shape[1] % Q8_GROUP:
        return None

    def convert(rows):
        g = rows.reshape(rows.shape[0], -1, Q8_GROUP)  # [v, D/32, 32]
        scale = (np.abs(g).max(axis=-1) / np.float32(127)).astype(np.float32)  # [v, D/32]
        safe = np.where(scale > 0, scale, np.float32(1))
        codes = np.rint(g / safe[..., None])
        if np.abs(codes).max(initial=0) > 127:
            return None
        codes = codes.astype(np.int8)
        if not np.array_equal(codes.astype(np.float32) * scale[..., None], g):
            return None
        return codes.reshape(rows.shape), scale

    if convert(w[:probe_rows]) is None:
        return None
    full = convert(w)
    if full is None:
        return None
    return Q8Head(codes=jnp.asarray(full[0]), scales=jnp.asarray(full[1]))
