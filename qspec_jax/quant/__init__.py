"""Weight quantization: the packed int4 format and the offline quantizers.

`quantize_model` turns float parameters into one packed int4 copy of every decoder linear
(wqkv, wo, w_gate_up, w_down) that all precisions read; embeddings and the LM head stay float.
Methods:

* "rtn": round-to-nearest per group (`qspec_jax.quant.rtn`);
* "gptq": GPTQ with calibration Hessians, layer by layer (`qspec_jax.quant.gptq`);
* "quarot-rtn" / "quarot-gptq": QuaRot rotation of the float model first
  (`qspec_jax.quant.quarot`), then RTN / GPTQ; the model then runs with ``rotated=True``.

`quantize_checkpoint` (`qspec_jax.quant.streaming`) computes the same from a checkpoint read one
decoder block at a time, so the float model is never whole in memory.

("gguf", the checkpoint's own Q4_1 codes, is handled by the loader.)
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from qspec_jax.config import LlamaConfig, QuantConfig
from qspec_jax.quant.format import QuantizedWeight, Weight

if TYPE_CHECKING:  # qspec_jax.model.params imports this package: no runtime import (cycle)
    from qspec_jax.model.params import Params

QUANT_METHODS: tuple[str, ...] = ("rtn", "gptq", "quarot-rtn", "quarot-gptq")
LINEARS: tuple[str, ...] = ("wqkv", "wo", "w_gate_up", "w_down")

# Activation-quantization defaults of the returned QuantConfig, chosen with
# experiments/quant_probe.py on SmolLM2-135M (12 prompts x 64 tokens): group-32 activation
# scales beat per-token ones clearly (quarot-gptq g32, W4A4-vs-W4A16 top-1 agreement 0.74 vs
# 0.65 teacher-forced, 0.85 vs 0.74 with W4A16 history) and group 64 (mean KL 0.37 vs 0.46);
# clip ratios 0.85-0.95 were not better than 1.0 at A4 within the noise (KL 0.35-0.40 vs
# 0.37), while clip 0.9 costs W4A8 a lot (agreement 0.98 -> 0.90) and one clip ratio serves
# both A4 and A8. (32 divides every int4-packable input dimension, a multiple of 64.)
DEFAULT_ACT_GROUP_SIZE = 32
DEFAULT_ACT_CLIP_RATIO = 1.0

__all__ = [
    "DEFAULT_ACT_CLIP_RATIO",
    "DEFAULT_ACT_GROUP_SIZE",
    "LINEARS",
    "QUANT_METHODS",
    "QuantizedWeight",
    "Weight",
    "quant_config",
    "quantize_checkpoint",
    "quantize_model",
]


def quantize_model(
    params: Params,
    cfg: LlamaConfig,
    method: str,
    group_size: int = 128,
    *,
    calib_tokens: Any = None,
    symmetric: bool = True,
    seed: int = 0,
    progress: bool = True,
    act_group_size: int | None = None,
    act_clip_ratio: float | None = None,
    randomized_hadamard: bool = False,
    clip_search: bool = True,
    percdamp: float = 0.01,
    act_order: bool = False,
    calib_seq_len: int = 512,
) -> tuple[Params, QuantConfig]:
    """Quantizes every decoder linear of a float model to packed int4.

    Args:
        params: float parameters (e.g. from `qspec_jax.loading.load_checkpoint`).
        cfg: the model config (unchanged by quantization; with QuaRot a tied LM head becomes the
            explicit float `params.lm_head`).
        method: "rtn", "gptq", "quarot-rtn" or "quarot-gptq".
        group_size: weight rows per scale along the input dimension (0 = per output channel).
            A size that does not divide a weight's input dimension K is reduced for that weight
            to the largest multiple of 32 below it that divides K (e.g. 128 -> 96 for K = 576),
            with a warning; `QuantizedWeight.group_size` reports the size used.
        calib_tokens: GPTQ calibration data: a transformers tokenizer (the project's own text of
            `qspec_jax.quant.calibration` is tokenized), int token ids [num_seqs, t], a 1-D
            stream, or a list of sequences. None for GPTQ: random token ids with a warning
            (only sensible for random-weight test models).
        symmetric: symmetric int4 codes in [-8, 7] (else asymmetric [0, 15] with mins).
        seed: seed of the randomized Hadamard signs and of random calibration tokens.
        progress: tqdm progress bar over layers (GPTQ).
        act_group_size: activation group size of the returned QuantConfig (0 = per token);
            default `DEFAULT_ACT_GROUP_SIZE` (32).
        act_clip_ratio: activation clip ratio of the returned QuantConfig; default
            `DEFAULT_ACT_CLIP_RATIO`.
        randomized_hadamard: QuaRot residual rotation diag(random signs) @ H instead of H.
        clip_search: per-group clip-ratio search minimising the weight reconstruction error
            (on by default: on SmolLM2 quarot-gptq g32 it raised W4A16-vs-fp top-1 agreement
            0.84 -> 0.86 and lowered the W4A4-vs-W4A16 KL 0.37 -> 0.36 / 0.16 -> 0.14).
        percdamp: GPTQ Hessian dampening.
        act_order: GPTQ act-order (with static groups, exact packed layout).
        calib_seq_len: window length when calibration text is tokenized or re-chunked.

    Returns:
        (params with QuantizedWeight linears, QuantConfig(method, group_size, symmetric,
        rotated=method.startswith("quarot"), act_group_size, act_clip_ratio)).

    Raises:
        ValueError: unknown method (the message lists the choices), or the parameters already
            hold int4 weights.
    """
    if method not in QUANT_METHODS:
        raise ValueError(
            f"unknown quantization method {method!r}; choose one of {', '.join(QUANT_METHODS)} "
            "('gguf' keeps a GGUF file's own codes: pass it to the loader instead)"
        )
    for name in LINEARS:
        if isinstance(getattr(params.layers, name), QuantizedWeight):
            raise ValueError(
                f"quantize_model needs float weights, but layers.{name} is already int4 "
                "(load the checkpoint with float weights)"
            )
    act_group_size = DEFAULT_ACT_GROUP_SIZE if act_group_size is None else act_group_size
    act_clip_ratio = DEFAULT_ACT_CLIP_RATIO if act_clip_ratio is None else act_clip_ratio
    _check_act_group(cfg, act_group_size)
    rotated = method.startswith("quarot")
    if rotated:
        from qspec_jax.quant.quarot import rotate_params  # noqa: PLC0415

        params = rotate_params(params, cfg, randomized=randomized_hadamard, seed=seed)

    if method.endswith("gptq"):
        from qspec_jax.quant.calibration import as_token_batch  # noqa: PLC0415
        from qspec_jax.quant.gptq import gptq_quantize_layers  # noqa: PLC0415

        if calib_tokens is None:
            warnings.warn(
                "GPTQ without calibration tokens: calibrating on random token ids; pass "
                "calib_tokens (a tokenizer or token ids) for a real model",
                stacklevel=2,
            )
            rng = np.random.default_rng(seed)
            calib_tokens = rng.integers(0, cfg.vocab_size, size=(4, min(calib_seq_len, 256)))
        tokens = as_token_batch(calib_tokens, calib_seq_len)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
            raise ValueError(
                f"calibration token ids must lie in [0, {cfg.vocab_size}), got "
                f"[{tokens.min()}, {tokens.max()}]"
            )
        layers = gptq_quantize_layers(
            params,
            cfg,
            tokens,
            group_size,
            symmetric,
            rotated=rotated,
            percdamp=percdamp,
            act_order=act_order,
            clip_search=clip_search,
            progress=progress,
        )
    else:
        from qspec_jax.quant.rtn import quantize_weight_rtn  # noqa: PLC0415

        layers = params.layers.replace(
            **{
                name: quantize_weight_rtn(
                    getattr(params.layers, name), group_size, symmetric, clip_search=clip_search
                )
                for name in LINEARS
            }
        )
    qcfg = quant_config(method, group_size, symmetric, act_group_size, act_clip_ratio)
    return params.replace(layers=layers), qcfg


def quant_config(
    method: str,
    group_size: int,
    symmetric: bool = True,
    act_group_size: int | None = None,
    act_clip_ratio: float | None = None,
) -> QuantConfig:
    """The QuantConfig `quantize_model` returns for these settings (defaults filled in)."""
    return QuantConfig(
        method=method,
        group_size=group_size,
        symmetric=symmetric,
        rotated=method.startswith("quarot"),
        act_group_size=DEFAULT_ACT_GROUP_SIZE if act_group_size is None else act_group_size,
        act_clip_ratio=DEFAULT_ACT_CLIP_RATIO if act_clip_ratio is None else act_clip_ratio,
    )


def _check_act_group(cfg: LlamaConfig, act_group_size: int) -> None:
    if act_group_size == 0:
        return
    dims = sorted({cfg.hidden_size, cfg.q_size, cfg.intermediate_size})
    if act_group_size < 0 or act_group_size % 32 or any(d % act_group_size for d in dims):
        raise ValueError(
            f"activation group size {act_group_size} must be 0 (per token) or a multiple of 32 "
            f"dividing every linear input dimension {dims}"
        )


def quantize_checkpoint(source, method: str, group_size: int = 128, **kw):
    """See `qspec_jax.quant.streaming.quantize_checkpoint` (imported lazily: import cycle)."""
    from qspec_jax.quant.streaming import quantize_checkpoint as _qc  # noqa: PLC0415

    return _qc(source, method, group_size, **kw)
