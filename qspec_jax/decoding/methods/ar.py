"""Autoregressive decoding: one token per sequence per step, in one precision."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from qspec_jax.config import PRECISIONS
from qspec_jax.decoding.methods.base import DecodingMethod, check_one_of
from qspec_jax.decoding.sampling import sample
from qspec_jax.decoding.state import commit
from qspec_jax.model.llama import forward


def ar_step(state, params, cfg, qcfg, dc, precision: str):
    """One autoregressive token per sequence in `precision` (also QSpec's fallback step)."""
    b = state.last_token.shape[0]
    with jax.named_scope("ar_step"):
        logits, cache = forward(
            params,
            state.last_token[:, None],  # [batch, 1]
            state.cache,
            cfg,
            qcfg,
            precision,
            logits_index=jnp.zeros((b,), jnp.int32),
            impl=dc.impl,
        )  # [batch, V]
        key, sub = jax.random.split(state.key)
        nxt = sample(logits, sub, dc.sampling)  # [batch]
    state = state.replace(key=key)
    return commit(state, nxt[:, None], jnp.ones((b,), jnp.int32), cache, dc, logits[:, None])


@dataclasses.dataclass(frozen=True)
class AR(DecodingMethod):
    """Plain autoregressive decoding in one precision.

    Attributes:
        precision: "fp" (float weights) or "w4a16" / "w4a8" / "w4a4" (the int4 weights).
    """

    name: ClassVar[str] = "ar"
    summary: ClassVar[str] = "autoregressive, one token per step in the named precision"

    precision: str = "w4a16"

    def __post_init__(self):
        check_one_of(self.precision, PRECISIONS, "precision")

    @property
    def mode(self) -> str:
        return self.precision

    @property
    def tokens_per_step(self) -> int:
        return 1

    @property
    def main_precision(self) -> str:
        return self.precision

    def step(self, state, params, cfg, qcfg, dc):
        return ar_step(state, params, cfg, qcfg, dc, self.precision)

    @classmethod
    def modes(cls) -> dict[str, dict[str, Any]]:
        return {p: {"precision": p} for p in PRECISIONS}
