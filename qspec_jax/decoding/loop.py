"""Generation as one jitted `lax.while_loop`: autoregressive decoding and QSpec.

The whole generation, prefill to last token, is one jitted function (`generate`): prefill the
padded prompts, then `lax.while_loop(cond, step, state)` with no host round trip per token. The
same `step` runs in a plain Python loop (`generate_python`) for debugging.

Two step kinds share the state:

* autoregressive (`mode` in fp / w4a16 / w4a4 / w4a8): one token per sequence per step;
* speculative (`mode="qspec"` or `"quantspec"`): draft gamma tokens in the draft precision (W4A4), writing their K/V into
  the shared cache; verify the last committed token plus the gamma drafts in ONE forward in the
  verify precision (W4A16), which overwrites those gamma + 1 K/V entries; accept the longest
  matching prefix (or, when sampling, speculative sampling's min(1, p/q) rule), append the
  verifier's own next token, and roll the cache length back past the rejected drafts. Every
  sequence accepts its own number of tokens each step. QSpec drafts in W4A4; QuantSpec drafts in
  the verify precision itself and gets its speed from the draft view of a hierarchical cache
  (int4 KV, `qspec_jax.cache.hierarchical`). Drafts always read the cache's "draft" view, the
  verifier and autoregressive steps its "target" view (the float cache has one view).

The cache format is the cache object's own (any `qspec_jax.cache.protocol.CacheFormat`): the
loop calls `prefill_cache` / `finish_prefill` around the prompt and `commit` after each step.

Invariant between steps: for each sequence, `cache.lengths[b]` positions hold verified K/V
(prompt + committed tokens except the last), and `last_token[b]` is the last committed token,
whose K/V are not yet in the cache.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from pallas_kernels import dispatch
from qspec_jax.cache.kv_cache import KVCache
from qspec_jax.config import PRECISIONS, LlamaConfig, QuantConfig
from qspec_jax.decoding.sampling import (
    SamplingConfig,
    filtered_probs,
    sample,
    sample_from_probs,
)
from qspec_jax.decoding.tree import TreeConfig
from qspec_jax.model.llama import forward
from qspec_jax.model.params import Params

MODES = ("fp", "w4a16", "w4a4", "w4a8", "qspec", "quantspec", "hspec")
SPEC_MODES = ("qspec", "quantspec")
MAX_GAMMA = 16
# QSpec's drafter reads the same int4 weights with int4 or int8 activations (W4A8 runs on int8
# units that every target has; Hopper has no int4 MMA).
DRAFT_PRECISIONS = ("w4a4", "w4a8")

# finish reasons
RUNNING, STOP, LENGTH = 0, 1, 2
FINISH_NAMES = {RUNNING: None, STOP: "stop", LENGTH: "length"}


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Static decoding settings (hashable: a jit static argument).

    Attributes:
        mode: "fp" | "w4a16" | "w4a4" | "w4a8" (autoregressive), "qspec" (draft in
            draft_precision), "quantspec" (draft in verify_precision, reading the cache's
            draft view: int4 KV on a hierarchical cache) or "hspec" (SpecMQuant's hierarchy,
            `qspec_jax.decoding.hspec`).
        max_new_tokens: the most tokens generated per sequence. When `generate` is also given
            a dynamic `max_new_tokens` array, this static value is only the upper bound that
            sizes the output buffer (the engine passes a power-of-two bucket here, so calls
            with different limits in one bucket share one compiled program).
        sampling: greedy / temperature / top-k / top-p.
        eos_ids: token ids that end a sequence.
        gamma: QSpec draft length (tokens drafted per verify step).
        draft_precision / verify_precision: QSpec's two precisions over the same weights; the
            draft is "w4a4" (the paper's) or "w4a8".
        impl: kernel implementation override (see `pallas_kernels.dispatch`).
        adaptive_gamma: grow / shrink the draft length each step from the last step's acceptance,
            between 1 and `gamma` (the static maximum; verification always covers gamma + 1
            positions, the unused ones are ignored).
        spec_max_active: 0 = always speculate; otherwise a step in which more than this many
            sequences are still running is a plain verify-precision autoregressive step (at
            large batch the verifier is compute-bound and drafting stops paying).
        tree: hspec's static draft tree (required for mode "hspec").
        levels: hspec's precisions, cheapest first: the tree drafter, (the tree verifier,) the
            sequence verifier, e.g. ("w4a4", "w4a8", "w4a16") or ("w4a4", "w4a16").
    """

    mode: str = "fp"
    max_new_tokens: int = 64
    sampling: SamplingConfig = SamplingConfig()
    eos_ids: tuple[int, ...] = ()
    gamma: int = 3
    draft_precision: str = "w4a4"
    verify_precision: str = "w4a16"
    impl: str | None = None
    adaptive_gamma: bool = False
    spec_max_active: int = 0
    tree: TreeConfig | None = None
    levels: tuple[str, ...] = ("w4a4", "w4a8", "w4a16")

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.mode in SPEC_MODES and not 1 <= self.gamma <= MAX_GAMMA:
            raise ValueError(f"gamma must be in 1..{MAX_GAMMA}, got {self.gamma}")
        for what, prec in (("draft", self.draft_precision), ("verify", self.verify_precision)):
            if prec not in PRECISIONS:  # the engine offers DRAFT_PRECISIONS for the draft
                raise ValueError(
                    f"unknown {what} precision {prec!r}; expected one of {', '.join(PRECISIONS)}"
                )
        if self.mode == "hspec":
            from qspec_jax.decoding import hspec  # noqa: PLC0415

            if self.tree is None:
                raise ValueError("mode 'hspec' needs a draft tree, e.g. tree=(4, 2, 1)")
            object.__setattr__(self, "tree", hspec.check_tree(self.tree))
            object.__setattr__(self, "levels", hspec.check_levels(self.levels))

    @property
    def speculative(self) -> bool:
        return self.mode in SPEC_MODES

    @property
    def draft_weights_precision(self) -> str:
        """The drafts' activation precision: W4A4 for QSpec, the verifier's for QuantSpec."""
        return self.verify_precision if self.mode == "quantspec" else self.draft_precision

    @property
    def tokens_per_step(self) -> int:
        """Cache positions one step may write: 1, gamma + 1 for QSpec, the tree for hspec."""
        if self.mode == "hspec":
            from qspec_jax.decoding.hspec import tokens_per_step  # noqa: PLC0415

            return tokens_per_step(self.tree, self.levels)
        return self.gamma + 1 if self.speculative else 1

    @property
    def main_precision(self) -> str:
        """The precision of prefill and of the output distribution."""
        if self.mode == "hspec":
            return self.levels[-1]
        return self.verify_precision if self.speculative else self.mode

    @property
    def out_len(self) -> int:
        """Output buffer length: a QSpec step may overshoot max_new_tokens by up to gamma."""
        return self.max_new_tokens + self.tokens_per_step


