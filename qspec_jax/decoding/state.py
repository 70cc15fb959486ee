"""The generation state every decoding method shares, and the commit that ends every step.

`DecodeState` is what the jitted `lax.while_loop` carries. Its fields are the same for every
decoding method; what a method counts for itself (draft statistics, the adaptive draft length,
tree acceptance) lives in `DecodeState.carry`, a pytree the method builds in `init_carry`.

Invariant between steps: for each sequence, `cache.lengths[b]` positions hold verified K/V
(prompt + committed tokens except the last), and `last_token[b]` is the last committed token,
whose K/V are not yet in the cache.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

# finish reasons
RUNNING, STOP, LENGTH = 0, 1, 2
FINISH_NAMES = {RUNNING: None, STOP: "stop", LENGTH: "length"}


@struct.dataclass
class DecodeState:
    """Everything the loop carries.

    Attributes:
        cache: the shared KV cache (any `qspec_jax.cache.protocol.CacheFormat`); lengths[b] =
            verified positions of sequence b.
        last_token: int32 [batch], last committed token (its K/V not yet in the cache).
        out_tokens: int32 [batch, out_len], generated tokens (valid up to num_generated).
        num_generated: int32 [batch], tokens generated so far (EOS included).
        done: bool [batch], the sequence has finished.
        finish: int32 [batch], RUNNING / STOP (EOS) / LENGTH (max_new_tokens or cache full).
        key: PRNG key for sampling.
        steps: int32 [], loop iterations run (tokens for AR, draft+verify rounds for QSpec).
        verify_steps: int32 [batch], steps in which the sequence was active.
        max_new: int32 [batch], each sequence's max_new_tokens (traced, <= dc.max_new_tokens).
        stop_ids: int32 [batch, S], each sequence's own stop token ids besides `dc.eos_ids`
            (-1 pads; S may be 0).
        carry: the decoding method's own pytree (`DecodingMethod.init_carry`); its fields read
            through the state too (`state.draft_accepted` is `state.carry.draft_accepted`).
        logprobs: `Logprobs` of every generated token when `dc.logprobs` > 0, else None.
    """

    cache: Any
    last_token: jnp.ndarray
    out_tokens: jnp.ndarray
    num_generated: jnp.ndarray
    done: jnp.ndarray
    finish: jnp.ndarray
    key: jax.Array
    steps: jnp.ndarray
    verify_steps: jnp.ndarray
    max_new: jnp.ndarray
    stop_ids: jnp.ndarray
    carry: Any = ()
    logprobs: Any = None

    def __getattr__(self, name: str):
        # Only called when normal lookup fails: the method's counters, e.g. draft_accepted.
        if name.startswith("__") or name == "carry":
            raise AttributeError(name)
        try:
            return getattr(self.carry, name)
        except AttributeError:
            raise AttributeError(
                f"DecodeState has no field {name!r}, and its method's carry "
                f"({type(self.carry).__name__}) has none either"
            ) from None


@struct.dataclass
class Logprobs:
    """Log-probabilities of the generated tokens under the output distribution.

    Always the verifier's (the method's `main_precision`): the log-softmax of its logits at the
    position that produced the token, before temperature / top-k / top-p; never the draft's.

    Attributes:
        chosen: float32 [batch, out_len], the generated token's log-probability.
        top_ids: int32 [batch, out_len, k], the k most likely tokens there.
        top: float32 [batch, out_len, k], their log-probabilities (descending).
    """

    chosen: jnp.ndarray
    top_ids: jnp.ndarray
    top: jnp.ndarray

    @classmethod
    def init(cls, batch: int, out_len: int, k: int) -> Logprobs:
        return cls(
            chosen=jnp.zeros((batch, out_len), jnp.float32),
            top_ids=jnp.zeros((batch, out_len, k), jnp.int32),
            top=jnp.zeros((batch, out_len, k), jnp.float32),
        )

    def write(self, logits: jnp.ndarray, tokens: jnp.ndarray, idx: jnp.ndarray) -> Logprobs:
        """Records tokens [batch, w] drawn from logits [batch, w, V] at positions idx [batch, w]
        (positions >= out_len are dropped)."""
        k = self.top.shape[-1]
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [batch, w, V]
        chosen = jnp.take_along_axis(lp, tokens[..., None], axis=-1)[..., 0]  # [batch, w]
        top, top_ids = jax.lax.top_k(lp, k)  # [batch, w, k]

        def put(buf, val):
            return jax.vmap(lambda o, i, e: o.at[i].set(e, mode="drop"))(buf, idx, val)

        return Logprobs(
            chosen=put(self.chosen, chosen),
            top_ids=put(self.top_ids, top_ids.astype(jnp.int32)),
            top=put(self.top, top),
        )


def is_eos(tokens: jnp.ndarray, eos_ids: tuple[int, ...], stop_ids=None) -> jnp.ndarray:
    """bool, tokens' shape ([batch] or [batch, w]): the token ends its sequence.

    A token ends a sequence when it is one of the static `eos_ids` or one of that sequence's
    own `stop_ids` (int32 [batch, S], -1 pads).
    """
    out = jnp.zeros(tokens.shape, bool)
    if eos_ids:
        out = jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))
    if stop_ids is not None and stop_ids.shape[-1]:
        per_row = stop_ids.reshape(stop_ids.shape[:1] + (1,) * (tokens.ndim - 1) + (-1,))
        out = out | jnp.any(tokens[..., None] == per_row, axis=-1)
    return out


def update_finish(state: DecodeState, newly_stopped: jnp.ndarray, dc) -> DecodeState:
    """Marks sequences done: EOS seen, max_new_tokens reached, or no room for another step."""
    active = ~state.done
    full = state.cache.lengths + dc.tokens_per_step > state.cache.capacity
    at_max = state.num_generated >= state.max_new
    stop = active & newly_stopped
    length = active & ~newly_stopped & (at_max | full)
    finish = jnp.where(stop, STOP, jnp.where(length, LENGTH, state.finish))
    return state.replace(done=state.done | stop | length, finish=finish.astype(jnp.int32))


def commit(
    state: DecodeState,
    emitted: jnp.ndarray,
    n_emit: jnp.ndarray,
    cache,
    dc,
    logits: jnp.ndarray | None = None,
) -> DecodeState:
    """Appends up to n_emit[b] tokens of emitted [batch, w] to each active sequence.

    Every decoding method ends its step here. Truncates at the first EOS and at the call's
    max_new_tokens, then sets the cache length so that every committed token but the last has
    its K/V in the cache (moving the length back is the rollback of rejected drafts).

    Args:
        state: the state before the step (its cache is replaced by `cache`).
        emitted: int32 [batch, w] tokens the step produced, in order.
        n_emit: int32 [batch] how many of them are real (at least 1 for an active sequence).
        cache: the cache after the step's forwards.
        dc: the static `DecodeConfig`.
        logits: [batch, w, V] the output distribution's logits each emitted token was chosen
            from (needed when `dc.logprobs` > 0).
    """
    b, w = emitted.shape
    active = ~state.done
    j = jnp.arange(w, dtype=jnp.int32)[None, :]  # [1, w]
    eos = is_eos(emitted, dc.eos_ids, state.stop_ids) & (j < n_emit[:, None])  # [batch, w]
    first_eos = jnp.where(eos.any(-1), jnp.argmax(eos, axis=-1), w)  # [batch]
    room = state.max_new - state.num_generated
    count = jnp.minimum(jnp.minimum(n_emit, first_eos + 1), room)
    count = jnp.where(active, jnp.maximum(count, 0), 0)  # [batch]
    idx = state.num_generated[:, None] + j  # [batch, w]
    idx = jnp.where(j < count[:, None], idx, dc.out_len)  # out of range -> dropped
    out = jax.vmap(lambda o, i, e: o.at[i].set(e, mode="drop"))(state.out_tokens, idx, emitted)
    last = jnp.take_along_axis(emitted, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    new_lengths = jnp.where(active, state.cache.lengths + count, state.cache.lengths)
    stopped = first_eos < count  # the EOS itself was committed
    if dc.logprobs:
        state = state.replace(logprobs=state.logprobs.write(logits, emitted, idx))
    state = state.replace(
        cache=cache.commit(new_lengths, flush=False),  # flushed at the next step's start
        last_token=jnp.where(active, last, state.last_token),
        out_tokens=out,
        num_generated=state.num_generated + count,
        steps=state.steps + 1,
        verify_steps=state.verify_steps + active.astype(jnp.int32),
    )
    return update_finish(state, stopped & active, dc)
