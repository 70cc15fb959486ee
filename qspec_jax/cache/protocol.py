"""The small protocol every KV cache format implements, and the factory the engine uses.

The model and the decoding loop never look inside a cache; they call these methods (all pure,
each returning a new cache):

* ``write_layer(layer, positions, k, v)``: store a layer's new K/V [batch, t, kv_heads, hd] at
  positions [batch, t] (drafts and the verifier's overwrite both go through here);
* ``attend(layer, q, q_positions, view)``: causal attention of the new queries over the layer,
  in the "target" view (most exact) or the "draft" view (the hierarchical cache's int4 halves);
* ``prefill_cache(prompt_len)`` / ``finish_prefill(scratch, lengths)``: the cache the padded
  prompt runs on, and the cache holding the prompt afterwards;
* ``commit(lengths, flush=True)``: set the verified lengths after a step (a hierarchical cache
  quantizes and flushes completed chunks here, or with ``flush=False`` at the next ``flush()``;
  either way only verified tokens are ever flushed);
* ``flush()``: quantize what the last ``commit(lengths, flush=False)`` completed (the decoding
  loop calls it at the start of every step, before any forward reads the cache; a float cache
  returns itself);
* ``lengths`` (a field; moving it back is rollback), ``capacity``, ``replace(...)``;
* ``kv_bytes(lengths)`` / ``kv_bytes_per_token()``: memory accounting for stats.

Every array of a cache is either per layer, [layers, batch, ...], or per sequence, [batch]
(static layout is not an array). `take_row` / `put_row` rely on that to move one sequence in or
out of a batch, whatever the format (continuous batching writes a new prompt into a free row).

Formats: ``"float"`` (`KVCache`, one dense buffer) and ``"hier"`` (`HierKVCache`, QuantSpec's
int4/int8 hierarchical cache with a float buffer).
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from qspec_jax.cache.hierarchical import HierKVCache
from qspec_jax.cache.kv_cache import KVCache
from qspec_jax.config import LlamaConfig

KV_FORMATS = ("float", "hier")


class CacheFormat(Protocol):
    """What `qspec_jax.model.llama.forward` and `qspec_jax.decoding.loop` need from a cache."""

    lengths: jnp.ndarray

    @property
    def capacity(self) -> int: ...

    def write_layer(self, layer, positions, k, v) -> CacheFormat: ...

    def attend(self, layer, q, q_positions, view: str = "target", mask=None) -> jnp.ndarray: ...

    def prefill_cache(self, prompt_len: int) -> KVCache: ...

    def finish_prefill(self, scratch: KVCache, lengths: jnp.ndarray) -> CacheFormat: ...

    def commit(self, lengths: jnp.ndarray, flush: bool = True) -> CacheFormat: ...

    def flush(self) -> CacheFormat: ...

    def kv_bytes(self, lengths) -> int: ...

    def kv_bytes_per_token(self) -> float: ...


def make_cache(
    kind: str,
    cfg: LlamaConfig,
    batch: int,
    capacity: int,
    *,
    residual: int = 128,
    key_group: int | None = None,
    step_tokens: int = 1,
    attention_impl: str | None = None,
) -> KVCache | HierKVCache:
    """An empty cache of format `kind` ("float" | "hier"); ValueError (one sentence) otherwise.

    `residual`, `key_group` and `step_tokens` (the most positions one decoding step writes)
    shape the hierarchical layout, and `attention_impl` picks its attention (None: the CPU
    kernel where available, else XLA; see `HierLayout`); all are ignored for "float".
    """
    if kind == "float":
        return KVCache.init(cfg, batch, capacity)
    if kind == "hier":
        return HierKVCache.init(
            cfg, batch, capacity, residual=residual, key_group=key_group,
            step_tokens=step_tokens, attention_impl=attention_impl,
        )  # fmt: skip
    raise ValueError(f"unknown kv_cache {kind!r}: choose one of {', '.join(KV_FORMATS)}")


def _batch_axis(leaf: jnp.ndarray) -> int:
    """The batch axis of a cache array: 0 for per-sequence [batch], 1 for [layers, batch, ...]."""
    return 0 if leaf.ndim == 1 else 1


def take_row(cache, row: jnp.ndarray):
    """The batch-1 cache of the same format holding sequence `row` (int32 [], traced)."""
    return jax.tree.map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, row, 1, axis=_batch_axis(x)), cache
    )


def put_row(cache, row: jnp.ndarray, one):
    """`cache` with sequence `row` replaced by the batch-1 cache `one` (same format, layout)."""
    return jax.tree.map(
        lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), row, _batch_axis(x)),
        cache,
        one,
    )