@struct.dataclass
class DecodeState:
    """Everything the loop carries.

    Attributes:
        cache: the shared KV cache; lengths[b] = verified positions of sequence b.
        last_token: int32 [batch], last committed token (its K/V not yet in the cache).
        out_tokens: int32 [batch, out_len], generated tokens (valid up to num_generated).
        num_generated: int32 [batch], tokens generated so far (EOS included).
        done: bool [batch], the sequence has finished.
        finish: int32 [batch], RUNNING / STOP (EOS) / LENGTH (max_new_tokens or cache full).
        key: PRNG key for sampling.
        steps: int32 [], loop iterations run (tokens for AR, draft+verify rounds for QSpec).
        draft_proposed: int32 [batch], draft tokens proposed while the sequence was active.
        draft_accepted: int32 [batch], draft tokens the verifier accepted.
        verify_steps: int32 [batch], steps in which the sequence was active.
        gamma_cur: int32 [], the draft length of the next QSpec step (== gamma unless adaptive).
        spec_steps: int32 [], steps that drafted (the rest were plain autoregressive steps).
        max_new: int32 [], this call's max_new_tokens (a traced value <= dc.max_new_tokens).
        tree_accepted: int32 [batch], hspec: drafted tokens the tree verifier accepted.
    """

    cache: KVCache
    last_token: jnp.ndarray
    out_tokens: jnp.ndarray
    num_generated: jnp.ndarray
    done: jnp.ndarray
    finish: jnp.ndarray
    key: jax.Array
    steps: jnp.ndarray
    draft_proposed: jnp.ndarray
    draft_accepted: jnp.ndarray
    verify_steps: jnp.ndarray
    gamma_cur: jnp.ndarray
    spec_steps: jnp.ndarray
    max_new: jnp.ndarray
    tree_accepted: jnp.ndarray


