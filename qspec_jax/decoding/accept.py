"""Acceptance rules for a drafted sequence: exact greedy, and speculative sampling.

Both take the drafts with the last committed token in front (`drafts[:, 0]`) and the
verifier's output at those positions, and return how many drafts were accepted plus the tokens
to emit: the accepted drafts followed by the verifier's own token (correction or bonus).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qspec_jax.decoding.sampling import sample_from_probs


def accept_greedy(drafts: jnp.ndarray, target_logits: jnp.ndarray, n_draft=None):
    """Exact greedy acceptance.

    Args:
        drafts: int32 [batch, gamma + 1]; drafts[:, 0] is the last committed token.
        target_logits: [batch, gamma + 1, V] verifier logits at those positions.
        n_draft: optional int32 [] or [batch, 1], only the first n_draft drafts are real.

    Returns:
        (n_accepted int32 [batch], emitted int32 [batch, gamma + 1]): the first n_accepted
        drafts followed by the verifier's own token at position n_accepted.
    """
    gamma = drafts.shape[1] - 1
    target = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [batch, gamma + 1]
    match = drafts[:, 1:] == target[:, :gamma]  # [batch, gamma]
    if n_draft is not None:
        match = match & (jnp.arange(gamma)[None, :] < n_draft)
    n = jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=-1), axis=-1)  # [batch]
    return n, emit(drafts, n, jnp.take_along_axis(target, n[:, None], axis=1)[:, 0])


def emit(drafts: jnp.ndarray, n: jnp.ndarray, extra: jnp.ndarray) -> jnp.ndarray:
    """int32 [batch, gamma + 1]: the first n[b] drafts of drafts[:, 1:], then extra[b]."""
    gamma = drafts.shape[1] - 1
    j = jnp.arange(gamma + 1)[None, :]
    shifted = jnp.concatenate([drafts[:, 1:], drafts[:, :1]], axis=1)  # [batch, gamma + 1]
    return jnp.where(j < n[:, None], shifted, extra[:, None]).astype(jnp.int32)


def accept_sampling(
    drafts: jnp.ndarray,
    q_probs: jnp.ndarray,
    p_probs: jnp.ndarray,
    key: jax.Array,
    n_draft=None,
):
    """Speculative sampling (Leviathan et al. / Chen et al.): output distributed as p.

    Draft token d_{i+1} ~ q_i is accepted with probability min(1, p_i(d) / q_i(d)); at the first
    rejection the replacement is drawn from normalize(max(0, p_i - q_i)); if all gamma are
    accepted a bonus token is drawn from p_gamma.

    Args:
        drafts: int32 [batch, gamma + 1].
        q_probs: [batch, gamma, V] draft distributions the drafts were drawn from.
        p_probs: [batch, gamma + 1, V] verifier distributions (same filtering).
        key: PRNG key.
        n_draft: optional int32 [] or [batch, 1], only the first n_draft drafts are real.

    Returns:
        (n_accepted [batch], emitted [batch, gamma + 1]).
    """
    b, g1, v = p_probs.shape
    gamma = g1 - 1
    d = drafts[:, 1:]  # [batch, gamma]
    p_d = jnp.take_along_axis(p_probs[:, :gamma], d[..., None], axis=-1)[..., 0]  # [batch, gamma]
    q_d = jnp.take_along_axis(q_probs, d[..., None], axis=-1)[..., 0]  # [batch, gamma]
    k_acc, k_res = jax.random.split(key)
    u = jax.random.uniform(k_acc, (b, gamma))
    accepted = u * q_d < p_d  # u < p/q without dividing by a zero q
    if n_draft is not None:
        accepted = accepted & (jnp.arange(gamma)[None, :] < n_draft)
    n = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=-1), axis=-1)  # [batch]
    residual = jnp.maximum(p_probs[:, :gamma] - q_probs, 0.0)  # [batch, gamma, V]
    residual = jnp.concatenate([residual, p_probs[:, gamma:]], axis=1)  # [batch, gamma + 1, V]
    row = jnp.take_along_axis(residual, n[:, None, None], axis=1)[:, 0]  # [batch, V]
    p_row = jnp.take_along_axis(p_probs, n[:, None, None], axis=1)[:, 0]  # [batch, V]
    row = jnp.where(row.sum(-1, keepdims=True) > 0, row, p_row)  # p == q exactly: draw from p
    extra = sample_from_probs(row, k_res)
    return n, emit(drafts, n, extra)
