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

from qspec_jax.cache.kv_cache import KVCache
from qspec_jax.config import LlamaConfig, QuantConfig
from qspec_jax.model.attention import attention  # noqa: F401  (re-exported)
from qspec_jax.model.linear import linear, online_hadamard
from qspec_jax.model.params import LayerParams, Params, TwoWeights, WithDraftModel, float_head


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


def _block(
    x: jnp.ndarray,
    lp: LayerParams,
    layer: jnp.ndarray,
    cache,
    positions: jnp.ndarray,
    inv_freq: jnp.ndarray,
    cfg: LlamaConfig,
    qcfg: QuantConfig,
    precision: str,
    impl: str | None,
    kv_view: str = "target",
    rope_pos: jnp.ndarray | None = None,
    mask: jnp.ndarray | None = None,
    tp_axis: str | None = None,
):
    """One decoder block; returns (x, cache).

    `cache` is any cache format (`qspec_jax.cache.protocol.CacheFormat`): the block writes its new
    K/V with `cache.write_layer` and attends with `cache.attend(..., kv_view)`. RoPE uses
    `rope_pos` when given (tree nodes), and `mask` when given replaces causal visibility.
    Under tensor parallelism (`tp_axis`, inside `shard_map`) `cfg` is the device's local config
    and the row-parallel wo / w_down partial products are summed over `tp_axis`.
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
        cache = cache.write_layer(layer, positions, k, v)
        attn = cache.attend(layer, q, positions, kv_view, mask)  # [batch, t, q]
        attn = online_hadamard(attn, qcfg, impl)
        x = x + _row_sum(linear(attn, lp.wo, precision, qcfg, impl), tp_axis)
    with jax.named_scope("mlp"):
        h = rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
        gate, up = jnp.split(linear(h, lp.w_gate_up, precision, qcfg, impl), 2, axis=-1)
        act = jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype) * up  # [batch, t, F]
        act = online_hadamard(act, qcfg, impl)
        x = x + _row_sum(linear(act, lp.w_down, precision, qcfg, impl), tp_axis)
    return x, cache


def _row_sum(y: jnp.ndarray, tp_axis: str | None) -> jnp.ndarray:
    """The full output of a row-parallel linear: the sum of every device's partial product."""
    return y if tp_axis is None else jax.lax.psum(y, tp_axis)


def lm_head(params: Params, x: jnp.ndarray, impl: str | None = None) -> jnp.ndarray:
    """Logits [..., V] in float32 from final hidden states [..., D].

    The weights are the float head's in every mode. When `params.head_q8` holds them as int8
    codes (the GGUF's Q8_0 head, exactly the same values) and the kernel registry picks the CPU
    kernel (`pallas_kernels.dispatch.lm_head`), it reads those 28 MB instead of the 113 MB float
    copy; elsewhere XLA's float dot runs.
    """
    from pallas_kernels import dispatch  # noqa: PLC0415 (kernels import lazily, as in linear)

    def float_logits(x):
        w = float_head(params)  # [D, V]
        # The registry's "float_matmul": a row-independent CPU kernel on CPU, else XLA's dot.
        return dispatch.float_matmul(x, w.astype(x.dtype), impl=impl)  # [..., V] float32

    q8 = params.head_q8
    codes, scales = (None, None) if q8 is None else (q8.codes, q8.scales)
    # The registry's "lm_head" op chooses (pallas_kernels.registry): the Q8_0 kernel where the
    # CPU kernels are this backend's choice (or impl "cpu") and the codes exist, else float.
    return dispatch.lm_head(x, codes, scales, float_logits, impl=impl)  # [..., V] float32


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
    kv_view: str = "target",
    rope_positions: jnp.ndarray | None = None,
    attn_mask: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, KVCache]:
    """Runs t new tokens per sequence through the model, writing their K/V into the cache.

    The new tokens of sequence b sit at positions cache.lengths[b] + 0..t-1. Their K/V are
    written there (overwriting whatever was there: this is how verification replaces draft K/V);
    `cache.lengths` is NOT changed, the caller commits the valid length with
    `qspec_jax.cache.advance` / `rollback` / `set_lengths`.

    Args:
        params: model weights (a `TwoWeights` picks its set from `precision`; a
            `WithDraftModel` runs its target).
        tokens: int32 [batch, t].
        cache: the shared KV cache (any format of `qspec_jax.cache.protocol`).
        cfg, qcfg: static model and quantization configs.
        precision: static "fp" | "w4a16" | "w4a4" | "w4a8".
        logits_index: optional int32 [batch]; if given only the logits of token
            `logits_index[b]` of each row are computed (returns [batch, V]), which avoids a
            [batch, t, V] tensor in prefill.
        impl: kernel implementation override (see `pallas_kernels.dispatch`).
        kv_view: static "target" (every cache format's most exact view) or "draft" (the
            hierarchical cache's upper int4 halves; the float cache has one view).
        rope_positions: optional int32 [batch, t] RoPE positions of the new tokens (default:
            their slots); a draft tree uses base + depth (`qspec_jax.decoding.tree`).
        attn_mask: optional bool [batch, t, capacity], which cache slots each new token sees
            (default: causal, slot <= own slot); a draft tree sees the committed cache and its
            ancestors.

    Returns:
        (logits float32 [batch, t, V] or [batch, V], cache with the new K/V written).
    """
    if isinstance(params, (TwoWeights, WithDraftModel)):  # a target beside draft weights
        params = params.for_precision(precision)
    kw = dict(
        logits_index=logits_index,
        impl=impl,
        kv_view=kv_view,
        rope_positions=rope_positions,
        attn_mask=attn_mask,
    )
    if params.mesh is not None:  # tensor / data parallel: each device runs its shard
        return _forward_sharded(params, tokens, cache, cfg, qcfg, precision, **kw)
    return _forward_local(params, tokens, cache, cfg, qcfg, precision, **kw)


