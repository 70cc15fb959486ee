"""The functional KV cache: one buffer shared by every precision, written, overwritten, rolled back.

QSpec never keeps a second cache: the W4A4 draft writes K/V for the drafted positions, the W4A16
verifier recomputes the same positions and overwrites them, and rejected positions are dropped
by moving `lengths` back. All three are plain functions returning a new cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from qspec_jax.config import LlamaConfig


@struct.dataclass
class KVCache:
    """Fixed-capacity KV cache with per-sequence lengths.

    Attributes:
        k: [layers, batch, capacity, kv_heads, head_dim] keys (RoPE applied).
        v: [layers, batch, capacity, kv_heads, head_dim] values.
        lengths: int32 [batch], number of valid positions of each sequence; position p of
            sequence b lives at index p, and indices >= lengths[b] hold nothing meaningful.
    """

    k: jnp.ndarray
    v: jnp.ndarray
    lengths: jnp.ndarray

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @classmethod
    def init(cls, cfg: LlamaConfig, batch: int, capacity: int, dtype=None) -> KVCache:
        """An empty cache (all lengths 0)."""
        shape = (cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.head_dim)
        dt = dtype or cfg.jnp_dtype
        return cls(
            k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt), lengths=jnp.zeros((batch,), jnp.int32)
        )

    @classmethod
    def abstract(cls, cfg: LlamaConfig, batch: int, capacity: int, dtype=None) -> KVCache:
        """Shape/dtype structs of `init` (for tracing and export without allocating)."""
        return jax.eval_shape(lambda: cls.init(cfg, batch, capacity, dtype))

    # ---------------------------------------------------------------- the cache-format protocol
    # (see `qspec_jax.cache.protocol`; these are what the model and the decoding loop call)

    def write_layer(self, layer, positions: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> KVCache:
        """Writes k, v [batch, t, kv_heads, head_dim] of `layer` at positions [batch, t]."""
        ck, cv = write_layer(self.k, self.v, jnp.asarray(layer), positions, k, v)
        return self.replace(k=ck, v=cv)

    def attend(
        self,
        layer,
        q: jnp.ndarray,
        q_positions: jnp.ndarray,
        view: str = "target",
        mask: jnp.ndarray | None = None,
    ):
        """Causal attention of q [batch, t, heads, head_dim] over `layer` -> [batch, t, q_size].

        The float cache has one view: `view` ("target" or "draft") changes nothing. `mask`
        (bool [batch, t, capacity]) replaces the causal rule when given (tree attention).
        """
        from qspec_jax.model.attention import attention  # noqa: PLC0415

        return attention(q, self.k[layer], self.v[layer], q_positions, mask)

    def prefill_cache(self, prompt_len: int) -> KVCache:
        """The cache a padded prompt of `prompt_len` tokens is run on: this one, emptied."""
        del prompt_len
        return set_lengths(self, jnp.zeros_like(self.lengths))

    def finish_prefill(self, scratch: KVCache, lengths: jnp.ndarray) -> KVCache:
        """The cache after prefill: `scratch` (this cache, prompt K/V written) with `lengths`."""
        return set_lengths(scratch, lengths)

    def commit(self, lengths: jnp.ndarray, flush: bool = True) -> KVCache:
        """Sets the verified lengths [batch] after a decoding step (nothing to flush here)."""
        del flush
        return set_lengths(self, lengths)

    def flush(self) -> KVCache:
        """Nothing to quantize in a float cache: the cache itself."""
        return self

    def kv_bytes(self, lengths) -> int:
        """Bytes of K/V holding sequences of these lengths (float: every token in full)."""
        per_token = 2 * self.k.shape[0] * self.k.shape[3] * self.k.shape[4] * self.k.dtype.itemsize
        return int(per_token * int(sum(int(n) for n in lengths)))

    def kv_bytes_per_token(self) -> float:
        """Bytes of K/V one token costs (all layers, keys and values)."""
        return float(
            2 * self.k.shape[0] * self.k.shape[3] * self.k.shape[4] * self.k.dtype.itemsize
        )


def write_layer(
    cache_k: jnp.ndarray,
    cache_v: jnp.ndarray,
    layer: jnp.ndarray,
    positions: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Writes a block of K/V for one layer at per-sequence positions.

    Args:
        cache_k, cache_v: [layers, batch, capacity, kv_heads, head_dim].
        layer: scalar int, the layer index.
        positions: int32 [batch, t], where each new entry goes (lengths[b] + 0..t-1).
        k, v: [batch, t, kv_heads, head_dim].

    Positions at or past the capacity are dropped (never clamped onto valid entries). The write
    is one scatter indexed by (layer, sequence, position) on the cache's own layout. (It was a
    per-sequence scatter vmapped over the batch axis; XLA:CPU lowers that with the batch axis
    moved first and copied the whole layer-stacked array into and out of that layout around
    every layer's write: 178 copies of the hierarchical cache's float buffer per decoding step
    for SmolLM2, counted with `experiments/count_hlo_copies.py`.)
    """

    rows = jnp.broadcast_to(
        jnp.arange(positions.shape[0], dtype=jnp.int32)[:, None], positions.shape
    )

    def put(c, new):  # c [layers, batch, capacity, kv_heads, hd], new [batch, t, kv_heads, hd]
        new = new.astype(c.dtype)
        if c.dtype.itemsize != 2 or not jnp.issubdtype(c.dtype, jnp.floating):
            return c.at[layer, rows, positions].set(new, mode="drop")
        # A 16-bit float cache is scattered as its uint16 bits (the same values, bit for bit):
        # XLA:CPU has no bfloat16 scatter, so it converted the whole layer-stacked cache to
        # float32 and back around every layer's write (2 x L full-cache passes per step, for
        # SmolLM2 in bfloat16 more time than the rest of the step; docs/kernels.md).
        bits = jax.lax.bitcast_convert_type(c, jnp.uint16)  # [layers, batch, capacity, kvh, hd]
        new_bits = jax.lax.bitcast_convert_type(new, jnp.uint16)  # [batch, t, kv_heads, hd]
        out = bits.at[layer, rows, positions].set(new_bits, mode="drop")
        return jax.lax.bitcast_convert_type(out, c.dtype)

    return put(cache_k, k), put(cache_v, v)


def write(cache: KVCache, layer: int, k: jnp.ndarray, v: jnp.ndarray) -> KVCache:
    """Writes k, v [batch, t, kv_heads, head_dim] for `layer` at positions lengths[b] + 0..t-1.

    Lengths are not changed: call `advance` / `rollback` to commit how many entries are valid.
    """
    t = k.shape[1]
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [batch, t]
    ck, cv = write_layer(cache.k, cache.v, jnp.asarray(layer), positions, k, v)
    return cache.replace(k=ck, v=cv)


def advance(cache: KVCache, n: jnp.ndarray | int) -> KVCache:
    """Marks n (scalar or [batch]) more positions valid, capped at the capacity."""
    return cache.replace(lengths=jnp.minimum(cache.lengths + n, cache.capacity).astype(jnp.int32))


def rollback(cache: KVCache, lengths: jnp.ndarray) -> KVCache:
    """Moves lengths back to `lengths` [batch] (never forward): rejected entries are dropped."""
    return cache.replace(lengths=jnp.minimum(cache.lengths, lengths).astype(jnp.int32))


def set_lengths(cache: KVCache, lengths: jnp.ndarray) -> KVCache:
    """Sets lengths [batch] directly (e.g. prompt lengths after a padded prefill)."""
    return cache.replace(lengths=jnp.clip(lengths, 0, cache.capacity).astype(jnp.int32))
