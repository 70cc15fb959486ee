"""Decoding: the decoding methods, the generation state, and the jitted generation loop."""

from qspec_jax.decoding.config import DecodeConfig
from qspec_jax.decoding.loop import (
    FINISH_NAMES,
    MODES,
    SPEC_MODES,
    generate,
    generate_python,
    prefill,
    step,
)
from qspec_jax.decoding.methods import (
    AR,
    REGISTRY,
    DecodingMethod,
    HSpec,
    MethodError,
    QSpec,
    QuantSpec,
)
from qspec_jax.decoding.sampling import SamplingConfig
from qspec_jax.decoding.state import DecodeState

__all__ = [
    "AR",
    "FINISH_NAMES",
    "MODES",
    "REGISTRY",
    "SPEC_MODES",
    "DecodeConfig",
    "DecodeState",
    "DecodingMethod",
    "HSpec",
    "MethodError",
    "QSpec",
    "QuantSpec",
    "SamplingConfig",
    "generate",
    "generate_python",
    "prefill",
    "step",
]