def _forward_sharded(params, tokens, cache, cfg, qcfg, precision, **kw):
    """`forward` under `jax.shard_map` over `params.mesh` (see `qspec_jax.sharding`).

    Batch-indexed inputs and outputs are split over "data"; the weights and the cache's KV heads
    over "model". Each device runs `_forward_local` with its local config on its shards.
    """
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    from qspec_jax.sharding import cache_specs, local_config, param_specs  # noqa: PLC0415

    mesh = params.mesh
    m = mesh.shape["model"]
    if m > 1 and qcfg.rotated:
        raise NotImplementedError(
            "tensor parallelism (model_parallel > 1) of a QuaRot-rotated model is not built: its "
            "online Hadamard spans the whole attention / MLP width; use model_parallel=1"
        )
    tp_axis = "model" if m > 1 else None
    local_cfg = local_config(cfg, m)
    per_row = ("logits_index", "rope_positions", "attn_mask")  # optional arrays, batch first
    arrays = {k: kw.pop(k) for k in per_row if kw[k] is not None}
    for k in per_row:
        kw.pop(k, None)

    def local(params, tokens, cache, arrays):
        return _forward_local(
            params, tokens, cache, local_cfg, qcfg, precision, tp_axis=tp_axis, **arrays, **kw
        )

    row = P("data")
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(param_specs(params, mesh), row, cache_specs(cache), {k: row for k in arrays}),
        out_specs=(row, cache_specs(cache)),
        check_vma=False,  # the kernels are custom calls; every collective here is explicit
    )
    return fn(params, tokens, cache, arrays)


def _embed(params: Params, tokens: jnp.ndarray, tp_axis: str | None) -> jnp.ndarray:
    """Token embeddings [batch, t, D]; vocabulary-parallel under `tp_axis` (each device holds
    rows [i * V / m, (i + 1) * V / m) of the table, looks up the ids in its range, and one psum
    adds the single non-zero contribution, exactly)."""
    if tp_axis is None:
        return params.embed[tokens]
    rows = params.embed.shape[0]  # V / m
    ids = tokens - jax.lax.axis_index(tp_axis) * rows
    mine = (ids >= 0) & (ids < rows)
    x = jnp.where(mine[..., None], params.embed[jnp.clip(ids, 0, rows - 1)], 0)  # [batch, t, D]
    return jax.lax.psum(x, tp_axis)


def _forward_local(
    params: Params,
    tokens: jnp.ndarray,
    cache: KVCache,
    cfg: LlamaConfig,
    qcfg: QuantConfig,
    precision: str,
    *,
    logits_index: jnp.ndarray | None = None,
    impl: str | None = None,
    kv_view: str = "target",
    rope_positions: jnp.ndarray | None = None,
    attn_mask: jnp.ndarray | None = None,
    tp_axis: str | None = None,
) -> tuple[jnp.ndarray, KVCache]:
    """`forward` on one device (arguments as there); under `shard_map` (`tp_axis` set) `cfg` is
    the local config, the arrays are this device's shards, and the logits are all-gathered."""
    b, t = tokens.shape
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [batch, t]
    inv_freq = rope_inv_freq(cfg)
    with jax.named_scope("embed"):
        x = _embed(params, tokens, tp_axis).astype(cfg.jnp_dtype)  # [batch, t, D]

    def body(carry, xs):
        x, c = carry
        lp, layer = xs
        with jax.named_scope("block"):
            x, c = _block(
                x,
                lp,
                layer,
                c,
                positions,
                inv_freq,
                cfg,
                qcfg,
                precision,
                impl,
                kv_view,
                rope_positions,
                attn_mask,
                tp_axis,
            )
        return (x, c), None

    if isinstance(params.layers, tuple):  # per-layer arrays: unrolled (fastest on CPU)
        carry = (x, cache)
        for i, lp in enumerate(params.layers):
            carry, _ = body(carry, (lp, jnp.int32(i)))
        x, cache = carry
    else:  # stacked arrays: one compiled layer body
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, cache), _ = jax.lax.scan(body, (x, cache), (params.layers, layer_ids))
    with jax.named_scope("head"):
        if logits_index is not None:
            x = jnp.take_along_axis(x, logits_index[:, None, None], axis=1)[:, 0]  # [batch, D]
        x = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
        logits = lm_head(params, x, impl)  # [..., V / m] under tensor parallelism
        if tp_axis is not None:  # vocabulary-parallel head: gather the activation-sized logits
            logits = jax.lax.all_gather(logits, tp_axis, axis=logits.ndim - 1, tiled=True)
    return logits, cache
