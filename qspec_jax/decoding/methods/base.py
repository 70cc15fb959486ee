"""The protocol every decoding method implements, and the option handling they share.

A decoding method decides what one step of the generation loop does: how many tokens it may
write to the cache, which precisions run, what it counts. The loop (`qspec_jax.decoding.loop`)
owns everything else: prefill, the `lax.while_loop`, EOS / length bookkeeping and the commit
that ends every step (`qspec_jax.decoding.state.commit`).

A method is a frozen, hashable dataclass (a jit static argument through `DecodeConfig`): its
settings are static, its per-step counters live in the pytree it returns from `init_carry`,
carried in `DecodeState.carry`.

To add a method: one new file in this folder with a subclass of `DecodingMethod`, and one line
in `qspec_jax.decoding.methods.REGISTRY`.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

from qspec_jax.cache.protocol import KV_FORMATS as KV_CACHE_FORMATS
from qspec_jax.config import PRECISION_TABLE


class MethodError(ValueError):
    """A method's settings, or the weights / cache it is asked to run on, do not fit."""


@dataclasses.dataclass(frozen=True)
class DecodingMethod(abc.ABC):
    """One decoding method: the static settings of a step, and the step itself.

    Class attributes:
        name: the registry name (`qspec_jax.decoding.methods.REGISTRY`).
        summary: one line for the mode table (README, `qspec-jax generate --help`).
        kv_caches: the cache formats the method runs on (`qspec_jax.cache.protocol`).
        default_kv_cache: the format used when the caller names none.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    kv_caches: ClassVar[tuple[str, ...]] = KV_CACHE_FORMATS
    default_kv_cache: ClassVar[str] = "float"

    # ------------------------------------------------------------------ what the loop asks
    @property
    def mode(self) -> str:
        """The shorthand string for this method (`generate(..., mode=...)`)."""
        return self.name

    @property
    @abc.abstractmethod
    def tokens_per_step(self) -> int:
        """Cache positions one step may write (sizes the cache's headroom and the output)."""

    @property
    @abc.abstractmethod
    def main_precision(self) -> str:
        """The precision of prefill and of the output distribution."""

    @property
    def precisions(self) -> tuple[str, ...]:
        """Every precision a step runs (the weights must serve all of them)."""
        return (self.main_precision,)

    @property
    def draft_precision(self) -> str | None:
        """The precision drafts run in (None: the method does not draft)."""
        return None

    @property
    def speculative(self) -> bool:
        return self.draft_precision is not None

    def init_carry(self, batch: int) -> Any:
        """The method's own counters for a batch (a pytree of arrays; () for none)."""
        del batch
        return ()

    def wrap_cache(self, cache, params):
        """The cache a request runs on, from the engine's empty one (default: itself).

        A method that keeps state beside the target's cache (a draft model's own cache,
        `qspec_jax.cache.with_draft`) wraps it here; the engine calls this once per request.
        """
        del params
        return cache

    def after_prefill(self, cache, params, prompt_tokens, prompt_lens, cfg, qcfg, dc):
        """The cache after the target's prefill of prompts [batch, T] (default: itself).

        Called by `qspec_jax.decoding.loop.prefill` inside the jitted program; a draft model
        prefills its own cache here.
        """
        del params, prompt_tokens, prompt_lens, cfg, qcfg, dc
        return cache

    @abc.abstractmethod
    def step(self, state, params, cfg, qcfg, dc):
        """One step: returns the next `DecodeState` (ending in `state.commit`).

        Args:
            state: the `DecodeState`, its cache already flushed for this step.
            params: model weights.
            cfg, qcfg: the static model and quantization configs.
            dc: the static `DecodeConfig` (sampling, EOS ids, kernel impl; `dc.method` is self).
        """

    def stats(self, carry: Any, rows: int, generated: int, verify_steps: int) -> dict[str, Any]:
        """Statistics for `GenerationResult.stats` from the final carry (host numpy arrays).

        Args:
            carry: the final carry, arrays fetched to the host.
            rows: the real sequences (the first `rows` of each [batch] array; the rest pad).
            generated: tokens generated over the real rows.
            verify_steps: steps summed over the real rows while they were active.
        """
        del carry, rows, generated, verify_steps
        return {}

    # ------------------------------------------------------------------ compatibility
    def check(self, *, weights, kv_cache: str, kv_residual: int | None = None) -> None:
        """Raises MethodError (one sentence) when the weights or the cache cannot serve this.

        Args:
            weights: the weight kinds held, a set of "float" / "int4"
                (`qspec_jax.model.params.weight_kinds`).
            kv_cache: the cache format ("float" or "hier").
            kv_residual: R of a hierarchical cache (float buffer of up to 2R tokens).
        """
        self.check_weights(weights)
        self.check_cache(kv_cache, kv_residual)

    def check_weights(self, weights) -> None:
        """MethodError unless the weights at hand serve every precision the method runs."""
        for p in self.precisions:
            if PRECISION_TABLE[p].weights not in weights:
                why = (
                    "this model holds only int4 weights; load it without --quant (or with "
                    "draft_quant=... beside float weights) for fp"
                    if PRECISION_TABLE[p].weights == "float"
                    else "this model holds float weights; load it with --quant (e.g. quarot-rtn) "
                    "or draft_quant=... first"
                )
                raise MethodError(f"mode {self.mode!r} is not available: {why}")

    def check_cache(self, kv_cache: str, kv_residual: int | None = None) -> None:
        """MethodError unless the method runs on this cache format (and its float buffer)."""
        if kv_cache not in KV_CACHE_FORMATS:
            raise MethodError(
                f"unknown kv_cache {kv_cache!r}: choose one of {', '.join(KV_CACHE_FORMATS)}"
            )
        if kv_cache not in self.kv_caches:
            raise MethodError(self._cache_refusal(kv_cache))
        if kv_cache == "hier":
            if not isinstance(kv_residual, int) or kv_residual < 1:
                raise MethodError(f"kv_residual must be a positive integer, got {kv_residual!r}")
            if self.tokens_per_step - 1 > kv_residual:
                raise MethodError(
                    f"gamma {self.tokens_per_step - 1} is larger than kv_residual {kv_residual}: "
                    "a speculative step must fit the float buffer (use gamma <= R)"
                )

    def _cache_refusal(self, kv_cache: str) -> str:
        return (
            f"mode {self.mode!r} runs on kv_cache {' or '.join(map(repr, self.kv_caches))}, "
            f"not {kv_cache!r}"
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def modes(cls) -> dict[str, dict[str, Any]]:
        """Mode shorthands this class serves: {mode string: fixed constructor options}."""
        return {cls.name: {}}

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def check_one_of(value, allowed, what: str) -> None:
    """MethodError naming the choices when `value` is not one of `allowed`."""
    if value not in allowed:
        raise MethodError(f"unknown {what} {value!r}: choose one of {', '.join(map(str, allowed))}")