def _is_eos(tokens: jnp.ndarray, dc: DecodeConfig) -> jnp.ndarray:
    if not dc.eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(dc.eos_ids, jnp.int32))


def _update_finish(state: DecodeState, newly_stopped: jnp.ndarray, dc: DecodeConfig) -> DecodeState:
    """Marks sequences done: EOS seen, max_new_tokens reached, or no room for another step."""
    active = ~state.done
    full = state.cache.lengths + dc.tokens_per_step > state.cache.capacity
    at_max = state.num_generated >= state.max_new
    stop = active & newly_stopped
    length = active & ~newly_stopped & (at_max | full)
    finish = jnp.where(stop, STOP, jnp.where(length, LENGTH, state.finish))
    return state.replace(done=state.done | stop | length, finish=finish.astype(jnp.int32))


def prefill(
    params: Params,
    cache: KVCache,
    prompt_tokens: jnp.ndarray,
    prompt_lens: jnp.ndarray,
    key: jax.Array,
    cfg: LlamaConfig,
    qcfg: QuantConfig,
    dc: DecodeConfig,
    max_new_tokens: jnp.ndarray | None = None,
) -> DecodeState:
    """Runs the padded prompts [batch, T] through the model and draws the first token.

    Prompts are right-padded; entries past prompt_lens[b] are written but never marked valid,
    and later steps overwrite them. `max_new_tokens` (int32 [], optional) is the dynamic limit,
    capped at the static `dc.max_new_tokens`.
    """
    b, t = prompt_tokens.shape
    with jax.named_scope("prefill"):
        scratch = cache.prefill_cache(t)  # the float cache: itself, emptied
        logits, scratch = forward(
            params,
            prompt_tokens,
            scratch,
            cfg,
            qcfg,
            dc.main_precision,
            logits_index=prompt_lens - 1,
            impl=dispatch.prefill_impl(dc.impl),
        )  # [batch, V]
        cache = cache.finish_prefill(scratch, prompt_lens)
    key, sub = jax.random.split(key)
    first = sample(logits, sub, dc.sampling)  # [batch]
    out = jnp.zeros((b, dc.out_len), jnp.int32).at[:, 0].set(first)
    zeros = jnp.zeros((b,), jnp.int32)
    state = DecodeState(
        cache=cache,
        last_token=first,
        out_tokens=out,
        num_generated=jnp.ones((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        finish=zeros,
        key=key,
        steps=jnp.zeros((), jnp.int32),
        draft_proposed=zeros,
        draft_accepted=zeros,
        verify_steps=zeros,
        gamma_cur=jnp.asarray(max(dc.gamma, 1), jnp.int32),
        spec_steps=jnp.zeros((), jnp.int32),
        max_new=_limit(max_new_tokens, dc),
        tree_accepted=zeros,
    )
    return _update_finish(state, _is_eos(first, dc), dc)


def _limit(max_new_tokens: jnp.ndarray | None, dc: DecodeConfig) -> jnp.ndarray:
    """The dynamic max_new_tokens as int32 [], capped at the static buffer bound."""
    if max_new_tokens is None:
        return jnp.asarray(dc.max_new_tokens, jnp.int32)
    return jnp.minimum(jnp.asarray(max_new_tokens, jnp.int32), dc.max_new_tokens)


def _commit(
    state: DecodeState,
    emitted: jnp.ndarray,
    n_emit: jnp.ndarray,
    cache: KVCache,
    dc: DecodeConfig,
) -> DecodeState:
    """Appends up to n_emit[b] tokens of emitted [batch, w] to each active sequence.

    Truncates at the first EOS and at max_new_tokens, then sets the cache length so that every
    committed token but the last has its K/V in the cache.
    """
    b, w = emitted.shape
    active = ~state.done
    j = jnp.arange(w, dtype=jnp.int32)[None, :]  # [1, w]
    eos = _is_eos(emitted, dc) & (j < n_emit[:, None])  # [batch, w]
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
    state = state.replace(
        cache=cache.commit(new_lengths, flush=False),  # flushed at the next step's start
        last_token=jnp.where(active, last, state.last_token),
        out_tokens=out,
        num_generated=state.num_generated + count,
        steps=state.steps + 1,
        verify_steps=state.verify_steps + active.astype(jnp.int32),
    )
    return _update_finish(state, stopped & active, dc)


def ar_step(
    state: DecodeState,
    params: Params,
    cfg: LlamaConfig,
    qcfg: QuantConfig,
    dc: DecodeConfig,
    precision: str | None = None,
) -> DecodeState:
    """One autoregressive token per sequence in `precision` (default: the mode's precision)."""
    b = state.last_token.shape[0]
    with jax.named_scope("ar_step"):
        logits, cache = forward(
            params,
            state.last_token[:, None],
            state.cache,
            cfg,
            qcfg,
            precision or dc.main_precision,
            logits_index=jnp.zeros((b,), jnp.int32),
            impl=dc.impl,
        )  # [batch, V]
        key, sub = jax.random.split(state.key)
        nxt = sample(logits, sub, dc.sampling)  # [batch]
    state = state.replace(key=key)
    return _commit(state, nxt[:, None], jnp.ones((b,), jnp.int32), cache, dc)


def _draft(state: DecodeState, params, cfg, qcfg, dc: DecodeConfig):
    """Drafts gamma tokens autoregressively in the draft precision, writing their K/V.

    Returns (cache, drafts int32 [batch, gamma + 1] with drafts[:, 0] = last_token,
    q_probs float32 [batch, gamma, V] (None when greedy), key).
    """
    b = state.last_token.shape[0]
    gamma, sc = dc.gamma, dc.sampling
    base = state.cache.lengths
    drafts = jnp.zeros((b, gamma + 1), jnp.int32).at[:, 0].set(state.last_token)
    q_probs = None if sc.greedy else jnp.zeros((b, gamma, cfg.vocab_size), jnp.float32)

    def body(i, carry):
        cache, drafts, q_probs, key = carry
        tok = jax.lax.dynamic_slice_in_dim(drafts, i, 1, axis=1)  # [batch, 1]
        cache = cache.replace(lengths=base + i)
        logits, cache = forward(
            params,
            tok,
            cache,
            cfg,
            qcfg,
            dc.draft_weights_precision,
            logits_index=jnp.zeros((b,), jnp.int32),
            impl=dc.impl,
            kv_view="draft",
        )  # [batch, V]
        key, sub = jax.random.split(key)
        if sc.greedy:
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            q = filtered_probs(logits, sc)  # [batch, V]
            nxt = sample_from_probs(q, sub)
            q_probs = jax.lax.dynamic_update_slice_in_dim(q_probs, q[:, None], i, axis=1)
        drafts = jax.lax.dynamic_update_slice_in_dim(drafts, nxt[:, None], i + 1, axis=1)
        return cache, drafts, q_probs, key

    n_draft = state.gamma_cur if dc.adaptive_gamma else gamma
    with jax.named_scope("draft"):
        cache, drafts, q_probs, key = jax.lax.fori_loop(
            0, n_draft, body, (state.cache, drafts, q_probs, state.key)
        )
    return cache.replace(lengths=base), drafts, q_probs, key


def accept_greedy(drafts: jnp.ndarray, target_logits: jnp.ndarray, n_draft=None):
    """Exact greedy acceptance.

    Args:
        drafts: int32 [batch, gamma + 1]; drafts[:, 0] is the last committed token.
        target_logits: [batch, gamma + 1, V] verifier logits at those positions.
        n_draft: optional int32 [], only the first n_draft drafts are real (adaptive gamma).

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
    return n, _emit(drafts, n, jnp.take_along_axis(target, n[:, None], axis=1)[:, 0])


def _emit(drafts, n, extra):
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
        n_draft: optional int32 [], only the first n_draft drafts are real (adaptive gamma).

    Returns:
        (n_accepted [batch], emitted [batch, gamma + 1]).
    """
    b, g1, v = p_probs.shape
    gamma = g1 - 1
    d = drafts[:, 1:]  # [batch, gamma]
    p_d = jnp.take_along_axis(p_probs[:, :gamma], d[..., None], axis=-1)[..., 0]  # [batch, gamma]
    q_d = jnp.take_along_axis(q_probs, d[..., None], axis=-1)[..., 0]
    k_acc, k_res = jax.random.split(key)
    u = jax.random.uniform(k_acc, (b, gamma))
    accepted = u * q_d < p_d  # u < p/q without dividing by a zero q
    if n_draft is not None:
        accepted = accepted & (jnp.arange(gamma)[None, :] < n_draft)
    n = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=-1), axis=-1)  # [batch]
    residual = jnp.maximum(p_probs[:, :gamma] - q_probs, 0.0)  # [batch, gamma, V]
    residual = jnp.concatenate([residual, p_probs[:, gamma:]], axis=1)  # [batch, gamma + 1, V]
    row = jnp.take_along_axis(residual, n[:, None, None], axis=1)[:, 0]  # [batch, V]
    p_row = jnp.take_along_axis(p_probs, n[:, None, None], axis=1)[:, 0]
    row = jnp.where(row.sum(-1, keepdims=True) > 0, row, p_row)  # p == q exactly: draw from p
    extra = sample_from_probs(row, k_res)
    return n, _emit(drafts, n, extra)


