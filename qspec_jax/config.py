"""Static configuration: model shapes, quantization settings, precisions.

Every config here is a frozen, hashable dataclass so it can be passed to `jax.jit` as a static
argument. Arrays (weights, caches, lengths) are never stored in a config.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

Precision = Literal["fp", "w4a16", "w4a4", "w4a8"]


@dataclasses.dataclass(frozen=True)
class PrecisionSpec:
    """One activation precision of a forward pass: what its linears read and compute.

    Attributes:
        name: the precision's name, also the autoregressive mode of that name.
        weights: "float" (the unquantized model's weights) or "int4" (the packed int4 copy).
        act_bits: activation bits the linears compute with (16: float activations).
        cost_rank: cheaper first: the order a draft hierarchy must follow (SpecMQuant's levels).
        draft: may draft for a higher precision over the same weights (QSpec's drafters).
        verifies: may verify drafts exactly (its greedy output is what speculation reproduces).
        summary: one line for tables and help texts.
    """

    name: str
    weights: str
    act_bits: int
    cost_rank: int
    draft: bool
    verifies: bool
    summary: str

    @property
    def quantized(self) -> bool:
        return self.weights == "int4"


# The one table of activation precisions; every other list of precision names derives from it.
PRECISION_TABLE: dict[str, PrecisionSpec] = {
    p.name: p
    for p in (
        PrecisionSpec("fp", "float", 16, 3, False, False, "float weights and activations"),
        PrecisionSpec(
            "w4a16", "int4", 16, 2, False, True, "int4 weights dequantized, float activations"
        ),
        PrecisionSpec("w4a8", "int4", 8, 1, True, False, "int4 weights, int8 activations"),
        PrecisionSpec("w4a4", "int4", 4, 0, True, False, "int4 weights, int4 activations"),
    )
}
PRECISIONS: tuple[str, ...] = ("fp", "w4a16", "w4a4", "w4a8")
assert set(PRECISIONS) == set(PRECISION_TABLE)
QUANTIZED_PRECISIONS: tuple[str, ...] = tuple(p for p in PRECISIONS if PRECISION_TABLE[p].quantized)
# QSpec's drafters read the same int4 weights with int4 or int8 activations (W4A8 runs on int8
# units every target has; Hopper has no int4 MMA).
DRAFT_PRECISIONS: tuple[str, ...] = tuple(p for p in PRECISIONS if PRECISION_TABLE[p].draft)
# A SpecMQuant hierarchy's levels, cheapest first; the last level is the output precision.
LEVEL_PRECISIONS: tuple[str, ...] = tuple(
    sorted(
        (p for p in QUANTIZED_PRECISIONS),
        key=lambda p: PRECISION_TABLE[p].cost_rank,
    )
)


def check_precision(name: str, what: str = "precision", allowed=PRECISIONS) -> str:
    """Returns `name` if it is one of `allowed`, else raises ValueError naming the choices."""
    if name not in allowed:
        raise ValueError(f"unknown {what} {name!r}: choose one of {', '.join(allowed)}")
    return name


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling ("llama3" rope_type)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-family decoder (Llama-2/3, SmolLM2, Qwen2).

    Attributes:
        name: preset name, informational.
        vocab_size: vocabulary size V.
        hidden_size: residual width D.
        intermediate_size: SwiGLU width F.
        num_layers: number of decoder blocks L.
        num_heads: query heads H.
        num_kv_heads: key/value heads (grouped-query attention), divides H.
        head_dim: per-head width, usually D // H.
        rope_theta: RoPE base.
        rope_scaling: Llama-3 frequency scaling, or None for plain RoPE.
        rms_norm_eps: RMSNorm epsilon.
        tie_embeddings: whether the LM head is the transposed token embedding.
        qkv_bias: whether q/k/v projections have a bias (Qwen2).
        max_position_embeddings: the longest context the model was trained for.
        sliding_window: attention window of a sliding-window model (Mistral), or None. No
            attention path here masks by window, so a sequence longer than the window is
            refused (`check_context`) instead of giving logits the model would not give.
        bos_token_id / eos_token_ids / pad_token_id: special tokens.
        dtype: name of the activation dtype ("float32" on CPU, "bfloat16" on GPU).
    """

    name: str = "custom"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int = 0
    dtype: str = "float32"
    sliding_window: int | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    def check_context(self, n_tokens: int, where: str) -> None:
        """Refuses a sequence of `n_tokens` that passes the model's sliding window.

        Full causal attention equals sliding-window attention while every sequence fits the
        window; past it the model's logits differ, and no attention path here masks by window.

        Args:
            n_tokens: the longest sequence (prompt and generated tokens) the request can reach.
            where: what is being asked, for the message (e.g. "generate").

        Raises:
            ValueError: `n_tokens` exceeds `sliding_window`.
        """
        w = self.sliding_window
        if w is not None and n_tokens > w:
            raise ValueError(
                f"{where}: a sequence of {n_tokens} tokens passes this model's sliding attention "
                f"window of {w} tokens, which is not implemented; keep prompt plus new tokens "
                f"within {w}."
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> LlamaConfig:
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How the weights were quantized and how activations are quantized in the low-bit modes.

    Attributes:
        method: "none" (float weights), "gguf" (the checkpoint's own 4-bit codes, kept exactly),
            "rtn", "gptq", "quarot-rtn", "quarot-gptq".
        group_size: weight group size along the input dimension; 0 means one group per output
            channel (per-channel).
        symmetric: symmetric int4 weights in [-8, 7] with one scale per group; otherwise asymmetric
            (codes in [0, 15], a scale and a minimum per group, as GGUF Q4_1).
        rotated: the residual stream was rotated (QuaRot): RMSNorm scales folded into the next
            linears and an online Hadamard transform applied to the inputs of o_proj and down_proj.
        act_group_size: 0 for per-token activation scales, else scales per group of input channels.
        act_clip_ratio: activation scales are clip_ratio * max|x| / qmax.
    """

    method: str = "none"
    group_size: int = 0
    symmetric: bool = True
    rotated: bool = False
    act_group_size: int = 0
    act_clip_ratio: float = 1.0

    @property
    def quantized(self) -> bool:
        return self.method != "none"


NO_QUANT = QuantConfig()

PRESETS: dict[str, LlamaConfig] = {
    # SmolLM2-135M-Instruct (the embedded model).
    "smollm2-135m": LlamaConfig(
        name="smollm2-135m",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_embeddings=True,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_ids=(2,),
        pad_token_id=2,
    ),
    "llama-2-7b": LlamaConfig(
        name="llama-2-7b",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
    "llama-3-8b": LlamaConfig(
        name="llama-3-8b",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(),
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_ids=(128001, 128009),
        pad_token_id=128001,
    ),
    "qwen2-7b": LlamaConfig(
        name="qwen2-7b",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        max_position_embeddings=32768,
        bos_token_id=None,
        eos_token_ids=(151643, 151645),
        pad_token_id=151643,
    ),
    # A tiny model for tests: every width a multiple of 64 (the int4 pack tile).
    "tiny": LlamaConfig(
        name="tiny",
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rope_theta=10000.0,
        tie_embeddings=False,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_ids=(2,),
        pad_token_id=0,
    ),
}


def preset(name: str) -> LlamaConfig:
    """Returns the named preset config; raises ValueError naming the known presets."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None
