"""QuaRot (Ashkboos et al., 2024) on float parameters: fold RMSNorm scales, rotate with Hadamards.

After `rotate_params` the float model computes the same function as before when run with
``QuantConfig(rotated=True)`` (which applies the online Hadamard x -> x @ H_n to the inputs of
wo and w_down), but its weights and activations have far fewer outliers, so int4 quantization of
both loses much less. The steps, for the residual rotation Q (orthogonal [D, D]):

1. Fold each RMSNorm's scale g into the rows of the linears it feeds and set it to ones
   (``rms_norm(x, g) @ W == rms_norm(x, 1) @ (diag(g) W)``): attn_norm -> wqkv,
   mlp_norm -> w_gate_up, final_norm -> lm_head. A tied LM head becomes an explicit
   ``lm_head = diag(final_norm) @ embed.T`` [D, V] first (the model uses `params.lm_head`
   whenever it is not None, so the LlamaConfig does not change).
2. Rotate the residual stream x -> x Q: ``embed <- embed Q``, ``wqkv <- Q^T wqkv``,
   ``w_gate_up <- Q^T w_gate_up``, ``wo <- wo Q``, ``w_down <- w_down Q``, ``lm_head <- Q^T lm_head``.
   RMSNorm with unit scale commutes with Q because ||x Q|| = ||x||.
3. Absorb the online Hadamards: the model feeds ``x H_n`` to wo (n = q_size) and w_down
   (n = F), so ``wo <- H_q^T wo`` and ``w_down <- H_F^T w_down`` (``x H H^T W = x W``).

Q is ``hadamard_matrix(D)`` or, with ``randomized=True``, ``diag(s) @ hadamard_matrix(D)`` for
random signs s (a randomized Hadamard, still orthogonal). The online Hadamards are the fixed
``hadamard_matrix(n)`` that `pallas_kernels` applies. All products are computed in float64 and
rounded once to the parameter dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np

from pallas_kernels.hadamard import hadamard_matrix
from qspec_jax.config import LlamaConfig
from qspec_jax.quant.format import QuantizedWeight

if TYPE_CHECKING:  # qspec_jax.model.params imports this package: no runtime import (cycle)
    from qspec_jax.model.params import LayerParams, Params


def residual_rotation(d: int, randomized: bool = False, seed: int = 0) -> np.ndarray:
    """The orthogonal residual rotation Q [d, d] (float64)."""
    q = hadamard_matrix(d)
    if randomized:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=d)
        q = signs[:, None] * q
    return q


def rotate_params(
    params: Params,
    cfg: LlamaConfig,
    *,
    randomized: bool = False,
    seed: int = 0,
    rotation: np.ndarray | None = None,
    down_scales: np.ndarray | None = None,
) -> Params:
    """QuaRot-rotates float parameters (see the module docstring).

    Run the result with ``QuantConfig(rotated=True)`` (any precision, "fp" included); `cfg` is
    unchanged (a tied LM head becomes the explicit `lm_head` of the returned params).

    Args:
        params: float parameters (not already rotated: rotating twice is not the identity).
        cfg: the model config (shapes).
        randomized: multiply the residual Hadamard by a random +-1 diagonal.
        seed: seed of the random signs.
        rotation: an explicit orthogonal residual rotation Q [D, D] (overrides `randomized`).
        down_scales: optional positive [L, F] smoothing of the w_down inputs: the up columns of
            w_gate_up are multiplied by it and the w_down rows divided by it before the online
            Hadamard is absorbed (silu(gate) * (up * s) @ (W_down / s) is unchanged), so
            channels with huge activations can be shrunk before the Hadamard spreads them.

    Returns:
        Params with norms all ones, an explicit lm_head [D, V], and rotated weights.

    Raises:
        ValueError: the parameters hold quantized (int4) weights.
    """
    lp = params.layers
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        if isinstance(getattr(lp, name), QuantizedWeight):
            raise ValueError(
                f"rotate_params needs float weights, but layers.{name} is already int4; rotate "
                "before quantizing (load the checkpoint without keep_int4)"
            )
    dt = params.embed.dtype
    f64 = lambda a: np.asarray(a, np.float64)
    if rotation is None:
        q = residual_rotation(cfg.hidden_size, randomized, seed)  # [D, D]
    else:
        q = np.asarray(rotation, np.float64)
        if q.shape != (cfg.hidden_size,) * 2:
            raise ValueError(f"rotation shape {q.shape} != (D, D) with D = {cfg.hidden_size}")
    h_q = hadamard_matrix(cfg.q_size)  # [q, q]
    h_f = hadamard_matrix(cfg.intermediate_size)  # [F, F]

    attn_norm = f64(lp.attn_norm)  # [L, D]
    mlp_norm = f64(lp.mlp_norm)  # [L, D]
    # Batched matmuls (a multi-operand np.einsum without optimize= is a naive O(n^4) loop).
    wqkv = q.T @ (attn_norm[:, :, None] * f64(lp.wqkv))  # [L, D, q+2kv]
    w_gate_up = q.T @ (mlp_norm[:, :, None] * f64(lp.w_gate_up))  # [L, D, 2F]
    wo = h_q.T @ f64(lp.wo) @ q  # [L, q, D]
    w_down = f64(lp.w_down)  # [L, F, D]
    if down_scales is not None:
        sc = f64(down_scales)  # [L, F]
        f = cfg.intermediate_size
        if sc.shape != (cfg.num_layers, f) or not np.all(sc > 0):
            raise ValueError(f"down_scales must be positive [L, F] = {(cfg.num_layers, f)}")
        w_gate_up[:, :, f:] *= sc[:, None, :]
        w_down = w_down / sc[:, :, None]
    w_down = h_f.T @ w_down @ q  # [L, F, D]

    embed = f64(params.embed)  # [V, D]
    head = f64(params.lm_head) if params.lm_head is not None else embed.T  # [D, V]
    head = q.T @ (f64(params.final_norm)[:, None] * head)  # [D, V]
    embed = embed @ q

    cast = lambda a: jnp.asarray(np.asarray(a, np.float64), dt)
    layers = lp.replace(
        attn_norm=jnp.ones_like(lp.attn_norm),
        wqkv=cast(wqkv),
        wo=cast(wo),
        mlp_norm=jnp.ones_like(lp.mlp_norm),
        w_gate_up=cast(w_gate_up),
        w_down=cast(w_down),
    )
    return params.replace(
        embed=cast(embed),
        layers=layers,
        final_norm=jnp.ones_like(params.final_norm),
        lm_head=cast(head),
        head_q8=None,  # the rotated head is no longer on the Q8_0 grid
    )


def rotate_layer(
    layer: LayerParams,
    q: np.ndarray,
    h_q: np.ndarray,
    h_f: np.ndarray,
    down_scale: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The QuaRot-rotated float64 linears of one decoder block (no layer axis).

    The same products as `rotate_params` for one layer, so a loader can rotate block by block.

    Args:
        layer: float weights of one block (attn_norm [D], wqkv [D, q+2kv], wo [q, D],
            mlp_norm [D], w_gate_up [D, 2F], w_down [F, D]).
        q: the residual rotation [D, D] (`residual_rotation`).
        h_q: ``hadamard_matrix(q_size)``; h_f: ``hadamard_matrix(F)``.
        down_scale: optional positive [F] smoothing of the w_down inputs.

    Returns:
        {"wqkv", "wo", "w_gate_up", "w_down"} -> float64 arrays (norms become ones).
    """
    f64 = lambda a: np.asarray(a, np.float64)
    wqkv = q.T @ (f64(layer.attn_norm)[:, None] * f64(layer.wqkv))  # [D, q+2kv]
    w_gate_up = q.T @ (f64(layer.mlp_norm)[:, None] * f64(layer.w_gate_up))  # [D, 2F]
    wo = h_q.T @ f64(layer.wo) @ q  # [q, D]
    w_down = f64(layer.w_down)  # [F, D]
    if down_scale is not None:
        sc = f64(down_scale)  # [F]
        f = w_down.shape[0]
        w_gate_up[:, f:] *= sc[None, :]
        w_down = w_down / sc[:, None]
    w_down = h_f.T @ w_down @ q  # [F, D]
    return dict(wqkv=wqkv, wo=wo, w_gate_up=w_gate_up, w_down=w_down)