def qspec_step(
    state: DecodeState, params: Params, cfg: LlamaConfig, qcfg: QuantConfig, dc: DecodeConfig
) -> DecodeState:
    """One QSpec round: draft gamma (draft precision), verify gamma + 1 (verify precision)."""
    cache, drafts, q_probs, key = _draft(state, params, cfg, qcfg, dc)
    with jax.named_scope("verify"):
        # Same positions as the drafts: the verifier's K/V overwrite the draft's.
        logits, cache = forward(
            params, drafts, cache, cfg, qcfg, dc.verify_precision, impl=dc.impl
        )  # [batch, gamma + 1, V]
    key, sub = jax.random.split(key)
    n_draft = state.gamma_cur if dc.adaptive_gamma else None
    with jax.named_scope("accept"):
        if dc.sampling.greedy:
            n, emitted = accept_greedy(drafts, logits, n_draft)
        else:
            p_probs = filtered_probs(logits, dc.sampling)
            n, emitted = accept_sampling(drafts, q_probs, p_probs, sub, n_draft)
    active = ~state.done
    act = active.astype(jnp.int32)
    gamma_cur = state.gamma_cur
    if dc.adaptive_gamma:
        # All drafts of every running sequence accepted: draft one more next time; fewer than
        # half accepted on average: one fewer.
        all_in = jnp.all(jnp.where(active, n == gamma_cur, True))
        rate = jnp.sum(n * act) / jnp.maximum(jnp.sum(act) * gamma_cur, 1)
        gamma_cur = jnp.where(
            all_in, gamma_cur + 1, jnp.where(rate < 0.5, gamma_cur - 1, gamma_cur)
        )
        gamma_cur = jnp.clip(gamma_cur, 1, dc.gamma).astype(jnp.int32)
    state = state.replace(
        key=key,
        draft_proposed=state.draft_proposed + state.gamma_cur * act,
        draft_accepted=state.draft_accepted + n * act,
        gamma_cur=gamma_cur,
        spec_steps=state.spec_steps + 1,
    )
    return _commit(state, emitted, n + 1, cache, dc)


