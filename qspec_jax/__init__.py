"""qspec-jax: QSpec speculative decoding with complementary quantization, in JAX/Pallas.

One packed int4 weight copy and one KV cache serve a W4A4 drafter and a W4A16 verifier; greedy
output equals W4A16 greedy output exactly.

    engine = qspec_jax.load("smollm2-135m", quant="quarot-rtn")
    result = engine.generate(["Hello"], mode="qspec", gamma=3)
"""

from qspec_jax.config import PRESETS, LlamaConfig, QuantConfig
from qspec_jax.engine import Engine, GenerationResult, UsageError, load

__all__ = ["PRESETS", "Engine", "GenerationResult", "LlamaConfig", "QuantConfig", "UsageError", "load"]
__version__ = "0.1.0"
