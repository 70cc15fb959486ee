"""The target's cache beside a separate draft model's own float cache, kept in step.

A draft model (`qspec_jax.model.params.WithDraftModel`) has its own layers and shapes, so it
cannot share the target's K/V: it keeps its own float `KVCache` (its own config). This holder
is a cache format (`qspec_jax.cache.protocol.CacheFormat`) that the model and the loop use as
the target's cache: `write_layer` / `attend` / `prefill_cache` / `flush` are the target
cache's, and `commit` sets the verified lengths of both, so committed tokens count in both and
a rollback (the length moving back past rejected drafts) rolls back both.

What the holder cannot do by itself is run the draft model: the draft-model method fills the
draft cache after the target's prefill (`DraftModelSpec.after_prefill`) and writes the draft
K/V of every committed token while drafting (`qspec_jax.decoding.methods.draftmodel`).

Invariant between steps (besides the target cache's): the draft cache holds the draft model's
K/V of positions 0 .. lengths[b] - 2, and `prev_token[b]` is the committed token at position
lengths[b] - 1 (its draft K/V may be missing: the step's first draft forward writes it).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import struct

from qspec_jax.cache.kv_cache import KVCache


@struct.dataclass
class WithDraftCache:
    """A target cache (any format) and the draft model's float cache.

    Attributes:
        main: the target's cache (`KVCache` or `HierKVCache`).
        draft: the draft model's `KVCache` [draft layers, batch, capacity, draft kv_heads,
            draft head_dim]; its lengths follow `main.lengths`.
        prev_token: int32 [batch], the committed token at position lengths[b] - 1.
    """

    main: Any
    draft: KVCache
    prev_token: jnp.ndarray

    @classmethod
    def wrap(cls, main, draft_cfg) -> WithDraftCache:
        """`main` beside an empty float cache for a draft model of config `draft_cfg`."""
        b = main.lengths.shape[0]
        draft = KVCache.init(draft_cfg, b, main.capacity)
        return cls(main=main, draft=draft, prev_token=jnp.zeros((b,), jnp.int32))

    # ---------------------------------------------------------------- the cache-format protocol
    @property
    def lengths(self) -> jnp.ndarray:
        return self.main.lengths

    @property
    def capacity(self) -> int:
        return self.main.capacity

    def write_layer(self, layer, positions, k, v) -> WithDraftCache:
        return self.replace(main=self.main.write_layer(layer, positions, k, v))

    def attend(self, layer, q, q_positions, view: str = "target", mask=None) -> jnp.ndarray:
        return self.main.attend(layer, q, q_positions, view, mask)

    def prefill_cache(self, prompt_len: int):
        """The target's scratch cache for the prompt (the draft model prefills separately)."""
        return self.main.prefill_cache(prompt_len)

    def finish_prefill(self, scratch, lengths: jnp.ndarray) -> WithDraftCache:
        """The target's prompt in `main`; the draft cache is filled by the method afterwards."""
        return self.replace(main=self.main.finish_prefill(scratch, lengths))

    def commit(self, lengths: jnp.ndarray, flush: bool = True) -> WithDraftCache:
        """Sets the verified lengths of both caches (moving them back rolls both back)."""
        return self.replace(
            main=self.main.commit(lengths, flush=flush), draft=self.draft.commit(lengths)
        )

    def flush(self) -> WithDraftCache:
        return self.replace(main=self.main.flush())

    def kv_bytes(self, lengths) -> int:
        """Bytes of K/V held by both caches for sequences of these lengths."""
        return self.main.kv_bytes(lengths) + self.draft.kv_bytes(lengths)

    def kv_bytes_per_token(self) -> float:
        return self.main.kv_bytes_per_token() + self.draft.kv_bytes_per_token()
