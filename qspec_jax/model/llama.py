"""A Llama-family decoder as pure functions of (params, tokens, cache).

Every forward takes a static `precision` ("fp", "w4a16", "w4a4", "w4a8"); only the linears look
at it (through `qspec_jax.model.linear.linear`), so switching precision retraces nothing else.
The decoder blocks run as one `lax.scan` over stacked layer weights (one compiled body), or
unrolled over a tuple of per-layer weights (faster on CPU, see `params.unstack_layers`), with the
KV cache in the carry so each layer's new K/V are written in place.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qspec_jax.cache.kv_cache import KVCache, write_layer
from qspec_jax.config import LlamaConfig, QuantConfig
from qspec_jax.model.linear import linear, online_hadamard
from qspec_jax.model.params import LayerParams, Params


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """RMSNorm in float32: x / sqrt(mean(x^2) + eps) * weight."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> jnp.ndarray:
    """Inverse RoPE frequencies [head_dim // 2], with Llama-3 scaling when configured."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: jnp.ndarray) -> jnp.ndarray:
    """Rotate-half RoPE (Hugging Face convention).

    Args:
        x: [batch, t, heads, head_dim].
        positions: int32 [batch, t].
        inv_freq: [head_dim // 2].
    """
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, t, hd/2]
    cos = jnp.cos(freqs)[:, :, None, :]  # [batch, t, 1, hd/2]
    sin = jnp.sin(freqs)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)  # [batch, t, heads, hd/2] each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, q_positions: jnp.ndarray, mask=None
) -> jnp.ndarray:
    """Causal grouped-query attention of new queries over the whole cache of one layer.

    Args:
        q: [batch, t, heads, head_dim] queries of the new tokens.
        k, v: [batch, capacity, kv_heads, head_dim] the layer's cache (new K/V already written).
        q_positions: int32 [batch, t], the position of each query; key j is visible iff j <= pos.
        mask: optional bool [batch, t, capacity] replacing that causal rule (tree attention).

    Returns:
        [batch, t, heads * head_dim].
    """
    b, t, h, hd = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, hd)  # [batch, t, kv_heads, group, hd]
    scores = jnp.einsum(
        "btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32
    )  # [batch, kv_heads, group, t, capacity]
    scores = scores / math.sqrt(hd)
    key_pos = jnp.arange(k.shape[1], dtype=jnp.int32)  # [capacity]
    visible = key_pos[None, None, :] <= q_positions[:, :, None]  # [batch, t, capacity]
    if mask is not None:
        visible = mask
    scores = jnp.where(visible[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [batch, kv_heads, group, t, capacity]
    out = jnp.einsum(
        "bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )  # [batch, t, kv_heads, group, hd]
    return out.reshape(b, t, h * hd).astype(q.dtype)


def _block(
    x: jnp.ndarray,
    lp: LayerParams,
    layer: jnp.ndarray,
    cache_k: jnp.ndarray,
    cache_v: jnp.ndarray,
    positions: jnp.ndarray,
    inv_freq: jnp.ndarray,
    cfg: LlamaConfig,
    qcfg: QuantConfig,
    precision: str,
    impl: str | None,
    rope_pos: jnp.ndarray | None = None,
    mask: jnp.ndarray | None = None,
):
    """One decoder block; returns (x, cache_k, cache_v).

    K/V are written at slots `positions`; RoPE uses `rope_pos` when given (tree nodes), and
    `mask` when given replaces causal visibility (see `attention`).
    """
    rope_pos = positions if rope_pos is None else rope_pos
    b, t, _ = x.shape
    with jax.named_scope("attention"):
        h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)  # [batch, t, D]
        qkv = linear(h, lp.wqkv, precision, qcfg, impl)  # [batch, t, q + 2 kv]
        if lp.bqkv is not None:
            qkv = qkv + lp.bqkv.astype(qkv.dtype)
        q, k, v = jnp.split(qkv, [cfg.q_size, cfg.q_size + cfg.kv_size], axis=-1)
        q = apply_rope(q.reshape(b, t, cfg.num_heads, cfg.head_dim), rope_pos, inv_freq)
        k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim), rope_pos, inv_freq)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)  # [batch, t, kv_heads, hd]
        cache_k, cache_v = write_layer(cache_k, cache_v, layer, positions, k, v)
        attn = attention(q, cache_k[layer], cache_v[layer], positions, mask)  # [batch, t, q]
        attn = online_hadamard(attn, qcfg, impl)
        x = x + linear(attn, lp.wo, precision, qcfg, impl)
    with jax.named_scope("mlp"):
        h = rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
        gate, up = jnp.split(linear(h, lp.w_gate_up, precision, qcfg, impl), 2, axis=-1)
        act = jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype) * up  # [batch, t, F]
        act = online_hadamard(act, qcfg, impl)
        x = x + linear(act, lp.w_down, precision, qcfg, impl)
    return x, cache_k, cache_v


def lm_head(params: Params, x: jnp.ndarray) -> jnp.ndarray:
    """Logits [..., V] in float32 from final hidden states [..., D] (always float weights)."""
    w = params.lm_head if params.lm_head is not None else params.embed.T  # [D, V]
    return jnp.einsum("...d,dv->...v", x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def forward(
    params: Params,
    tokens: jnp.ndarray,
    cache: KVCache,
    cfg: LlamaConfig,
    qcfg: QuantConfig,
    precision: str,
    *,
    logits_index: jnp.ndarray | None = None,
    impl: str | None = None,
    rope_positions: jnp.ndarray | None = None,
    attn_mask: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, KVCache]:
    """Runs t new tokens per sequence through the model, writing their K/V into the cache.

    The new tokens of sequence b sit at positions cache.lengths[b] + 0..t-1. Their K/V are
    written there (overwriting whatever was there: this is how verification replaces draft K/V);
    `cache.lengths` is NOT changed, the caller commits the valid length with
    `qspec_jax.cache.advance` / `rollback` / `set_lengths`.

    Args:
        params: model weights.
        tokens: int32 [batch, t].
        cache: the shared KV cache.
        cfg, qcfg: static model and quantization configs.
        precision: static "fp" | "w4a16" | "w4a4" | "w4a8".
        logits_index: optional int32 [batch]; if given only the logits of token
            `logits_index[b]` of each row are computed (returns [batch, V]), which avoids a
            [batch, t, V] tensor in prefill.
        impl: kernel implementation override (see `pallas_kernels.dispatch`).
        rope_positions: optional int32 [batch, t] RoPE positions of the new tokens (default:
            their slots); a draft tree uses base + depth (`qspec_jax.decoding.tree`).
        attn_mask: optional bool [batch, t, capacity], which cache slots each new token sees
            (default: causal, slot <= own slot); a draft tree sees the committed cache and its
            ancestors.

    Returns:
        (logits float32 [batch, t, V] or [batch, V], cache with the new K/V written).
    """
    b, t = tokens.shape
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [batch, t]
    inv_freq = rope_inv_freq(cfg)
    with jax.named_scope("embed"):
        x = params.embed[tokens].astype(cfg.jnp_dtype)  # [batch, t, D]

    def body(carry, xs):
        x, ck, cv = carry
        lp, layer = xs
        with jax.named_scope("block"):
            x, ck, cv = _block(
                x,
                lp,
                layer,
                ck,
                cv,
                positions,
                inv_freq,
                cfg,
                qcfg,
                precision,
                impl,
                rope_positions,
                attn_mask,
            )
        return (x, ck, cv), None

    if isinstance(params.layers, tuple):  # per-layer arrays: unrolled (fastest on CPU)
        carry = (x, cache.k, cache.v)
        for i, lp in enumerate(params.layers):
            carry, _ = body(carry, (lp, jnp.int32(i)))
        x, ck, cv = carry
    else:  # stacked arrays: one compiled layer body
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, ck, cv), _ = jax.lax.scan(body, (x, cache.k, cache.v), (params.layers, layer_ids))
    with jax.named_scope("head"):
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]  # [batch, D]
        x = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
        logits = lm_head(params, x)
    return logits, cache.replace(k=ck, v=cv)
