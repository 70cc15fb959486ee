"""Token selection: greedy, temperature, top-k and top-p, as filtered probability vectors.

Speculative sampling needs the draft's and the verifier's distributions after the same
filtering, so filtering produces probabilities (`filtered_probs`) and sampling draws from them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings.

    Attributes:
        temperature: 0 means greedy (argmax); otherwise logits are divided by it.
        top_k: keep only the k most likely tokens (0 = off).
        top_p: keep the smallest set of most likely tokens whose mass reaches top_p (1.0 = off).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filtered_probs(logits: jnp.ndarray, sc: SamplingConfig) -> jnp.ndarray:
    """The distribution tokens are drawn from, [..., V] float32.

    Greedy gives the one-hot of the argmax (so speculative acceptance reduces to exact matching).
    """
    logits = logits.astype(jnp.float32)
    if sc.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    logits = logits / sc.temperature
    neg = jnp.finfo(jnp.float32).min
    if sc.top_k:
        kth = jax.lax.top_k(logits, sc.top_k)[0][..., -1:]  # [..., 1]
        logits = jnp.where(logits < kth, neg, logits)
    if sc.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # [..., V] descending
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep = mass_before < sc.top_p  # always keeps the top token
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.nn.softmax(logits, axis=-1)


def sample(logits: jnp.ndarray, key: jax.Array, sc: SamplingConfig) -> jnp.ndarray:
    """Draws one token per row of logits [..., V] -> int32 [...]."""
    if sc.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_from_probs(filtered_probs(logits, sc), key)


def sample_from_probs(probs: jnp.ndarray, key: jax.Array) -> jnp.ndarray:
    """Draws one token per row of an (unnormalized, non-negative) probability array [..., V]."""
    logp = jnp.log(jnp.maximum(probs, 0.0))  # zeros -> -inf, never drawn
    return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)
