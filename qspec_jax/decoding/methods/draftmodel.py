"""A separate draft model: a smaller model, or the target's first k layers, drafts a sequence.

SpecMQuant's small-model stage as a sequence drafter. The engine holds the target beside the
draft model (`load(target, draft_model=...)`, `qspec_jax.model.params.WithDraftModel`); the
draft model keeps its own float cache (`qspec_jax.cache.with_draft.WithDraftCache`) in step
with the target's. One step, for every sequence of the batch at once:

1. **draft** gamma tokens autoregressively with the draft model over its own cache; the first
   forward runs [token at lengths - 1, last token], so it also writes the draft K/V the last
   step may have left out (when every draft was accepted, the last one's K/V were never
   computed);
2. **verify** the last committed token plus the drafts in ONE target forward in `verify`
   precision over the target's cache, as QSpec does;
3. **accept** as QSpec does and commit: both caches' lengths move to the committed length, so
   a rollback rolls back both; positions past it hold rejected drafts and are overwritten.

Prefill fills both caches (`after_prefill`). Greedy output equals the target's autoregressive
greedy output in the verify precision on the same cache format: every committed token is the
verifier's argmax given verified K/V; the draft model only proposes.

Not built: the draft model as the first of SpecMQuant's three levels (draft model -> W4A8 ->
W4A16, `HSpec(levels=("model", "w4a8", "w4a16"))`) raises NotImplementedError.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from qspec_jax.cache.with_draft import WithDraftCache
from qspec_jax.decoding.methods.base import MethodError
from qspec_jax.decoding.methods.qspec import SequenceSpec, draft_sequence
from qspec_jax.model.llama import forward

# what the mode table says the drafts run in
DRAFT_MODEL = "draft model"


@dataclasses.dataclass(frozen=True)
class DraftModelSpec(SequenceSpec):
    """Speculative decoding with a separate draft model holding its own cache.

    Attributes:
        gamma, adaptive_gamma, verify: see `SequenceSpec` ("fp" for a float target, the
            default "w4a16" for an int4 one).
        spec_max_active: must be 0 here (an autoregressive fallback step would leave the draft
            model's cache behind).
    """

    name: ClassVar[str] = "draftmodel"
    summary: ClassVar[str] = (
        "a separate draft model (smaller model or the target's first k layers, "
        "`load(..., draft_model=...)`) with its own cache drafts; the target verifies"
    )

    def __post_init__(self):
        super().__post_init__()
        if self.spec_max_active:
            raise MethodError(
                "spec_max_active does not apply to mode 'draftmodel': its draft model's cache "
                "must see every step (leave it at 0)"
            )

    @property
    def draft_precision(self) -> str:
        return DRAFT_MODEL

    @property
    def precisions(self) -> tuple[str, ...]:
        return (self.verify,)  # the draft model's own precision follows its weights

    def check_weights(self, weights) -> None:
        if "draft_model" not in weights:
            raise MethodError(
                "mode 'draftmodel' needs a draft model: load the target with draft_model=... "
                "(a smaller model with the same tokenizer, or 'self:k' for its first k layers)"
            )
        super().check_weights(weights)

    # ------------------------------------------------------------------ the draft model's cache
    def wrap_cache(self, cache, params):
        if isinstance(cache, WithDraftCache):
            return cache
        return WithDraftCache.wrap(cache, params.draft_cfg)

    def after_prefill(self, cache, params, prompt_tokens, prompt_lens, cfg, qcfg, dc):
        """Runs the prompts [batch, T] through the draft model into its own cache."""
        del cfg, qcfg
        cache = self.wrap_cache(cache, params)
        t = prompt_tokens.shape[1]
        with jax.named_scope("draft_prefill"):
            scratch = cache.draft.prefill_cache(t)
            _, scratch = forward(
                params.draft,
                prompt_tokens,
                scratch,
                params.draft_cfg,
                params.draft_qcfg,
                params.draft_precision,
                logits_index=prompt_lens - 1,
                impl=dispatch.prefill_impl(dc.impl),
            )
            draft = cache.draft.finish_prefill(scratch, prompt_lens)
        last = jnp.take_along_axis(prompt_tokens, (prompt_lens - 1)[:, None], axis=1)[:, 0]
        return cache.replace(draft=draft, prev_token=last.astype(jnp.int32))  # [batch]

    # ------------------------------------------------------------------ the step
    def _draft(self, state, params, cfg, qcfg, dc, n_draft):
        del cfg, qcfg
        pair: WithDraftCache = state.cache
        dcache, drafts, q_probs, key = draft_sequence(
            state.replace(cache=pair.draft),
            params.draft,
            params.draft_cfg,
            params.draft_qcfg,
            dc,
            self.gamma,
            params.draft_precision,
            n_draft,
            prev_token=pair.prev_token,
        )
        return pair.replace(draft=dcache), drafts, q_probs, key

    def _speculate(self, state, params, cfg, qcfg, dc):
        new = super()._speculate(state, params, cfg, qcfg, dc)
        # The token at the new lengths - 1: the one before the new last token (a sequence that
        # committed anything has at least 2 generated tokens).
        moved = new.num_generated > state.num_generated  # [batch]
        at = jnp.maximum(new.num_generated - 2, 0)[:, None]  # [batch, 1]
        prev = jnp.take_along_axis(new.out_tokens, at, axis=1)[:, 0]  # [batch]
        cache = new.cache.replace(prev_token=jnp.where(moved, prev, new.cache.prev_token))
        return new.replace(cache=cache)