def rotate_embed_head(
    embed: np.ndarray,
    head: np.ndarray | None,
    final_norm: np.ndarray,
    q: np.ndarray,
    dtype,
    chunk: int = 8192,
) -> tuple[np.ndarray, np.ndarray]:
    """QuaRot's rotated embedding ``embed Q`` [V, D] and head ``Q^T diag(g) head`` [D, V].

    Computed in float64 over `chunk` vocabulary rows at a time and rounded once to `dtype`, so
    the float64 temporaries stay small whatever the vocabulary. `head` [D, V] is None when tied
    (the unrotated embedding's transpose is used).
    """
    v, d = embed.shape
    g = np.asarray(final_norm, np.float64)[:, None]  # [D, 1]
    out_embed = np.empty((v, d), dtype)
    out_head = np.empty((d, v), dtype)
    for s in range(0, v, chunk):
        e = np.asarray(embed[s : s + chunk], np.float64)  # [c, D]
        h = e.T if head is None else np.asarray(head[:, s : s + chunk], np.float64)  # [D, c]
        out_head[:, s : s + chunk] = _cast(q.T @ (g * h), dtype)
        out_embed[s : s + chunk] = _cast(e @ q, dtype)
    return out_embed, out_head


def _cast(a: np.ndarray, dtype) -> np.ndarray:
    """float64 -> `dtype` rounded as `rotate_params` rounds (through jnp)."""
    return np.asarray(jnp.asarray(a, dtype))
