"""QSpec: draft gamma tokens in a low activation precision, verify them in one W4A16 forward.

One step, for every sequence of the batch at once:

1. **draft** gamma tokens autoregressively in the draft precision (W4A8 or the paper's W4A4)
   over the same int4 weights, each writing its K/V into the shared cache at lengths[b] + i
   (reading the cache's "draft" view: the int4 halves of a hierarchical cache);
2. **verify** the last committed token plus the drafts in ONE forward in the verify precision
   (W4A16) at the same positions, overwriting those gamma + 1 K/V entries;
3. **accept** the longest prefix equal to the verifier's argmax (greedy), or by speculative
   sampling, append the verifier's own token and commit; the cache length moves back past the
   rejected drafts. Every sequence accepts its own number of tokens each step.

Greedy output equals the verify precision's greedy output: every committed token is the
verifier's argmax given verified K/V.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from qspec_jax.config import DRAFT_PRECISIONS, PRECISION_TABLE, PRECISIONS, QUANTIZED_PRECISIONS
from qspec_jax.decoding.accept import accept_greedy, accept_sampling
from qspec_jax.decoding.methods.ar import ar_step
from qspec_jax.decoding.methods.base import DecodingMethod, MethodError, check_one_of
from qspec_jax.decoding.sampling import filtered_probs, sample_from_probs
from qspec_jax.decoding.state import commit
from qspec_jax.model.llama import forward

MAX_GAMMA = 16


@struct.dataclass
class SpecCarry:
    """What a sequence-speculation method counts.

    Attributes:
        draft_proposed: int32 [batch], draft tokens proposed while the sequence was active.
        draft_accepted: int32 [batch], draft tokens the verifier accepted.
        gamma_cur: int32 [], the draft length of the next step (== gamma unless adaptive).
        spec_steps: int32 [], steps that drafted (the rest were plain autoregressive steps).
    """

    draft_proposed: jnp.ndarray
    draft_accepted: jnp.ndarray
    gamma_cur: jnp.ndarray
    spec_steps: jnp.ndarray

    @classmethod
    def init(cls, batch: int, gamma: int) -> SpecCarry:
        zeros = jnp.zeros((batch,), jnp.int32)
        return cls(
            draft_proposed=zeros,
            draft_accepted=zeros,
            gamma_cur=jnp.asarray(max(gamma, 1), jnp.int32),
            spec_steps=jnp.zeros((), jnp.int32),
        )


def draft_sequence(
    state, params, cfg, qcfg, dc, gamma: int, precision: str, n_draft, prev_token=None
):
    """Drafts up to gamma tokens autoregressively in `precision`, writing their K/V.

    Every draft reads the cache's "draft" view. With `prev_token` (int32 [batch], the committed
    token at position lengths[b] - 1), the first forward runs [prev_token, last_token] and so
    also (re)writes the K/V of position lengths[b] - 1: a separate draft model's cache misses
    it after a step that accepted every draft (`qspec_jax.cache.with_draft`).

    Returns (cache with the lengths unchanged, drafts int32 [batch, gamma + 1] with
    drafts[:, 0] = last_token, q_probs float32 [batch, gamma, V] (None when greedy), key).
    """
    b = state.last_token.shape[0]
    sc = dc.sampling
    base = state.cache.lengths  # [batch]
    drafts = jnp.zeros((b, gamma + 1), jnp.int32).at[:, 0].set(state.last_token)
    q_probs = None if sc.greedy else jnp.zeros((b, gamma, cfg.vocab_size), jnp.float32)

    def choose(i, logits, drafts, q_probs, key):
        """Draft i + 1 from logits [batch, V] (argmax, or a draw from the filtered q)."""
        key, sub = jax.random.split(key)
        if sc.greedy:
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [batch]
        else:
            q = filtered_probs(logits, sc)  # [batch, V]
            nxt = sample_from_probs(q, sub)
            q_probs = jax.lax.dynamic_update_slice_in_dim(q_probs, q[:, None], i, axis=1)
        drafts = jax.lax.dynamic_update_slice_in_dim(drafts, nxt[:, None], i + 1, axis=1)
        return drafts, q_probs, key

    def run(tokens, cache, start):
        """Logits [batch, V] of the last of tokens [batch, t] placed at start .. start+t-1."""
        return forward(
            params,
            tokens,
            cache.replace(lengths=start),
            cfg,
            qcfg,
            precision,
            logits_index=jnp.full((b,), tokens.shape[1] - 1, jnp.int32),
            impl=dc.impl,
            kv_view="draft",
        )

    def body(i, carry):
        cache, drafts, q_probs, key = carry
        tok = jax.lax.dynamic_slice_in_dim(drafts, i, 1, axis=1)  # [batch, 1]
        logits, cache = run(tok, cache, base + i)  # [batch, V]
        return (cache, *choose(i, logits, drafts, q_probs, key))

    with jax.named_scope("draft"):
        carry, first = (state.cache, drafts, q_probs, state.key), 0
        if prev_token is not None:
            two = jnp.stack([prev_token, state.last_token], axis=1)  # [batch, 2]
            logits, cache = run(two, state.cache, base - 1)  # [batch, V]
            carry, first = (cache, *choose(0, logits, drafts, q_probs, state.key)), 1
        cache, drafts, q_probs, key = jax.lax.fori_loop(first, n_draft, body, carry)
    return cache.replace(lengths=base), drafts, q_probs, key


def cheaper_than(verify: str) -> tuple[str, ...]:
    """The precisions a draft for `verify` may run in (cheaper, per `PRECISION_TABLE`)."""
    rank = PRECISION_TABLE[verify].cost_rank
    order = dict.fromkeys(DRAFT_PRECISIONS + QUANTIZED_PRECISIONS)  # drafters first
    return tuple(p for p in order if PRECISION_TABLE[p].cost_rank < rank)


@dataclasses.dataclass(frozen=True)
class SequenceSpec(DecodingMethod):
    """Shared by QSpec and QuantSpec: draft a sequence, verify it in one forward.

    Attributes:
        gamma: tokens drafted per step (the maximum when adaptive_gamma), 1..16.
        adaptive_gamma: grow / shrink the draft length each step from the last step's
            acceptance, between 1 and `gamma` (verification always covers gamma + 1
            positions; the unused ones are ignored).
        spec_max_active: 0 = always speculate; otherwise a step in which more than this many
            sequences are still running is a plain verify-precision autoregressive step.
        verify: the verifier's precision, whose greedy output the method reproduces.
    """

    gamma: int = 3
    adaptive_gamma: bool = False
    spec_max_active: int = 0
    verify: str = "w4a16"

    def __post_init__(self):
        if not (isinstance(self.gamma, int) and 1 <= self.gamma <= MAX_GAMMA):
            raise MethodError(f"gamma must be an integer in 1..{MAX_GAMMA}, got {self.gamma!r}")
        if not isinstance(self.spec_max_active, int) or self.spec_max_active < 0:
            raise MethodError(
                f"spec_max_active must be a non-negative integer, got {self.spec_max_active!r}"
            )
        object.__setattr__(self, "adaptive_gamma", bool(self.adaptive_gamma))
        check_one_of(self.verify, PRECISIONS, "verify precision")

    @property
    def tokens_per_step(self) -> int:
        return self.gamma + 1

    @property
    def main_precision(self) -> str:
        return self.verify

    @property
    def precisions(self) -> tuple[str, ...]:
        return (self.verify, self.draft_precision)

    def init_carry(self, batch: int) -> SpecCarry:
        return SpecCarry.init(batch, self.gamma)

    def step(self, state, params, cfg, qcfg, dc):
        if self.spec_max_active <= 0:
            return self._speculate(state, params, cfg, qcfg, dc)
        n_active = jnp.sum(~state.done)
        return jax.lax.cond(
            n_active > self.spec_max_active,
            lambda s: ar_step(s, params, cfg, qcfg, dc, self.verify),
            lambda s: self._speculate(s, params, cfg, qcfg, dc),
            state,
        )

    def _speculate(self, state, params, cfg, qcfg, dc):
        """One round: draft gamma (draft precision), verify gamma + 1 (verify precision)."""
        carry: SpecCarry = state.carry
        n_draft = carry.gamma_cur if self.adaptive_gamma else self.gamma
        cache, drafts, q_probs, key = self._draft(state, params, cfg, qcfg, dc, n_draft)
        with jax.named_scope("verify"):
            # Same positions as the drafts: the verifier's K/V overwrite the draft's.
            logits, cache = forward(
                params, drafts, cache, cfg, qcfg, self.verify, impl=dc.impl
            )  # [batch, gamma + 1, V]
        key, sub = jax.random.split(key)
        real = carry.gamma_cur if self.adaptive_gamma else None
        with jax.named_scope("accept"):
            if dc.sampling.greedy:
                n, emitted = accept_greedy(drafts, logits, real)
            else:
                p_probs = filtered_probs(logits, dc.sampling)  # [batch, gamma + 1, V]
                n, emitted = accept_sampling(drafts, q_probs, p_probs, sub, real)
        active = ~state.done
        act = active.astype(jnp.int32)
        gamma_cur = carry.gamma_cur
        if self.adaptive_gamma:
            # All drafts of every running sequence accepted: draft one more next time; fewer
            # than half accepted on average: one fewer.
            all_in = jnp.all(jnp.where(active, n == gamma_cur, True))
            rate = jnp.sum(n * act) / jnp.maximum(jnp.sum(act) * gamma_cur, 1)
            gamma_cur = jnp.where(
                all_in, gamma_cur + 1, jnp.where(rate < 0.5, gamma_cur - 1, gamma_cur)
            )
            gamma_cur = jnp.clip(gamma_cur, 1, self.gamma).astype(jnp.int32)
        carry = carry.replace(
            draft_proposed=carry.draft_proposed + carry.gamma_cur * act,
            draft_accepted=carry.draft_accepted + n * act,
            gamma_cur=gamma_cur,
            spec_steps=carry.spec_steps + 1,
        )
        # emitted[:, j] was chosen from the verifier's logits[:, j]
        return commit(state.replace(key=key, carry=carry), emitted, n + 1, cache, dc, logits)

    def _draft(self, state, params, cfg, qcfg, dc, n_draft):
        """(cache, drafts, q_probs, key) of `draft_sequence` in the draft precision."""
        return draft_sequence(
            state, params, cfg, qcfg, dc, self.gamma, self.draft_precision, n_draft
        )

    def stats(self, carry, rows, generated, verify_steps) -> dict[str, Any]:
        prop = int(carry.draft_proposed[:rows].sum())
        acc = int(carry.draft_accepted[:rows].sum())
        v = verify_steps
        return dict(
            gamma=self.gamma,
            draft=self.draft_precision,
            draft_tokens_proposed=prop,
            draft_tokens_accepted=acc,
            acceptance_rate=acc / prop if prop else float("nan"),
            # tokens committed per verify step (the first token comes from prefill)
            mean_tokens_per_step=(generated - rows) / v if v else float("nan"),
            verify_steps=v,
            speculative_steps=int(carry.spec_steps),
            adaptive_gamma=self.adaptive_gamma,
        )


@dataclasses.dataclass(frozen=True)
class QSpec(SequenceSpec):
    """QSpec (arXiv 2410.11305): low-precision drafts over the verifier's own int4 weights.

    Attributes:
        draft: the drafts' precision, cheaper than `verify`: "w4a8" (the measured best: runs
            on int8 units every target has) or "w4a4" (the paper's) over the verifier's own
            int4 weights; with `verify="fp"` (an engine holding float weights and an int4 copy,
            `load(..., draft_quant=...)`) also "w4a16".
        gamma, adaptive_gamma, spec_max_active, verify: see `SequenceSpec`.
    """

    name: ClassVar[str] = "qspec"
    summary: ClassVar[str] = (
        "QSpec: drafts in W4A8 or W4A4, verifies in W4A16, one int4 weight copy, one cache"
    )

    draft: str = "w4a8"

    def __post_init__(self):
        super().__post_init__()
        check_one_of(self.draft, PRECISIONS, "draft precision")

    @property
    def draft_precision(self) -> str:
        return self.draft

    def check_weights(self, weights) -> None:
        check_one_of(self.draft, cheaper_than(self.verify), "draft precision")
        super().check_weights(weights)
