"""Decoding: sampling, the generation state, and the jitted autoregressive / QSpec loops."""

from qspec_jax.decoding.loop import (
    FINISH_NAMES,
    MODES,
    DecodeConfig,
    DecodeState,
    generate,
    generate_python,
    step,
)
from qspec_jax.decoding.sampling import SamplingConfig

__all__ = [
    "FINISH_NAMES",
    "MODES",
    "DecodeConfig",
    "DecodeState",
    "SamplingConfig",
    "generate",
    "generate_python",
    "step",
]
