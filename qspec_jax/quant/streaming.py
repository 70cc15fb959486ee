"""Loading and quantizing a float checkpoint one decoder block at a time, in bounded memory.

`quantize_checkpoint` reads one block's float weights from a layer source (e.g.
`qspec_jax.loading.hf_loader.HFCheckpoint`, whose tensors are memory-mapped one at a time),
rotates it (QuaRot), quantizes it (RTN or GPTQ), puts its int4 arrays on the device and drops the
floats before reading the next block. Only the embedding, the LM head and the int4 blocks stay;
the float model is never whole, on the host or the device. GPTQ carries its calibration
activations [num_seqs, t, D] from block to block.

It computes what `qspec_jax.quant.quantize_model` computes on the whole model: the same
per-weight RTN and GPTQ calls, the same per-block QuaRot products (`rotate_layer`), the same
casts (tests/quant/test_streaming.py checks the codes are equal).
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from qspec_jax.config import LlamaConfig, QuantConfig
from qspec_jax.model.params import LayerParams, Params

LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")

__all__ = ["LayerSource", "quantize_checkpoint"]


class LayerSource(Protocol):
    """What `quantize_checkpoint` reads: a config and float arrays, one piece at a time."""

    config: LlamaConfig

    def layer(self, i: int, dtype=np.float32) -> LayerParams: ...

    def embed(self, dtype=np.float32) -> np.ndarray: ...

    def final_norm(self, dtype=np.float32) -> np.ndarray: ...

    def lm_head(self, dtype=np.float32) -> np.ndarray | None: ...


def quantize_checkpoint(
    source: LayerSource,
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
    stack: bool | None = None,
) -> tuple[LlamaConfig, Params, QuantConfig]:
    """Reads, rotates and quantizes a checkpoint block by block.

    Args:
        source: the float checkpoint (`LayerSource`); its ``config.dtype`` is the dtype of the
            float arrays kept (embedding, head, norms, biases) and of the weights quantized.
        method: "rtn", "gptq", "quarot-rtn" or "quarot-gptq".
        group_size ... calib_seq_len: as `qspec_jax.quant.quantize_model`.
        stack: stack the blocks on a layer axis (the `Params` layout); default: only off the CPU
            backend, where `Engine` would unstack them again (`unstack_layers`), so on CPU the
            blocks stay a tuple and are never copied.

    Returns:
        (cfg, params with QuantizedWeight linears, QuantConfig) as `quantize_model` returns them.

    Raises:
        ValueError: unknown method, bad activation group size or calibration ids.
    """
    from qspec_jax.quant import QUANT_METHODS, _check_act_group, quant_config  # noqa: PLC0415

    if method not in QUANT_METHODS:
        raise ValueError(
            f"unknown quantization method {method!r}; choose one of {', '.join(QUANT_METHODS)}"
        )
    cfg = source.config
    qcfg = quant_config(method, group_size, symmetric, act_group_size, act_clip_ratio)
    _check_act_group(cfg, qcfg.act_group_size)
    dt = np.dtype(cfg.jnp_dtype)
    rotated = qcfg.rotated
    if stack is None:
        stack = jax.default_backend() != "cpu"

    final_norm = source.final_norm(dt)
    if rotated:
        from pallas_kernels.hadamard import hadamard_matrix  # noqa: PLC0415
        from qspec_jax.quant.quarot import (  # noqa: PLC0415
            residual_rotation,
            rotate_embed_head,
            rotate_layer,
        )

        q = residual_rotation(cfg.hidden_size, randomized_hadamard, seed)  # [D, D]
        h_q = hadamard_matrix(cfg.q_size)  # [q, q]
        h_f = hadamard_matrix(cfg.intermediate_size)  # [F, F]
        embed, head = rotate_embed_head(source.embed(dt), source.lm_head(dt), final_norm, q, dt)
        final_norm = np.ones_like(final_norm)
    else:
        embed, head = source.embed(dt), source.lm_head(dt)
    embed = jnp.asarray(embed, dt)  # [V, D]
    head = None if head is None else jnp.asarray(head, dt)  # [D, V]

    gptq = method.endswith("gptq")
    if gptq:
        from qspec_jax.quant.calibration import as_token_batch  # noqa: PLC0415
        from qspec_jax.quant.gptq import _layer_fns, gptq_quantize_block  # noqa: PLC0415

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
        fns = _layer_fns(cfg, rotated)
        x = embed[jnp.asarray(tokens, jnp.int32)].astype(cfg.jnp_dtype)  # [b, t, D]
        gptq_kw = dict(percdamp=percdamp, act_order=act_order, clip_search=clip_search)
    else:
        from qspec_jax.quant.rtn import quantize_weight_rtn  # noqa: PLC0415

    layers = range(cfg.num_layers)
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        layers = tqdm(layers, desc=f"load+{method}", unit="layer")
    out: list[LayerParams] = []
    for i in layers:
        lp = source.layer(i, dt)  # float numpy, one block
        if rotated:
            rot = rotate_layer(lp, q, h_q, h_f)
            lp = lp.replace(
                attn_norm=np.ones_like(lp.attn_norm),
                mlp_norm=np.ones_like(lp.mlp_norm),
                # rounded once to the parameter dtype, as rotate_params does
                **{k: np.asarray(jnp.asarray(v, dt)) for k, v in rot.items()},
            )
            del rot
        small = dict(
            attn_norm=jnp.asarray(lp.attn_norm, dt),
            mlp_norm=jnp.asarray(lp.mlp_norm, dt),
            bqkv=None if lp.bqkv is None else jnp.asarray(lp.bqkv, dt),
        )
        if gptq:
            dev = lp.replace(**small, **{k: jnp.asarray(getattr(lp, k), dt) for k in LINEARS})
            del lp
            qws, x = gptq_quantize_block(fns, x, dev, cfg, group_size, symmetric, **gptq_kw)
            del dev
        else:
            qws = {
                k: quantize_weight_rtn(
                    getattr(lp, k), group_size, symmetric, clip_search=clip_search
                )
                for k in LINEARS
            }
            del lp
        out.append(LayerParams(**small, **qws))
    params = Params(
        embed=embed,
        layers=jax.tree_util.tree_map(lambda *a: jnp.stack(a), *out) if stack else tuple(out),
        final_norm=jnp.asarray(final_norm, dt),
        lm_head=head,
    )
    return cfg, params, qcfg
