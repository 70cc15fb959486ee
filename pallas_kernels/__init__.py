"""Pallas kernels for int4 weights: W4A16 and W4A4/W4A8 matmuls, activation quantization, Hadamard.

Each kernel module has a pure-jnp reference beside the Pallas kernel; `pallas_kernels.dispatch`
picks Pallas on GPU and the XLA reference elsewhere.
"""

from pallas_kernels.int4 import PACK_TILE, dequantize_int4, pack_int4, unpack_int4

__all__ = ["PACK_TILE", "dequantize_int4", "pack_int4", "unpack_int4"]
