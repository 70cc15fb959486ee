"""qspec-jax: QSpec speculative decoding with complementary quantization, in JAX/Pallas.

One packed int4 weight copy and one KV cache serve a low-precision drafter (W4A8 or W4A4) and a
W4A16 verifier; greedy output equals W4A16 greedy output exactly.

    engine = qspec_jax.load("smollm2-135m", quant="gguf")
    result = engine.generate(["Hello"], method=qspec_jax.QSpec(gamma=3))
    result = engine.generate(["Hello"], mode="qspec", gamma=3)      # the same, as a shorthand

Decoding methods (`qspec_jax.decoding.methods`): `AR`, `QSpec`, `QuantSpec`, `HSpec`,
`DraftModelSpec`. The
functional API (`qspec_jax.generate`, `prefill`, `step`) runs inside your own `jax.jit`.
"""

from qspec_jax.config import PRESETS, LlamaConfig, QuantConfig
from qspec_jax.decoding import FINISH_NAMES, DecodeConfig, DecodeState, SamplingConfig
from qspec_jax.decoding.methods import (
    AR,
    REGISTRY,
    DecodingMethod,
    DraftModelSpec,
    HSpec,
    QSpec,
    QuantSpec,
)
from qspec_jax.engine import Engine, GenerationResult, UsageError, load
from qspec_jax.functional import decode_config, generate, init_cache, prefill, step

__all__ = [
    "AR",
    "FINISH_NAMES",
    "PRESETS",
    "REGISTRY",
    "DecodeConfig",
    "DecodeState",
    "DecodingMethod",
    "DraftModelSpec",
    "Engine",
    "GenerationResult",
    "HSpec",
    "LlamaConfig",
    "QSpec",
    "QuantConfig",
    "QuantSpec",
    "SamplingConfig",
    "UsageError",
    "decode_config",
    "generate",
    "init_cache",
    "load",
    "prefill",
    "step",
]
__version__ = "0.1.0"
