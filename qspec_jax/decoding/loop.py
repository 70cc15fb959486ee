"""Generation as one jitted `lax.while_loop`, for any decoding method.

The whole generation, prefill to last token, is one jitted function (`generate`): prefill the
padded prompts, then `lax.while_loop(cond, step, state)` with no host round trip per token. The
same `step` runs in a plain Python loop (`generate_python`) for debugging.

What a step does is the decoding method's (`qspec_jax.decoding.methods`: autoregressive, QSpec,
QuantSpec, SpecMQuant's hierarchy), carried in `DecodeConfig.method`; every method ends its step
in `qspec_jax.decoding.state.commit`, and the loop around it is the same for all of them.

The cache format is the cache object's own (any `qspec_jax.cache.protocol.CacheFormat`): the
loop calls `prefill_cache` / `finish_prefill` around the prompt, `flush` at the start of every
step, and the methods call `commit` after each step. Drafts read the cache's "draft" view, the
verifier and autoregressive steps its "target" view (the float cache has one view).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from qspec_jax.cache.kv_cache import KVCache
from qspec_jax.cache.protocol import put_row, take_row
from qspec_jax.config import LlamaConfig, QuantConfig
from qspec_jax.decoding.accept import accept_greedy, accept_sampling
from qspec_jax.decoding.config import DecodeConfig
from qspec_jax.decoding.methods import MAX_GAMMA, mode_names, speculative_modes
from qspec_jax.decoding.sampling import sample
from qspec_jax.decoding.state import (
    FINISH_NAMES,
    LENGTH,
    RUNNING,
    STOP,
    DecodeState,
    Logprobs,
    is_eos,
    update_finish,
)
from qspec_jax.model.llama import forward
from qspec_jax.model.params import Params

MODES = mode_names()
SPEC_MODES = speculative_modes()

__all__ = [
    "FINISH_NAMES",
    "LENGTH",
    "MAX_GAMMA",
    "MODES",
    "RUNNING",
    "SPEC_MODES",
    "STOP",
    "DecodeConfig",
    "DecodeState",
    "accept_greedy",
    "accept_sampling",
    "cond",
    "generate",
    "empty_state",
    "generate_python",
    "insert_prompt",
    "prefill",
    "prefill_jit",
    "run_steps",
    "step",
]


# XLA options of every decoding program. XLA may skip a bfloat16 (or float16) rounding the
# program asks for and keep the float32 value instead ("excess precision", on by default), and
# where it does depends on how it fuses each program: the autoregressive step and the verifier's
# forward then round differently (measured on the tiny preset in bfloat16: logprobs 2e-3 apart at
# the same position, and quantspec / qspec + hier output different from W4A16's). Off, every
# rounding happens where the program says, so verification rows equal autoregressive rows when
# every op is row independent (docs/exactness.md). No effect on float32 programs.
EXACT_ROUNDING = {"xla_allow_excess_precision": False}


def _decode_jit(fn=None, *, donate: str | None = None):
    """`jax.jit` of a decoding program: configs static, `donate` donated, EXACT_ROUNDING."""
    if fn is None:
        return functools.partial(_decode_jit, donate=donate)
    return jax.jit(
        fn,
        static_argnames=("cfg", "qcfg", "dc"),
        donate_argnames=() if donate is None else (donate,),
        compiler_options=EXACT_ROUNDING,
    )


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
    stop_ids: jnp.ndarray | None = None,
) -> DecodeState:
    """Runs the padded prompts [batch, T] through the model and draws the first token.

    Prompts are right-padded; entries past prompt_lens[b] are written but never marked valid,
    and later steps overwrite them. `max_new_tokens` (int32 [] or [batch], optional) is the
    dynamic limit, capped at the static `dc.max_new_tokens`; `stop_ids` (int32 [batch, S],
    -1 pads, optional) are each sequence's own stop tokens besides `dc.eos_ids`.
    """
    t = prompt_tokens.shape[1]
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
        # a method's own state beside the cache (a draft model's cache) prefills here
        cache = dc.method.after_prefill(cache, params, prompt_tokens, prompt_lens, cfg, qcfg, dc)
    key, sub = jax.random.split(key)
    first = sample(logits, sub, dc.sampling)  # [batch]
    state = initial_state(cache, first, key, dc, max_new_tokens, stop_ids)
    if dc.logprobs:
        at0 = jnp.zeros((first.shape[0], 1), jnp.int32)  # [batch, 1]
        state = state.replace(logprobs=state.logprobs.write(logits[:, None], first[:, None], at0))
    return update_finish(state, is_eos(first, dc.eos_ids, state.stop_ids), dc)


def initial_state(
    cache,
    first: jnp.ndarray,
    key: jax.Array,
    dc: DecodeConfig,
    max_new_tokens=None,
    stop_ids=None,
):
    """The state right after prefill: `first` int32 [batch] is each sequence's first token."""
    b = first.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)
    if stop_ids is None:
        stop_ids = jnp.zeros((b, 0), jnp.int32)
    return DecodeState(
        cache=cache,
        last_token=first,
        out_tokens=jnp.zeros((b, dc.out_len), jnp.int32).at[:, 0].set(first),
        num_generated=jnp.ones((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        finish=zeros,
        key=key,
        steps=jnp.zeros((), jnp.int32),
        verify_steps=zeros,
        max_new=jnp.broadcast_to(_limit(max_new_tokens, dc), (b,)),
        stop_ids=jnp.asarray(stop_ids, jnp.int32),
        carry=dc.method.init_carry(b),
        logprobs=Logprobs.init(b, dc.out_len, dc.logprobs) if dc.logprobs else None,
    )


def _limit(max_new_tokens: jnp.ndarray | None, dc: DecodeConfig) -> jnp.ndarray:
    """The dynamic max_new_tokens as int32 [] or [batch], capped at the static buffer bound."""
    if max_new_tokens is None:
        return jnp.asarray(dc.max_new_tokens, jnp.int32)
    return jnp.minimum(jnp.asarray(max_new_tokens, jnp.int32), dc.max_new_tokens)


def step(state: DecodeState, params: Params, cfg, qcfg, dc: DecodeConfig) -> DecodeState:
    """The one step function shared by the jitted loop and the Python loop."""
    # A quantized cache quantizes the chunks the last commit completed here, before this step's
    # forwards read it (see `HierKVCache.flush`); a float cache returns itself.
    state = _flushed(state)
    with jax.named_scope(dc.method.name):
        return dc.method.step(state, params, cfg, qcfg, dc)


def cond(state: DecodeState) -> jnp.ndarray:
    return ~jnp.all(state.done)


@_decode_jit(donate="cache")
def generate(
    params: Params,
    cache: KVCache,
    prompt_tokens: jnp.ndarray,
    prompt_lens: jnp.ndarray,
    key: jax.Array,
    max_new_tokens: jnp.ndarray | None = None,
    stop_ids: jnp.ndarray | None = None,
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
        max_new_tokens: optional int32 [] or [batch] limit, traced (not static): calls that
            differ only in it share one compiled program; capped at `dc.max_new_tokens`, which
            sizes the output buffer. None: `dc.max_new_tokens` is the limit.
        stop_ids: optional int32 [batch, S] per-sequence stop token ids (-1 pads), traced.
        cfg, qcfg, dc: static configs.

    Returns:
        The final DecodeState (tokens in out_tokens[:, :num_generated]).
    """
    state = prefill(
        params, cache, prompt_tokens, prompt_lens, key, cfg, qcfg, dc, max_new_tokens, stop_ids
    )
    state = jax.lax.while_loop(cond, lambda s: step(s, params, cfg, qcfg, dc), state)
    return _flushed(state)  # the returned cache holds the format's invariants


@_decode_jit(donate="cache")
def prefill_jit(
    params, cache, prompt_tokens, prompt_lens, key, max_new_tokens, stop_ids, *, cfg, qcfg, dc
) -> DecodeState:
    """`prefill` compiled on its own (the first half of a chunked generation)."""
    return prefill(
        params, cache, prompt_tokens, prompt_lens, key, cfg, qcfg, dc, max_new_tokens, stop_ids
    )


@_decode_jit(donate="state")
def run_steps(
    state: DecodeState,
    params: Params,
    max_steps: jnp.ndarray,
    until_a_row_ends: jnp.ndarray | None = None,
    *,
    cfg,
    qcfg,
    dc,
) -> DecodeState:
    """Steps until every sequence is done or `max_steps` (int32 [], traced) more steps ran.

    The chunk of a chunked generation (streaming): the state is carried from one call to the
    next, so running chunks until done gives exactly `generate`'s result, and one compiled
    program serves every chunk length. With `until_a_row_ends` (bool [], traced) true, the
    chunk also ends after the step in which a sequence running at its start finished
    (continuous batching refills that row at once instead of idling it to the chunk's end).
    """
    until = state.steps + max_steps
    running = ~state.done  # [batch]

    def more(s):
        go = cond(s) & (s.steps < until)
        if until_a_row_ends is not None:
            go &= ~(until_a_row_ends & jnp.any(s.done & running))
        return go

    return jax.lax.while_loop(more, lambda s: step(s, params, cfg, qcfg, dc), state)


# jitted so that every array of the state is its own buffer (the loop donates them); the cache is
# not donated: a freshly made cache may hold one zero buffer in several fields
@functools.partial(jax.jit, static_argnames=("dc", "stop_width"))
def empty_state(cache, key: jax.Array, dc: DecodeConfig, stop_width: int = 0) -> DecodeState:
    """A state of `cache`'s batch with every row finished: rows wait for `insert_prompt`.

    `stop_width` is S of the per-sequence stop ids [batch, S] the inserted prompts bring.
    """
    b = cache.lengths.shape[0]
    stop_ids = jnp.full((b, stop_width), -1, jnp.int32)
    state = initial_state(cache, jnp.zeros((b,), jnp.int32), key, dc, None, stop_ids)
    return state.replace(done=jnp.ones((b,), bool), finish=jnp.full((b,), LENGTH, jnp.int32))


def _put_rows(big, one, row):
    """Per-sequence arrays of `one` (batch 1) written into row `row` of `big`."""
    return jax.tree.map(
        lambda x, y: (
            jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), row, axis=0) if x.ndim else x
        ),  # scalars (a method's step counters) are the batch's
        big,
        one,
    )


@_decode_jit(donate="state")
def insert_prompt(
    state: DecodeState,
    params: Params,
    row: jnp.ndarray,
    prompt_tokens: jnp.ndarray,
    prompt_len: jnp.ndarray,
    key: jax.Array,
    max_new_tokens: jnp.ndarray,
    stop_ids: jnp.ndarray,
    *,
    cfg,
    qcfg,
    dc,
) -> DecodeState:
    """Prefills one prompt into row `row` of a running batch (continuous batching).

    The prompt (int32 [1, T], its length [1], limit [1], stop ids [1, S]) runs exactly as it
    would alone: `prefill` on the batch-1 cache taken from that row; then the row's cache and
    state are replaced. The other rows are untouched, and the batch's step counters go on.
    """
    one_cache = take_row(state.cache, row)
    one = prefill(
        params, one_cache, prompt_tokens, prompt_len, key, cfg, qcfg, dc, max_new_tokens, stop_ids
    )
    out = state.replace(
        cache=put_row(state.cache, row, one.cache),
        last_token=_put_rows(state.last_token, one.last_token, row),
        out_tokens=_put_rows(state.out_tokens, one.out_tokens, row),
        num_generated=_put_rows(state.num_generated, one.num_generated, row),
        done=_put_rows(state.done, one.done, row),
        finish=_put_rows(state.finish, one.finish, row),
        verify_steps=_put_rows(state.verify_steps, one.verify_steps, row),
        max_new=_put_rows(state.max_new, one.max_new, row),
        stop_ids=_put_rows(state.stop_ids, one.stop_ids, row),
        carry=_put_rows(state.carry, one.carry, row),
    )
    if dc.logprobs:
        out = out.replace(logprobs=_put_rows(state.logprobs, one.logprobs, row))
    return out


def _flushed(state: DecodeState) -> DecodeState:
    """The state with its cache's last commit flushed (see `HierKVCache.flush`)."""
    return state.replace(cache=state.cache.flush())


_prefill_jit = _decode_jit(prefill)
_step_jit = _decode_jit(step)


def generate_python(
    params,
    cache,
    prompt_tokens,
    prompt_lens,
    key,
    max_new_tokens=None,
    stop_ids=None,
    *,
    cfg,
    qcfg,
    dc,
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
        stop_ids=stop_ids,
    )
    while bool(cond(state)):
        state = _step_jit(state, params, cfg=cfg, qcfg=qcfg, dc=dc)
    return _flushed(state)