def step(state: DecodeState, params: Params, cfg, qcfg, dc: DecodeConfig) -> DecodeState:
    """The one step function shared by the jitted loop and the Python loop."""
    # A quantized cache quantizes the chunks the last commit completed here, before this step's
    # forwards read it (see `HierKVCache.flush`); a float cache returns itself.
    state = _flushed(state)
    if dc.mode == "hspec":
        from qspec_jax.decoding.hspec import hspec_step  # noqa: PLC0415

        return hspec_step(state, params, cfg, qcfg, dc)
    if not dc.speculative:
        return ar_step(state, params, cfg, qcfg, dc)
    if dc.spec_max_active <= 0:
        return qspec_step(state, params, cfg, qcfg, dc)
    n_active = jnp.sum(~state.done)
    return jax.lax.cond(
        n_active > dc.spec_max_active,
        lambda s: ar_step(s, params, cfg, qcfg, dc, dc.verify_precision),
        lambda s: qspec_step(s, params, cfg, qcfg, dc),
        state,
    )


def cond(state: DecodeState) -> jnp.ndarray:
    return ~jnp.all(state.done)


@functools.partial(jax.jit, static_argnames=("cfg", "qcfg", "dc"), donate_argnames=("cache",))
def generate(
    params: Params,
    cache: KVCache,
    prompt_tokens: jnp.ndarray,
    prompt_lens: jnp.ndarray,
    key: jax.Array,
    max_new_tokens: jnp.ndarray | None = None,
    *,
    cfg: LlamaConfig,
    qcfg: QuantConfig,
    dc: DecodeConfig,
) -> DecodeState:
    """Prefill and the whole decode loop in one jitted call (the cache buffer is donated).

    Args:
        params: model weights.
        cache: a KV cache of the batch size; its contents are ignored and its buffer reused.
        prompt_tokens: int32 [batch, T] right-padded prompts (T a bucket size).
        prompt_lens: int32 [batch] real prompt lengths (>= 1).
        key: PRNG key.
        max_new_tokens: optional int32 [] limit, traced (not static): calls that differ only
            in it share one compiled program; capped at `dc.max_new_tokens`, which sizes the
            output buffer. None: `dc.max_new_tokens` is the limit.
        cfg, qcfg, dc: static configs.

    Returns:
        The final DecodeState (tokens in out_tokens[:, :num_generated]).
    """
    state = prefill(params, cache, prompt_tokens, prompt_lens, key, cfg, qcfg, dc, max_new_tokens)
    state = jax.lax.while_loop(cond, lambda s: step(s, params, cfg, qcfg, dc), state)
    return _flushed(state)  # the returned cache holds the format's invariants


def _flushed(state: DecodeState) -> DecodeState:
    """The state with its cache's last commit flushed (see `HierKVCache.flush`)."""
    return state.replace(cache=state.cache.flush())


_prefill_jit = jax.jit(prefill, static_argnames=("cfg", "qcfg", "dc"))
_step_jit = jax.jit(step, static_argnames=("cfg", "qcfg", "dc"))


def generate_python(
    params, cache, prompt_tokens, prompt_lens, key, max_new_tokens=None, *, cfg, qcfg, dc
):
    """The same generation as `generate`, stepping from Python (for debugging and tracing)."""
    state = _prefill_jit(
        params,
        cache,
        prompt_tokens,
        prompt_lens,
        key,
        cfg=cfg,
        qcfg=qcfg,
        dc=dc,
        max_new_tokens=max_new_tokens,
    )
    while bool(cond(state)):
        state = _step_jit(state, params, cfg=cfg, qcfg=qcfg, dc=dc)
    return _flushed(state)
