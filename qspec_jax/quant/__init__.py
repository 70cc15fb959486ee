"""Weight quantization: the packed int4 format and the offline quantizers."""

from qspec_jax.quant.format import QuantizedWeight, Weight

__all__ = ["QuantizedWeight", "Weight"]
