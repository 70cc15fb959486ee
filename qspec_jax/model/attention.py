"""Dense causal grouped-query attention over a float KV buffer (the float cache's `attend`).

Kept in its own module, importing nothing from `qspec_jax.cache`, so that every cache format can
use it without an import cycle through `qspec_jax.model.llama`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    q_positions: jnp.ndarray,
    mask=None,
    impl: str | None = None,
) -> jnp.ndarray:
    """Causal grouped-query attention of new queries over the cache of one layer.

    Without a tree mask this goes through `pallas_kernels.dispatch.attention`, which on CPU runs
    decode-time calls on the CPU kernel (live keys only, every query row by the same operation
    sequence whatever the number of rows: what keeps verification equal to autoregressive
    decoding bit for bit) and everything else on `dense_attention`.

    Args:
        q: [batch, t, heads, head_dim] queries of the new tokens.
        k, v: [batch, capacity, kv_heads, head_dim] the layer's cache (new K/V already written).
        q_positions: int32 [batch, t], the position of each query; key j is visible iff j <= pos.
        mask: optional bool [batch, t, capacity] replacing that causal rule (tree attention).

    Returns:
        [batch, t, heads * head_dim].
    """
    if mask is not None:
        return dense_attention(q, k, v, q_positions, mask)
    from pallas_kernels import dispatch  # noqa: PLC0415 (kernels import lazily)

    return dispatch.attention(q, k, v, q_positions, dense_attention, impl=impl)


def dense_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, q_positions: jnp.ndarray, mask=None
) -> jnp.ndarray:
    """XLA's dense attention over the whole cache capacity (arguments as in `attention`)."""
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
