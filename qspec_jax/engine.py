"""The public API: `load(...)` returns an `Engine` with `.generate` and `.logits`.

The engine owns the weights (one copy), the tokenizer and a cache of compiled generation
functions keyed by static shapes (batch bucket, prompt bucket, cache capacity, decode config), so
repeated calls with prompts in the same bucket never recompile. `max_new_tokens` is bucketed too
(the output buffer and cache are sized for the next power of two, the limit itself is a traced
argument), and JAX's persistent compilation cache (`qspec_jax.disk_cache`) keeps the compiled
programs across processes.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import json
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch
from qspec_jax import disk_cache, exported
from qspec_jax.cache.kv_cache import KVCache
from qspec_jax.cache.protocol import make_cache
from qspec_jax.config import PRECISIONS, PRESETS, LlamaConfig, QuantConfig
from qspec_jax.decoding import loop
from qspec_jax.decoding.config import DecodeConfig
from qspec_jax.decoding.loop import EXACT_ROUNDING, generate
from qspec_jax.decoding.methods import DecodingMethod, MethodError, mode_names, resolve
from qspec_jax.decoding.sampling import SamplingConfig
from qspec_jax.decoding.state import FINISH_NAMES, STOP
from qspec_jax.model.llama import forward
from qspec_jax.model.params import (
    Params,
    TwoWeights,
    WithDraftModel,
    attach_q8_head,
    init_params,
    map_weight_sets,
    truncate_layers,
    unstack_layers,
    weight_bytes,
    weight_kinds,
)

QUANT_METHODS = ("none", "gguf", "rtn", "gptq", "quarot-rtn", "quarot-gptq")
EMBEDDED_MODEL = "smollm2-135m"


class UsageError(ValueError):
    """A request the engine cannot serve; the message is one sentence saying what to do."""


@dataclasses.dataclass
class GenerationResult:
    """What `Engine.generate` returns.

    Attributes:
        texts: decoded generations (special tokens skipped), one per prompt.
        tokens: generated token ids per prompt (EOS included when it ended the sequence).
        finish_reasons: "stop" (EOS) or "length" (max_new_tokens or cache capacity) per prompt.
        stats: tokens generated, wall seconds (compile excluded), tokens per second, compile
            seconds and where the program came from (see `Engine.generate`), and the decoding
            method's own statistics (`DecodingMethod.stats`: acceptance for QSpec, ...).
        logprobs: with `logprobs=k`, per prompt one dict per generated token:
            {"token_id", "logprob", "top": [[id, logprob], ...k]} under the verifier's
            distribution; else None.
    """

    texts: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str]
    stats: dict[str, Any]
    logprobs: list[list[dict[str, Any]]] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class StreamEvent:
    """One piece of a streamed generation (`Engine.stream`).

    Attributes:
        index: which prompt.
        token_ids: the tokens generated since this prompt's previous event.
        text: the text they add (held back while it could still be part of a stop string or
            an incomplete character; concatenated deltas equal the final text).
        finish_reason: None, or "stop" / "length" on the prompt's last event.
        logprobs: per new token (when requested): {"token_id", "logprob", "top": [[id, lp]]}.
    """

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None


@dataclasses.dataclass
class _Parsed:
    """A request's checked arguments, before its arrays are laid out."""

    method: DecodingMethod
    dc: DecodeConfig
    kv_cache: str
    token_lists: list[list[int]]
    limits: list[int]
    stops: list[list[str]]
    stop_ids: list[list[int]]
    s_width: int  # the stop-token-id array's width (a bucket; 0 without stop ids)


@dataclasses.dataclass
class _Request:
    method: DecodingMethod
    dc: DecodeConfig
    kv_cache: str
    token_lists: list[list[int]]
    n: int
    toks: Any
    lens: Any
    cache: Any
    key: Any
    limits: Any
    stop_ids: Any
    stops: list[list[str]]


@dataclasses.dataclass
class _HostState:
    """The final state's arrays on the host."""

    out_tokens: np.ndarray
    num_generated: np.ndarray
    finish: np.ndarray
    steps: np.ndarray
    verify_steps: np.ndarray
    carry: Any
    lengths: np.ndarray
    logprobs: Any
    cache_like: Any

    @classmethod
    def fetch(cls, state) -> _HostState:
        got = jax.device_get(
            (
                state.out_tokens,
                state.num_generated,
                state.finish,
                state.steps,
                state.verify_steps,
                state.carry,
                state.cache.lengths,
                state.logprobs,
            )
        )
        return cls(*got, cache_like=state.cache)


class _TextTracker:
    """One sequence's tokens and text as chunks arrive: stop strings and text deltas."""

    def __init__(self, engine: Engine, stops: list[str]):
        self.engine, self.stops = engine, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.tokens: list[int] = []
        self.text = ""  # the text so far (final once the sequence finished)
        self.sent = 0  # characters of text already yielded
        self.reason: str | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def update(self, tokens: list[int], final: bool) -> tuple[list[int], str, bool]:
        """Takes the sequence's tokens so far; returns (new ids, text delta, stopped)."""
        start = len(self.tokens)
        text = self.engine.decode(tokens)
        stopped = False
        hit = [(text.find(s), s) for s in self.stops if s and s in text]
        if hit:
            pos = min(p for p, _ in hit)
            # the first token whose text completes a stop string ends the sequence
            for k in range(start + 1, len(tokens) + 1):
                if any(s in self.engine.decode(tokens[:k]) for s in self.stops if s):
                    tokens = tokens[:k]
                    break
            text, stopped = text[:pos], True
        self.tokens, self.text = list(tokens), text
        end = len(text)
        if not (final or stopped):
            end -= self.hold  # could be the start of a stop string
            while end > self.sent and text[end - 1] == "\ufffd":  # an incomplete character
                end -= 1
        delta = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return self.tokens[start:], delta, stopped


def _per_prompt(value, n: int, what: str) -> list:
    """One value per prompt from a scalar or a sequence of n values."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise UsageError(f"{what} has {len(value)} values for {n} prompts: give one or {n}")
        return list(value)
    return [value] * n


def _limits(max_new_tokens, n: int) -> list[int]:
    """max_new_tokens per prompt (one int or one per prompt), each a positive integer."""
    limits = _per_prompt(max_new_tokens, n, "max_new_tokens")
    for i, v in enumerate(limits):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise UsageError(
                f"max_new_tokens must be a positive integer, got {v!r}"
                + (f" for prompt {i}" if not isinstance(max_new_tokens, int) else "")
            )
    return [int(v) for v in limits]


def _stop_lists(stop, n: int) -> list[list[str]]:
    """Stop strings per prompt from None, a string, a list of strings or a list of lists."""
    if stop is None:
        return [[] for _ in range(n)]
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop)
    if stop and all(isinstance(s, (list, tuple)) for s in stop):
        per = _per_prompt(stop, n, "stop")
    elif all(isinstance(s, str) for s in stop):
        per = [stop] * n
    else:
        raise UsageError("stop must be a string, a list of strings, or one list per prompt")
    out = []
    for i, lst in enumerate(per):
        if not all(isinstance(s, str) and s for s in lst):
            raise UsageError(f"stop strings for prompt {i} must be non-empty strings")
        out.append(list(lst))
    return out


def _stop_id_lists(ids, n: int, vocab: int) -> list[list[int]]:
    """Stop token ids per prompt from None, a list of ints or a list of lists."""
    if ids is None:
        return [[] for _ in range(n)]
    ids = list(ids)
    per = (
        _per_prompt(ids, n, "stop_token_ids")
        if ids and all(isinstance(x, (list, tuple)) for x in ids)
        else [ids] * n
    )
    out = []
    for i, lst in enumerate(per):
        lst = list(lst)
        bad = [t for t in lst if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab]
        if bad:
            raise UsageError(
                f"stop_token_ids for prompt {i} has {bad[0]!r}, not a token id in [0, {vocab})"
            )
        out.append([int(t) for t in lst])
    return out


def _row_of(carry, r: int):
    """Row r of a host carry's per-sequence arrays (scalars dropped: they are the batch's)."""
    return jax.tree.map(lambda x: x[r] if np.ndim(x) else None, carry)


def _stack_rows(rows: list, final_carry):
    """A carry of per-prompt values (one row per prompt, in order) from harvested rows; the
    batch's scalar counters come from the final carry."""
    if not rows:
        return final_carry
    leaves, treedef = jax.tree.flatten(final_carry)
    per = [jax.tree.flatten(r, is_leaf=lambda x: x is None)[0] for r in rows]
    out = []
    for j, leaf in enumerate(leaves):
        if np.ndim(leaf):
            out.append(np.stack([p[j] for p in per]))
        else:
            out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def _token_logprobs(lp, row: int, start: int, token_ids: list[int]) -> list[dict[str, Any]]:
    """Host logprob buffers -> one dict per generated token of `row` from index `start`."""
    return [
        {
            "token_id": int(tok),
            "logprob": float(lp.chosen[row, j]),
            "top": [[int(t), float(v)] for t, v in zip(lp.top_ids[row, j], lp.top[row, j])],
        }
        for j, tok in enumerate(token_ids, start)
    ]


MIN_NEW_TOKENS_BUCKET = 16
# Generation programs an Engine holds at once (`Engine.max_programs`), and the process's memory
# mappings past which it drops all but the newest (Linux's vm.max_map_count is 65530 by default).
DEFAULT_MAX_PROGRAMS = 32
MAP_BUDGET = 30_000


def memory_maps() -> int:
    """The process's memory mappings (Linux /proc/self/maps lines; 0 elsewhere)."""
    try:
        with open("/proc/self/maps", "rb") as fh:
            return fh.read().count(b"\n")
    except OSError:  # not Linux: no such limit to guard
        return 0


def _bucket(n: int, minimum: int) -> int:
    """Smallest power of two >= max(n, minimum)."""
    b = minimum
    while b < n:
        b *= 2
    return b


class Engine:
    """A loaded model: config, one copy of the weights, tokenizer, compiled generation functions.

    Attributes:
        config: the model shape.
        qconfig: how the weights were quantized (method "none" for float weights).
        params: the weights (float, or packed int4 QuantizedWeights for the linears).
        tokenizer: a transformers tokenizer, or None for random-init presets.
        compile_cache_dir: JAX's persistent compilation cache directory in use, or None.
        load_info: how `load` produced the weights: quant_cache ("off", "hit", "written" after
            quantizing, "invalid" when a cached checkpoint failed validation and was
            replaced, "miss" when writing failed), quant_cache_path, load_s, quantize_s.
    """

    def __init__(
        self,
        config: LlamaConfig,
        params: Params,
        qconfig: QuantConfig,
        tokenizer=None,
        source: str = "",
        unroll_layers: bool | None = None,
        mesh=None,
        compile_cache: bool = True,
        prepared: bool = False,  # params already unstacked / given the int8 head / sharded
    ):
        # Before anything compiles: a second process loads the same programs from disk.
        self.compile_cache_dir = disk_cache.enable_compilation_cache() if compile_cache else None
        self.config = config
        if unroll_layers is None:  # per-layer arrays run ~2x faster on XLA:CPU (no slice copies)
            unroll_layers = jax.default_backend() == "cpu"
        if unroll_layers and not prepared:
            params = map_weight_sets(unstack_layers, params)
        # The GGUF's Q8_0 head as int8 codes (same weights): the CPU head kernel reads 28 MB a
        # token instead of the float32 head's 113 MB (`qspec_jax.model.params.attach_q8_head`).
        if not prepared:
            params = map_weight_sets(attach_q8_head, params)
        self.mesh = mesh
        if mesh is not None and not prepared:  # tensor-parallel over "model", data over "data"
            from qspec_jax.sharding import shard_params  # noqa: PLC0415

            params = map_weight_sets(lambda p: shard_params(p, mesh, config), params)
        self.params = params
        # "float", "int4" or both (a float target with an int4 draft copy: `TwoWeights`)
        self.weight_kinds = weight_kinds(params)
        self.qconfig = qconfig
        self.tokenizer = tokenizer
        self.source = source
        self.load_info: dict[str, Any] = {}
        # (shapes, capacity, DecodeConfig) -> executable, least recently used first; at most
        # `max_programs` are held (see `_hold`)
        self._compiled: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self.max_programs = DEFAULT_MAX_PROGRAMS
        # Kernel implementation for every op (`pallas_kernels.registry` decides): None = auto (Pallas
        # on GPU, the CPU kernels on CPU, else XLA); "xla" / "cpu" / ... to compare paths.
        self.impl: str | None = None
        self._logits_fns: dict[tuple, Any] = {}

    # ------------------------------------------------------------------ properties
    @property
    def modes(self) -> tuple[str, ...]:
        """The mode shorthands this engine's weights support (registry order)."""
        out = []
        for mode in mode_names():
            try:
                resolve(mode).check_weights(self.weight_kinds)
            except MethodError:
                continue
            out.append(mode)
        return tuple(out)

    @property
    def weight_bytes(self) -> int:
        """Bytes of every weight array held (both sets of a `TwoWeights`)."""
        return weight_bytes(self.params)

    @property
    def weight_bytes_by_set(self) -> dict[str, int]:
        """{"target": float bytes, "draft": int4 bytes} with two weight sets, else {"weights"};
        with a draft model also "draft_model": the bytes of its arrays the target does not
        share (0 for a truncated self-draft with per-layer arrays)."""
        if isinstance(self.params, WithDraftModel):  # the draft model: bytes it does not share
            own = weight_bytes(self.params) - weight_bytes(self.params.target)
            return {**_bytes_by_set(self.params.target), "draft_model": own}
        return _bytes_by_set(self.params)

    def check_mode(self, mode: str) -> None:
        """UsageError (one sentence) unless these weights serve the mode shorthand."""
        self.method(mode)

    # ------------------------------------------------------------------ tokens
    def encode(self, prompts: Sequence[str | Sequence[int]], chat: bool = True) -> list[list[int]]:
        """Prompt strings (chat template applied when chat=True) or token-id lists -> id lists."""
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise UsageError(
                        "this model has no tokenizer (a random-init preset or a directory without tokenizer files): pass token-id lists"
                    )
                from qspec_jax.loading.tokenizer import encode_prompts  # noqa: PLC0415

                ids = encode_prompts(self.tokenizer, [p], chat=chat)[0]
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise UsageError(f"prompt {i} is empty: give at least one token")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise UsageError(
                    f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {self.config.vocab_size})"
                )
            out.append(ids)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(t) for t in ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ generation
    def method(self, method: DecodingMethod | str = "fp", **options) -> DecodingMethod:
        """The decoding method for a request: an object, or a mode shorthand with its options.

        Raises:
            UsageError: an unknown mode, an option that does not apply, a bad setting, or a
                method these weights cannot serve (one sentence each).
        """
        try:
            m = resolve(method, **options)
        except ValueError as e:  # MethodError, or a tree / levels string that does not parse
            raise UsageError(str(e)) from None
        try:  # the weights here; the cache format per request (`_check_kv_cache`)
            m.check_weights(self.weight_kinds)
        except MethodError as e:
            raise UsageError(str(e)) from None
        return m

    def decode_config(
        self,
        method: DecodingMethod,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        ignore_eos: bool = False,
    ) -> DecodeConfig:
        """The static `DecodeConfig` the engine compiles for a request (UsageError if bad)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        try:
            sc = SamplingConfig(
                temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        return DecodeConfig(
            method,
            # the static buffer bound; the real limit is passed to the program as an array
            max_new_tokens=_bucket(max_new_tokens, MIN_NEW_TOKENS_BUCKET),
            sampling=sc,
            eos_ids=() if ignore_eos else tuple(self.config.eos_token_ids),
            impl=self.impl,
        )

    def _check_kv_cache(self, method: DecodingMethod, kv_cache, kv_residual) -> str:
        """The cache format for a request; UsageError (one sentence) for a bad combination."""
        if kv_cache is None:
            kv_cache = method.default_kv_cache
        try:
            method.check(weights=self.weight_kinds, kv_cache=kv_cache, kv_residual=kv_residual)
        except MethodError as e:
            raise UsageError(str(e)) from None
        return kv_cache

    def _plan(self, token_lists: list[list[int]], dc: DecodeConfig):
        """Static shapes for a request: (batch bucket, prompt bucket, cache capacity)."""
        longest = max(len(t) for t in token_lists)
        t_bucket = _bucket(longest, 16)
        capacity = t_bucket + dc.max_new_tokens + dc.tokens_per_step
        capacity = -(-capacity // 64) * 64
        max_pos = self.config.max_position_embeddings
        if longest + 1 > max_pos:
            raise UsageError(
                f"a prompt of {longest} tokens does not fit the model's context of {max_pos}"
            )
        capacity = min(capacity, max(max_pos, t_bucket))
        try:  # h1-loading: sliding-window models refuse what passes the window
            self.config.check_context(longest + dc.max_new_tokens, "generate")
        except ValueError as e:
            raise UsageError(str(e)) from None
        batch = _bucket(len(token_lists), 1)
        if self.mesh is not None:  # the batch must split evenly over the data axis
            d = self.mesh.shape["data"]
            batch = -(-batch // d) * d
        return batch, t_bucket, capacity

    def _hold(self, ckey, fn) -> None:
        """Keeps a compiled program, evicting the least recently used past `max_programs`.

        Every program XLA:CPU compiles keeps its machine code in its own memory mappings, and
        Linux refuses mappings past vm.max_map_count (65530 by default), where XLA's compiler
        crashes. So a long-lived process that compiles many shapes must let programs go: an
        evicted program is dropped with JAX's own jit caches (`jax.clear_caches`), and so are
        the least recently used ones while the process holds more than `MAP_BUDGET` mappings.
        """
        self._compiled[ckey] = fn
        evicted = False
        while len(self._compiled) > max(self.max_programs, 1):
            self._compiled.popitem(last=False)
            evicted = True
        if memory_maps() > MAP_BUDGET:
            while len(self._compiled) > 1:
                self._compiled.popitem(last=False)
            self._logits_fns.clear()
            evicted = True
        if evicted:
            jax.clear_caches()
            gc.collect()

    @property
    def num_compiled(self) -> int:
        """How many generation programs this engine has compiled (or loaded from disk)."""
        return len(self._compiled)

    def compiled_generate(
        self, cache: KVCache, toks, lens, key, limit, dc: DecodeConfig, stop_ids=None
    ):
        """The AOT-compiled generation function for these arguments' shapes and shardings.

        With the compilation cache on, the program's trace is kept on disk too
        (`qspec_jax.exported`): a later process deserializes it instead of tracing and
        lowering the decoding loop.

        Returns:
            (executable, compile_s, source, trace): compile_s is the wall time of tracing (or
            reading the exported trace), lowering and compiling in this call (0.0 when this
            engine already held the program); source is "memory" (held by this engine), "disk"
            (JAX's persistent cache supplied the executable) or "compiled" (XLA compiled it
            now); trace is "exported-read" (deserialized, not traced), "exported-written"
            (traced and exported now), "exported-unwritten" or "traced" (traced as usual: the
            cache is off, the program spans several devices, or it could not be exported).
        """
        if stop_ids is None:
            stop_ids = jnp.full((toks.shape[0], 0), -1, jnp.int32)
        ckey = (
            toks.shape,
            jnp.shape(limit),
            stop_ids.shape,
            cache.capacity,
            jax.tree_util.tree_structure(cache),
            jax.tree_util.tree_structure(self.params),  # e.g. with or without the int8 head
            dc,
        )
        if ckey in self._compiled:
            self._compiled.move_to_end(ckey)
            fn, trace = self._compiled[ckey]
            return fn, 0.0, "memory", trace
        hits = disk_cache.persistent_cache_hits()
        t0 = time.perf_counter()
        args = (self.params, cache, toks, lens, key, limit, stop_ids)
        static = dict(cfg=self.config, qcfg=self.qconfig, dc=dc)
        fn = None
        if self.compile_cache_dir is not None:  # the trace itself from disk (qspec_jax.exported)
            fn = exported.compile_program(
                generate.__wrapped__, args, static, name="generate", donate=(1,),
                compiler_options=EXACT_ROUNDING,
            )  # fmt: skip
        trace = "traced" if fn is None else fn.source
        if fn is None:
            fn = generate.lower(*args, **static).compile()
        compile_s = time.perf_counter() - t0
        self._hold(ckey, (fn, trace))
        source = "disk" if disk_cache.persistent_cache_hits() > hits else "compiled"
        return fn, compile_s, source, trace

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        method: DecodingMethod | str = "fp",
        max_new_tokens: int | Sequence[int] = 64,
        temperature: float = 0.0,
        seed: int = 0,
        chat: bool = True,
        *,
        mode: str | None = None,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        stop_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        logprobs: int = 0,
        ignore_eos: bool = False,
        kv_cache: str | None = None,
        kv_residual: int = 128,
        chunk_steps: int = 16,
        **method_options,
    ) -> GenerationResult:
        """Generates continuations for a batch of prompts.

        Args:
            prompts: strings (tokenized, with the chat template when chat=True) or token-id lists.
            method: the decoding method (`qspec_jax.decoding.methods`): an object such as
                `QSpec(gamma=3, draft="w4a8")`, `QuantSpec(gamma=5)`, `HSpec(tree=(4, 2, 1))`,
                `AR("w4a16")`, or a mode string ("fp", "w4a16", "w4a4", "w4a8", "qspec",
                "quantspec", "hspec") whose options come as keywords (gamma, draft,
                adaptive_gamma, spec_max_active, tree, levels; see each method's docstring).
            max_new_tokens: the most tokens generated, one int for every prompt or one per
                prompt (a traced array: no recompilation per value).
            temperature: 0 for greedy; top_k / top_p filter the sampled distribution. These and
                `seed` are per call (the sampling settings are static in the program).
            seed: PRNG seed.
            chat: apply the tokenizer's chat template to string prompts.
            mode: the mode string, as a keyword (the same as passing it as `method`).
            stop: stop strings, for every prompt (a string or a list) or per prompt (a list of
                lists). A sequence ends at the first one with finish reason "stop"; its text
                ends before it and its tokens at the token that completes it, also when the
                string spans tokens or falls inside a verified speculative block. Stop strings
                are matched on the host between chunks of `chunk_steps` steps.
            stop_token_ids: token ids that end a sequence like EOS (included in its tokens),
                for every prompt (a list of ints) or per prompt (a list of lists); traced.
            logprobs: 0, or return each generated token's log-probability and the top
                `logprobs` alternatives, always under the verifier's (output) distribution,
                never the draft's.
            ignore_eos: generate exactly max_new_tokens (for benchmarks).
            kv_cache: "float" (a dense cache in the activation dtype) or "hier" (QuantSpec's
                int4/int8 hierarchical cache: drafts read int4 KV, the verifier and
                autoregressive steps int8 KV, plus a float buffer); default: the method's
                (`QuantSpec` needs and defaults to "hier", the others "float").
            kv_residual: R of the hierarchical cache (float buffer of up to 2R tokens); a
                speculative step needs gamma <= R.
            chunk_steps: with stop strings, steps per device call between host checks.
            **method_options: options of a mode string (e.g. gamma=3, draft="w4a8").

        Returns:
            A GenerationResult. stats["compile_s"] is the wall time this call spent tracing,
            lowering and compiling its program (0.0 when the engine already held it);
            stats["compile_source"] says where the program came from: "memory", "disk"
            (JAX's persistent compilation cache) or "compiled"; stats["program_trace"]
            whether it was traced ("traced", "exported-written") or read as an exported
            program ("exported-read"), see `compiled_generate`.
        """
        req = self._request(
            prompts, method, mode, max_new_tokens, temperature, seed, chat, top_k, top_p,
            stop, stop_token_ids, logprobs, ignore_eos, kv_cache, kv_residual, method_options,
        )  # fmt: skip
        if any(req.stops):
            return self._finish_chunked(req, chunk_steps)
        fn, compile_s, source, trace = self.compiled_generate(
            req.cache, req.toks, req.lens, req.key, req.limits, req.dc, req.stop_ids
        )
        jax.block_until_ready((req.cache, req.toks, req.lens))
        t0 = time.perf_counter()
        state = fn(self.params, req.cache, req.toks, req.lens, req.key, req.limits, req.stop_ids)
        host = _HostState.fetch(state)
        wall = time.perf_counter() - t0
        result = self._result(req, host, wall, compile_s, source)
        result.stats["program_trace"] = trace
        return result

    def stream(
        self,
        prompts: Sequence[str | Sequence[int]],
        method: DecodingMethod | str = "fp",
        max_new_tokens: int | Sequence[int] = 64,
        temperature: float = 0.0,
        seed: int = 0,
        chat: bool = True,
        *,
        mode: str | None = None,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        stop_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        logprobs: int = 0,
        ignore_eos: bool = False,
        kv_cache: str | None = None,
        kv_residual: int = 128,
        chunk_steps: int = 4,
        **method_options,
    ) -> Iterator[StreamEvent]:
        """Generates like `generate`, yielding `StreamEvent`s while the generation runs.

        The jitted loop runs `chunk_steps` steps per device call with the state carried
        between calls (one compiled program for every chunk); after each chunk every sequence
        that produced tokens yields an event with its new token ids and text delta, and its
        last event carries its finish reason. Concatenating a sequence's events gives exactly
        `generate`'s tokens and text. Takes `generate`'s arguments.
        """
        req = self._request(
            prompts, method, mode, max_new_tokens, temperature, seed, chat, top_k, top_p,
            stop, stop_token_ids, logprobs, ignore_eos, kv_cache, kv_residual, method_options,
        )  # fmt: skip
        for events, *_ in self._chunks(req, chunk_steps):
            yield from events

    def generate_many(
        self,
        prompts: Sequence[str | Sequence[int]],
        method: DecodingMethod | str = "fp",
        max_new_tokens: int | Sequence[int] = 64,
        temperature: float = 0.0,
        seed: int = 0,
        chat: bool = True,
        *,
        batch_size: int = 8,
        mode: str | None = None,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        stop_token_ids: Sequence[int] | Sequence[Sequence[int]] | None = None,
        logprobs: int = 0,
        ignore_eos: bool = False,
        kv_cache: str | None = None,
        kv_residual: int = 128,
        chunk_steps: int = 8,
        progress: bool = False,
        **method_options,
    ) -> GenerationResult:
        """Generates for many prompts with continuous batching: `batch_size` rows stay busy.

        A row whose sequence finished takes the next prompt in place (its prefill written into
        that row of the cache) instead of waiting for the slowest row of a static batch. The
        rows run up to `chunk_steps` steps per device call, and while prompts wait a call
        also ends as soon as a row finishes; finished rows are collected and refilled between
        calls, each prompt prefilled alone in its own prompt-length bucket. Every prompt's
        tokens equal its `generate([prompt], ...)` run alone at temperature 0 (its prefill is
        the batch-1 prefill, and every decode kernel computes a row the same way whatever the
        other rows hold); when sampling, each prompt's draws
        differ from its run alone (the rows share one key stream) but follow the same
        distribution. Takes `generate`'s arguments; results come back in the prompts' order.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(chunk_steps, int) or chunk_steps < 1:
            raise UsageError(f"chunk_steps must be a positive integer, got {chunk_steps!r}")
        if self.mesh is not None and batch_size % self.mesh.shape["data"]:
            raise UsageError(
                f"batch_size {batch_size} must be a multiple of the mesh's data axis "
                f"({self.mesh.shape['data']})"
            )
        p = self._parse(
            prompts, method, mode, max_new_tokens, temperature, chat, top_k, top_p, stop,
            stop_token_ids, logprobs, ignore_eos, kv_cache, kv_residual, method_options,
        )  # fmt: skip
        m, dc, kv_cache, token_lists = p.method, p.dc, p.kv_cache, p.token_lists
        limits, stops, stop_ids, s_width = p.limits, p.stops, p.stop_ids, p.s_width
        n = len(token_lists)
        _, _, capacity = self._plan(token_lists, dc)
        rows = batch_size
        cache = self._new_cache(p, rows, capacity, kv_residual)
        kw = dict(cfg=self.config, qcfg=self.qconfig, dc=dc)
        t0 = time.perf_counter()
        state = loop.empty_state(cache, jax.random.PRNGKey(seed), dc, s_width)
        pending = collections.deque(range(n))
        slot: list[int | None] = [None] * rows
        trackers = [_TextTracker(self, stops[i]) for i in range(n)]
        tokens: list[list[int] | None] = [None] * n
        reasons: list[str | None] = [None] * n
        lps: list[Any] = [None] * n
        per_row: list[dict[str, Any]] = [{} for _ in range(n)]  # harvested counters
        bar = None
        if progress:
            from tqdm import tqdm  # noqa: PLC0415

            bar = tqdm(total=n, desc="generate_many", unit="prompt")
        while pending or any(s is not None for s in slot):
            for r in range(rows):
                if slot[r] is None and pending:
                    i = pending.popleft()
                    # the prompt's own bucket (as alone), not the longest prompt's: the
                    # batch-1 prefill was ~40% of the run padded to the longest's
                    # (experiments/profile_continuous.py); one program per bucket
                    own = _bucket(len(token_lists[i]), 16)
                    toks = np.full((1, own), self.config.pad_token_id, np.int32)
                    toks[0, : len(token_lists[i])] = token_lists[i]
                    sid = np.full((1, s_width), -1, np.int32)
                    sid[0, : len(stop_ids[i])] = stop_ids[i]
                    state = loop.insert_prompt(
                        state,
                        self.params,
                        jnp.asarray(r, jnp.int32),
                        jnp.asarray(toks),
                        jnp.asarray([len(token_lists[i])], jnp.int32),
                        jax.random.PRNGKey(seed),
                        jnp.asarray([limits[i]], jnp.int32),
                        jnp.asarray(sid),
                        **kw,
                    )
                    slot[r] = i
            out, num, done, finish, vsteps, carry, lp = jax.device_get(
                (
                    state.out_tokens,
                    state.num_generated,
                    state.done,
                    state.finish,
                    state.verify_steps,
                    state.carry,
                    state.logprobs,
                )
            )
            cut = []
            for r, i in enumerate(slot):
                if i is None:
                    continue
                _, _, stopped = trackers[i].update(out[r, : num[r]].tolist(), bool(done[r]))
                if not (stopped or done[r]):
                    continue
                if stopped:
                    cut.append(r)
                    reasons[i] = "stop"
                else:
                    reasons[i] = FINISH_NAMES[int(finish[r])] or "length"
                tokens[i] = trackers[i].tokens
                per_row[i] = {"verify_steps": int(vsteps[r]), "carry": _row_of(carry, r)}
                if dc.logprobs:
                    lps[i] = _token_logprobs(lp, r, 0, tokens[i])
                slot[r] = None
                if bar is not None:
                    bar.update(1)
            if cut:  # a stop string ended these rows: stop them on the device too
                idx = jnp.asarray(cut, jnp.int32)
                state = state.replace(done=state.done.at[idx].set(True))
            if any(s is not None for s in slot):
                # while prompts wait, a chunk ends when a row finishes: it is refilled at once
                state = loop.run_steps(
                    state,
                    self.params,
                    jnp.asarray(chunk_steps, jnp.int32),
                    jnp.asarray(bool(pending)),
                    **kw,
                )
        if bar is not None:
            bar.close()
        wall = time.perf_counter() - t0
        total = int(sum(len(t) for t in tokens))
        carry_all = _stack_rows([r["carry"] for r in per_row], jax.device_get(state.carry))
        stats: dict[str, Any] = {
            "mode": m.mode,
            "method": repr(m),
            "batch": n,
            "batch_size": rows,
            "continuous_batching": True,
            "tokens_generated": total,
            "wall_s": wall,  # compile time included: programs compile on first use here
            "tokens_per_s": total / wall if wall > 0 else float("nan"),
            "prompt_tokens": int(sum(len(t) for t in token_lists)),
            "steps": int(jax.device_get(state.steps)),
            "kv_cache": kv_cache,
        }
        stats.update(m.stats(carry_all, n, total, sum(r["verify_steps"] for r in per_row)))
        texts = [t.text for t in trackers]
        return GenerationResult(
            texts=texts,
            tokens=tokens,
            finish_reasons=reasons,
            stats=stats,
            logprobs=lps if dc.logprobs else None,
        )

    # ------------------------------------------------------------------ request plumbing
    def _parse(
        self, prompts, method, mode, max_new_tokens, temperature, chat, top_k, top_p, stop,
        stop_token_ids, logprobs, ignore_eos, kv_cache, kv_residual, method_options,
    ) -> _Parsed:  # fmt: skip
        """Checks a request's arguments (shared by generate, stream and generate_many)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise UsageError("no prompts given: pass at least one prompt")
        if mode is not None:
            if not (isinstance(method, str) and method == "fp"):
                raise UsageError("give the decoding method once: method=... or mode=..., not both")
            method = mode
        n = len(prompts)
        limits = _limits(max_new_tokens, n)
        if not isinstance(logprobs, int) or isinstance(logprobs, bool) or logprobs < 0:
            raise UsageError(f"logprobs must be a non-negative integer, got {logprobs!r}")
        if logprobs > self.config.vocab_size:
            raise UsageError(
                f"logprobs {logprobs} is more than the vocabulary ({self.config.vocab_size})"
            )
        stops = _stop_lists(stop, n)
        stop_ids = _stop_id_lists(stop_token_ids, n, self.config.vocab_size)
        m = self.method(method, **method_options)
        dc = self.decode_config(m, int(max(limits)), temperature, top_k, top_p, ignore_eos)
        dc = dc.replace(logprobs=int(logprobs))
        kv_cache = self._check_kv_cache(m, kv_cache, kv_residual)
        token_lists = self.encode(prompts, chat=chat)
        s_width = _bucket(max(len(s) for s in stop_ids), 1) if any(stop_ids) else 0
        return _Parsed(m, dc, kv_cache, token_lists, limits, stops, stop_ids, s_width)

    def _new_cache(self, p: _Parsed, rows: int, capacity: int, kv_residual: int):
        """An empty KV cache of `rows` sequences for a parsed request (sharded on a mesh)."""
        cache = make_cache(
            p.kv_cache,
            self.config,
            rows,
            capacity,
            residual=kv_residual,
            step_tokens=p.dc.tokens_per_step,
            # the kernel registry's choice for the cache's attention (`pallas_kernels.registry`)
            attention_impl=dispatch.cache_attention_impl(self.impl),
        )
        cache = p.method.wrap_cache(cache, self.params)  # e.g. beside a draft model's own cache
        if self.mesh is not None:
            from qspec_jax.sharding import shard_cache  # noqa: PLC0415

            cache = shard_cache(cache, self.mesh)
        return cache

    def _request(
        self, prompts, method, mode, max_new_tokens, temperature, seed, chat, top_k, top_p,
        stop, stop_token_ids, logprobs, ignore_eos, kv_cache, kv_residual, method_options,
    ) -> _Request:  # fmt: skip
        """Checks a request and lays out its arrays (shared by generate and stream)."""
        p = self._parse(
            prompts, method, mode, max_new_tokens, temperature, chat, top_k, top_p, stop,
            stop_token_ids, logprobs, ignore_eos, kv_cache, kv_residual, method_options,
        )  # fmt: skip
        m, dc, token_lists, limits = p.method, p.dc, p.token_lists, p.limits
        n = len(token_lists)
        batch, t_bucket, capacity = self._plan(token_lists, dc)

        padded = token_lists + [token_lists[0]] * (batch - n)  # batch bucket filler rows
        toks = np.full((batch, t_bucket), self.config.pad_token_id, np.int32)
        for i, t in enumerate(padded):
            toks[i, : len(t)] = t
        lens = np.asarray([len(t) for t in padded], np.int32)
        # filler rows stop after their first token
        lim = np.asarray(list(limits) + [1] * (batch - n), np.int32)
        sid = np.full((batch, p.s_width), -1, np.int32)
        for i, ids in enumerate(p.stop_ids):
            sid[i, : len(ids)] = ids
        cache = self._new_cache(p, batch, capacity, kv_residual)
        toks, lens, lim, sid = map(jnp.asarray, (toks, lens, lim, sid))
        if self.mesh is not None:
            from qspec_jax.sharding import shard_batch  # noqa: PLC0415

            toks, lens, lim, sid = (shard_batch(a, self.mesh) for a in (toks, lens, lim, sid))
        return _Request(
            method=m,
            dc=dc,
            kv_cache=p.kv_cache,
            token_lists=token_lists,
            n=n,
            toks=toks,
            lens=lens,
            cache=cache,
            key=jax.random.PRNGKey(seed),
            limits=lim,
            stop_ids=sid,
            stops=p.stops,
        )

    def _result(self, req, host, wall, compile_s, source, kept=None) -> GenerationResult:
        """The GenerationResult from the final host arrays (`kept`: the chunked path's
        (tokens, texts, reasons) after stop strings)."""
        n = req.n
        if kept is None:
            tokens = [host.out_tokens[i, : host.num_generated[i]].tolist() for i in range(n)]
            reasons = [FINISH_NAMES[int(host.finish[i])] or "length" for i in range(n)]
            texts = [self.decode(t) for t in tokens]
        else:
            tokens, texts, reasons = kept
        total = int(sum(len(t) for t in tokens))
        lengths = host.lengths[:n]
        stats: dict[str, Any] = {
            "mode": req.method.mode,
            "method": repr(req.method),
            "batch": n,
            "tokens_generated": total,
            "wall_s": wall,
            "tokens_per_s": total / wall if wall > 0 else float("nan"),
            "compile_s": compile_s,
            "compile_source": source,
            "max_new_tokens_bucket": req.dc.max_new_tokens,
            "prompt_tokens": int(sum(len(t) for t in req.token_lists)),
            "steps": int(host.steps),
            "kv_cache": req.kv_cache,
            # bytes of K/V per token held at the end (hier: codes + scales + float buffer)
            "kv_bytes_per_token": type(req.cache).kv_bytes(host.cache_like, lengths)
            / max(int(lengths.sum()), 1),
        }
        stats.update(req.method.stats(host.carry, n, total, int(host.verify_steps[:n].sum())))
        lps = None
        if req.dc.logprobs:
            lps = [_token_logprobs(host.logprobs, i, 0, tokens[i]) for i in range(n)]
        return GenerationResult(
            texts=texts, tokens=tokens, finish_reasons=reasons, stats=stats, logprobs=lps
        )

    def _chunks(self, req: _Request, chunk_steps: int):
        """Runs a request in chunks of steps; yields (events, state) after prefill and after
        every chunk, the state's finished rows including those a stop string ended."""
        if not isinstance(chunk_steps, int) or chunk_steps < 1:
            raise UsageError(f"chunk_steps must be a positive integer, got {chunk_steps!r}")
        kw = dict(cfg=self.config, qcfg=self.qconfig, dc=req.dc)
        state = loop.prefill_jit(
            self.params, req.cache, req.toks, req.lens, req.key, req.limits, req.stop_ids, **kw
        )
        trackers = [_TextTracker(self, req.stops[i]) for i in range(req.n)]
        finished = [False] * req.n
        while True:
            out, num, done, finish, lp = jax.device_get(
                (state.out_tokens, state.num_generated, state.done, state.finish, state.logprobs)
            )
            events, cut = [], []
            for i in range(req.n):
                if finished[i]:
                    continue
                final = bool(done[i])
                t = trackers[i]
                start = t.n_tokens
                new_ids, delta, stopped = t.update(out[i, : num[i]].tolist(), final)
                reason = None
                if stopped:
                    reason = "stop"
                    cut.append(i)
                elif final:
                    reason = FINISH_NAMES[int(finish[i])] or "length"
                if reason:
                    finished[i] = True
                    t.reason = reason
                if new_ids or delta or reason:
                    events.append(
                        StreamEvent(
                            index=i,
                            token_ids=new_ids,
                            text=delta,
                            finish_reason=reason,
                            logprobs=_token_logprobs(lp, i, start, new_ids)
                            if req.dc.logprobs
                            else None,
                        )
                    )
            if cut:  # rows a stop string ended: done on the device too, nothing more committed
                rows = jnp.asarray(cut, jnp.int32)
                state = state.replace(
                    done=state.done.at[rows].set(True),
                    finish=state.finish.at[rows].set(STOP),
                )
            yield events, state, trackers
            if all(finished):
                return
            state = loop.run_steps(state, self.params, jnp.asarray(chunk_steps, jnp.int32), **kw)

    def _finish_chunked(self, req: _Request, chunk_steps: int) -> GenerationResult:
        """`generate` through the chunked loop (stop strings are matched between chunks)."""
        t0 = time.perf_counter()
        *_, (_, state, trackers) = self._chunks(req, chunk_steps)  # run to the end
        host = _HostState.fetch(state.replace(cache=state.cache.flush()))
        wall = time.perf_counter() - t0
        kept = (
            [t.tokens for t in trackers],
            [t.text for t in trackers],
            [t.reason for t in trackers],
        )
        # compile time is not separated from the run on this path (jit compiles on first use)
        return self._result(req, host, wall, float("nan"), "jit", kept)

    # ------------------------------------------------------------------ logits
    def logits(self, token_ids, precision: str = "fp") -> np.ndarray:
        """Teacher-forced logits float32 [batch, length, vocab] for equal-length id rows."""
        if precision not in PRECISIONS:
            raise UsageError(
                f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}"
            )
        self.check_mode(precision)
        ids = np.asarray(token_ids, np.int32)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise UsageError("token_ids must be a non-empty [batch, length] array of ids")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise UsageError(f"token ids must be in [0, {self.config.vocab_size})")
        b, t = ids.shape
        try:  # h1-loading: sliding-window models refuse what passes the window
            self.config.check_context(t, "logits")
        except ValueError as e:
            raise UsageError(str(e)) from None
        key = (b, t, precision)
        if key not in self._logits_fns:
            cfg, qcfg = self.config, self.qconfig

            @jax.jit
            def fn(params, ids):
                cache = KVCache.init(cfg, ids.shape[0], ids.shape[1])
                return forward(params, ids, cache, cfg, qcfg, precision)[0]

            if len(self._logits_fns) >= max(self.max_programs, 1):
                self._logits_fns.pop(next(iter(self._logits_fns)))
                jax.clear_caches()
            self._logits_fns[key] = fn
        return np.asarray(self._logits_fns[key](self.params, jnp.asarray(ids)))


def load(
    model: str = EMBEDDED_MODEL,
    *,
    quant: str | None = None,
    group_size: int = 128,
    dtype: str | None = None,
    seed: int = 0,
    progress: bool = True,
    mesh=None,
    compile_cache: bool = True,
    quant_cache: bool = True,
    draft_quant: str | None = None,
    draft_model=None,
    **quant_options,
) -> Engine:
    """Loads a model and returns an Engine.

    Args:
        model: "smollm2-135m" (the embedded GGUF), a shape preset name (random weights, no
            tokenizer: "tiny", "llama-2-7b", "llama-3-8b", "qwen2-7b"), a .gguf file, a Hugging
            Face model directory, or a quantized checkpoint directory written by
            `qspec-jax quantize`.
        quant: None / "none" (float weights), "gguf" (the file's own Q4_1 codes, exact),
            "rtn", "gptq", "quarot-rtn", "quarot-gptq".
        group_size: weight group size for the quantizers (0 = per channel).
        dtype: activation / float weight dtype; None: "float32" on the CPU backend,
            "bfloat16" on any other (GPU).
        seed: seed for random-init presets and randomized rotations.
        progress: show progress bars while quantizing.
        mesh: optional `jax.sharding.Mesh` from `qspec_jax.sharding.make_mesh`: batches split
            over its "data" axis, weights tensor-parallel over its "model" axis.
        compile_cache: turn on JAX's persistent compilation cache under the user's cache home
            (see `qspec_jax.disk_cache`; ``QSPEC_JAX_COMPILE_CACHE=0`` also turns it off).
        quant_cache: quantize once: reuse the orbax checkpoint the first quantization (for
            "gguf": the first read of the file's int4 codes) of the same model file (path,
            size, mtime), method, group size, seed, dtype, options and loader / quantizer
            source code wrote under the user's cache home, and write one after
            quantizing (``QSPEC_JAX_QUANT_CACHE=0`` also turns it off). A GGUF file's float
            weights (quant None) are cached the same way: dequantizing them is the slow part
            of their load. A cached checkpoint that fails validation is quantized again and
            replaced, never used.
            `Engine.load_info` says what happened.
        draft_quant: keep the float weights as the target AND a 4-bit copy quantized with this
            method ("gguf", "rtn", "gptq", "quarot-rtn", ...) for drafting: QuantSpec as
            published (`QuantSpec(verify="fp")` drafts in W4A16 over int4 KV and verifies in
            float over int8 KV) and `QSpec(verify="fp", draft=...)`. Every mode is then
            available; `Engine.weight_bytes_by_set` reports both memories.
        draft_model: a separate draft model with the target's tokenizer, for
            `DraftModelSpec` (mode "draftmodel"): "self:k" (the target's first k layers, their
            arrays shared, not copied), anything `load` accepts as `model` (loaded with float
            weights in the target's dtype), a loaded `Engine`, or an in-memory
            `(params, LlamaConfig)` pair. Its vocabulary size must equal the target's.
        **quant_options: passed to `qspec_jax.quant.quantize_model`.
    """
    if draft_model is not None:
        if mesh is not None:
            raise NotImplementedError(
                "draft_model is not sharded yet: load it without a mesh (--devices)"
            )
        eng = load(
            model, quant=quant, group_size=group_size, dtype=dtype, seed=seed,
            progress=progress, compile_cache=compile_cache, quant_cache=quant_cache,
            draft_quant=draft_quant, **quant_options,
        )  # fmt: skip
        return _attach_draft_model(eng, draft_model, progress=progress, quant_cache=quant_cache)
    if draft_quant is not None:
        return _load_two_weight_sets(
            model, quant, draft_quant, group_size=group_size, dtype=dtype, seed=seed,
            progress=progress, mesh=mesh, compile_cache=compile_cache, quant_cache=quant_cache,
            **quant_options,
        )  # fmt: skip
    quant = quant or "none"
    if dtype is None:  # h1-loading: bfloat16 off the CPU backend
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if compile_cache:  # before quantizing: its jitted kernels are cached too
        disk_cache.enable_compilation_cache()
    if quant not in QUANT_METHODS:
        raise UsageError(
            f"unknown quantization {quant!r}: choose one of {', '.join(QUANT_METHODS)}"
        )
    from qspec_jax.loading import load_checkpoint  # noqa: PLC0415

    t_load = time.perf_counter()
    entry = None
    # "gguf" is cached too: its weights need no quantizing, but reading them from the file
    # costs more than the checkpoint (gguf's reader parses every metadata field, the
    # tokenizer's 49k strings included; experiments/profile_first_call.py measures both).
    # A GGUF's float weights are cached the same way (dequantizing its codes on every load
    # made the float mode's first call the slowest; experiments/bench_first_call.py).
    cacheable = quant != "none" or _is_gguf_source(model)
    if cacheable and quant_cache and disk_cache.quant_cache_enabled():
        entry = _quant_cache_entry(model, quant, group_size, dtype, seed, quant_options)
    info: dict[str, Any] = {"quant_cache": "off" if entry is None else "miss"}
    if entry is not None:
        info["quant_cache_path"] = entry[0]
        hit = _read_quant_cache(entry, info)
        if hit is not None:
            cfg, params, qcfg, tok_source = hit
            tokenizer = _tokenizer(tok_source, quant_cache) if tok_source else None
            eng = Engine(
                cfg,
                params,
                qcfg,
                tokenizer,
                source=str(model),
                mesh=mesh,
                compile_cache=compile_cache,
            )
            eng.load_info = dict(info, load_s=time.perf_counter() - t_load)
            return eng

    tokenizer = None
    if model in PRESETS and model != EMBEDDED_MODEL:
        if quant == "gguf":
            raise UsageError(
                f"quant 'gguf' needs a GGUF file, but {model!r} is a random-init preset"
            )
        cfg = PRESETS[model].replace(dtype=dtype)
        params = init_params(cfg, jax.random.PRNGKey(seed))
        qcfg = QuantConfig()
    elif os.path.isdir(str(model)) and _is_qspec_checkpoint(model):
        from qspec_jax.checkpoint import load_quantized  # noqa: PLC0415

        if quant not in ("none",):
            raise UsageError(f"{model} is already quantized; do not pass quant={quant!r}")
        cfg, params, qcfg, tok_source = load_quantized(model)
        tokenizer = _tokenizer(tok_source, quant_cache) if tok_source else None
        return Engine(
            cfg, params, qcfg, tokenizer, source=str(model), mesh=mesh, compile_cache=compile_cache
        )
    elif quant not in ("none", "gguf") and _is_hf_dir(model):
        # h1-loading: one decoder block at a time (read, rotate, quantize, to the device).
        from qspec_jax.loading.hf_loader import HFCheckpoint  # noqa: PLC0415
        from qspec_jax.quant import quantize_checkpoint  # noqa: PLC0415

        tokenizer = _hf_dir_tokenizer(model, quant_cache)
        calib = quant_options.pop("calib_tokens", tokenizer)
        t_q = time.perf_counter()
        ckpt = HFCheckpoint(model, dtype)
        cfg, params, qcfg = quantize_checkpoint(
            ckpt, quant, group_size, calib_tokens=calib, seed=seed, progress=progress,
            **quant_options,
        )  # fmt: skip
        ckpt.close()
        info["quantize_s"] = time.perf_counter() - t_q
        info["streamed"] = True
    else:
        cfg, params, qcfg = load_checkpoint(model, dtype=dtype, keep_int4=(quant == "gguf"))
        if _is_hf_dir(model):
            tokenizer = _hf_dir_tokenizer(model, quant_cache)
        else:
            tokenizer = _tokenizer(model, quant_cache)
    if quant not in ("none", "gguf") and not info.get("streamed"):
        from qspec_jax.quant import quantize_model  # noqa: PLC0415

        # GPTQ calibrates on the project's own text, tokenized by the model's tokenizer.
        calib = quant_options.pop("calib_tokens", tokenizer)
        t_q = time.perf_counter()
        params, qcfg = quantize_model(
            params,
            cfg,
            quant,
            group_size,
            calib_tokens=calib,
            seed=seed,
            progress=progress,
            **quant_options,
        )
        info["quantize_s"] = time.perf_counter() - t_q
    if entry is not None:  # a miss or an invalid entry: quantized (or read) now, cache it
        tok_source = None if model in PRESETS and model != EMBEDDED_MODEL else str(model)
        if tokenizer is None:  # h1-loading: an HF directory without tokenizer files
            tok_source = None
        _write_quant_cache(entry, cfg, params, qcfg, tok_source, info)
    eng = Engine(
        cfg, params, qcfg, tokenizer, source=str(model), mesh=mesh, compile_cache=compile_cache
    )
    eng.load_info = dict(info, load_s=time.perf_counter() - t_load)
    return eng


def _load_two_weight_sets(model, quant, draft_quant, *, mesh, **kw) -> Engine:
    """A float target and its `draft_quant` int4 copy in one Engine (`TwoWeights`)."""
    if quant not in (None, "none"):
        raise UsageError(
            f"draft_quant keeps the float weights as the target: do not pass quant={quant!r} too"
        )
    if draft_quant in (None, "none") or draft_quant not in QUANT_METHODS:
        raise UsageError(
            f"unknown draft_quant {draft_quant!r}: choose one of {', '.join(QUANT_METHODS[1:])}"
        )
    t0 = time.perf_counter()
    target = load(model, quant=None, mesh=mesh, **kw)
    draft = load(model, quant=draft_quant, mesh=mesh, **kw)
    if target.config != draft.config:
        raise UsageError(f"{model}: the float and {draft_quant} loads disagree on the model shape")
    # Both engines prepared their weights (layers unstacked, int8 head); combine them as they are.
    eng = Engine(
        target.config,
        TwoWeights(target=target.params, draft=draft.params),
        draft.qconfig,
        draft.tokenizer or target.tokenizer,
        source=str(model),
        unroll_layers=False,
        mesh=mesh,
        compile_cache=kw.get("compile_cache", True),
        prepared=True,
    )
    eng.load_info = dict(
        target=target.load_info,
        draft=draft.load_info,
        load_s=time.perf_counter() - t0,
        weight_bytes=eng.weight_bytes_by_set,
    )
    return eng


def _bytes_by_set(params) -> dict[str, int]:
    if isinstance(params, TwoWeights):
        return {"target": weight_bytes(params.target), "draft": weight_bytes(params.draft)}
    return {"weights": weight_bytes(params)}


def _attach_draft_model(eng: Engine, draft_model, *, progress: bool, quant_cache: bool) -> Engine:
    """`eng` holding its weights beside a draft model (`WithDraftModel`; see `load`)."""
    t0 = time.perf_counter()
    target = eng.params
    if isinstance(draft_model, str) and draft_model.startswith("self:"):
        k = draft_model[5:]
        n = eng.config.num_layers
        if not k.isdigit() or not 1 <= int(k) <= n:
            raise UsageError(
                f"draft_model {draft_model!r}: give the number of the target's first layers "
                f"the draft keeps, 1..{n}, e.g. 'self:{max(n // 4, 1)}'"
            )
        # TwoWeights: the int4 copy is the one meant for drafting
        base = target.draft if isinstance(target, TwoWeights) else target
        dparams = truncate_layers(base, int(k))  # per-layer arrays: shared, not copied
        dcfg, dq, name = eng.config.replace(num_layers=int(k)), eng.qconfig, draft_model
    else:
        if isinstance(draft_model, Engine):
            d, name = draft_model, draft_model.source or "the draft engine"
        elif isinstance(draft_model, tuple) and len(draft_model) == 2:
            params, cfg = draft_model
            if not isinstance(cfg, LlamaConfig):
                raise UsageError(
                    "draft_model=(params, cfg) needs a LlamaConfig as its second item, "
                    f"got {type(cfg).__name__}"
                )
            d = Engine(cfg, params, QuantConfig(), compile_cache=False)  # layers prepared
            name = "the in-memory draft model"
        elif isinstance(draft_model, str):
            d = load(
                draft_model, dtype=eng.config.dtype, progress=progress, quant_cache=quant_cache
            )
            name = draft_model
        else:
            raise UsageError(
                "draft_model must be 'self:k', a model name or path, a loaded Engine or a "
                f"(params, LlamaConfig) pair, got {type(draft_model).__name__}"
            )
        if isinstance(d.params, (TwoWeights, WithDraftModel)):
            raise UsageError(f"draft model {name} must hold one weight set, not several")
        dparams, dcfg, dq = d.params, d.config, d.qconfig
    if dcfg.vocab_size != eng.config.vocab_size:
        raise UsageError(
            f"draft model {name} has a vocabulary of {dcfg.vocab_size} tokens but the target "
            f"{eng.source or 'model'} has {eng.config.vocab_size}: a draft model must use the "
            "target's tokenizer"
        )
    eng.params = WithDraftModel(target=target, draft=dparams, draft_cfg=dcfg, draft_qcfg=dq)
    eng.weight_kinds = weight_kinds(eng.params)
    eng.load_info = dict(
        eng.load_info,
        draft_model=dict(
            source=str(name), num_layers=dcfg.num_layers, load_s=time.perf_counter() - t0
        ),
        weight_bytes=eng.weight_bytes_by_set,
    )
    return eng


def _quant_cache_entry(model, method, group_size, dtype, seed, quant_options):
    """(path, description) of the cached quantized checkpoint for a load, or None.

    None when the weights cannot be identified cheaply (not a file, directory or preset) or an
    option is not plain data (e.g. a tokenizer object as calib_tokens).
    """
    options = dict(quant_options)
    calib = options.pop("calib_tokens", None)
    if calib is not None:  # explicit calibration ids: their bytes are part of the key
        try:
            ids = np.asarray(calib)
        except ValueError:  # ragged lists
            return None
        if ids.dtype.kind not in "iu":
            return None
        options["calib_tokens_sha256"] = disk_cache.array_digest(ids)
    try:
        json.dumps(options)
    except (TypeError, ValueError):
        return None
    if model in PRESETS and model != EMBEDDED_MODEL:
        cfg = PRESETS[model].replace(dtype=dtype)
        identity = {"preset": model, "config": dataclasses.asdict(cfg), "init_seed": seed}
    else:
        identity = disk_cache.model_identity(str(model))
        if identity is None:
            return None
    settings = dict(method=method, group_size=group_size, seed=seed, dtype=dtype, options=options)
    key, desc = disk_cache.quant_cache_key(identity, settings)
    return disk_cache.quant_cache_path(key), desc


def _read_quant_cache(entry, info: dict):
    """The cached (cfg, params, qcfg, tokenizer_source), or None (missing, stale or corrupt).

    A checkpoint that fails `load_quantized`'s validation (format, shapes, sha256 of every
    array) or records another description is moved aside and deleted; the caller quantizes
    again and writes a fresh one.
    """
    from qspec_jax.checkpoint import is_checkpoint, load_quantized, read_metadata  # noqa: PLC0415
    from qspec_jax.loading.errors import LoadError  # noqa: PLC0415

    path, desc = entry
    if not os.path.lexists(path):
        return None
    try:
        if not is_checkpoint(path):
            raise LoadError(f"{path}: holds no checkpoint metadata")
        recorded = read_metadata(path).get("extra", {}).get("quant_cache")
        if disk_cache.canonical(recorded) != disk_cache.canonical(desc):
            raise LoadError(f"{path}: records other quantization settings")
        out = load_quantized(path)
    except LoadError as e:
        warnings.warn(f"cached quantized weights unusable ({e}); quantizing again", stacklevel=3)
        info["quant_cache"] = "invalid"
        info["quant_cache_error"] = str(e)
        disk_cache.discard(path)
        return None
    info["quant_cache"] = "hit"
    return out


def _write_quant_cache(entry, cfg, params, qcfg, tok_source, info: dict) -> None:
    """Saves freshly quantized weights to the cache (atomically); a failure only warns."""
    from qspec_jax.checkpoint import save_quantized  # noqa: PLC0415

    path, desc = entry
    t0 = time.perf_counter()
    try:
        save_quantized(path, cfg, params, qcfg, tok_source, extra_meta={"quant_cache": desc})
    except (OSError, ValueError, TypeError) as e:  # FileExistsError: another process won
        warnings.warn(f"could not cache the quantized weights at {path}: {e}", stacklevel=3)
        info["quant_cache_write_error"] = str(e)
        return
    if info["quant_cache"] == "miss":
        info["quant_cache"] = "written"
    info["quant_cache_write_s"] = time.perf_counter() - t0


# h1-loading: files any of which makes a Hugging Face directory carry a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _is_gguf_source(model) -> bool:
    """The embedded model or a .gguf file: float weights that cost a dequantization to load."""
    return str(model) == EMBEDDED_MODEL or (
        str(model).endswith(".gguf") and os.path.isfile(str(model))
    )


def _is_hf_dir(model) -> bool:
    """A Hugging Face model directory (config.json), not a quantized checkpoint."""
    path = str(model)
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, "config.json"))
        and not _is_qspec_checkpoint(path)
    )


def _hf_dir_tokenizer(path, use_cache: bool):
    """The directory's tokenizer, or None when it ships no tokenizer files (token-id prompts)."""
    if not any(os.path.isfile(os.path.join(str(path), f)) for f in _TOKENIZER_FILES):
        return None
    return _tokenizer(str(path), use_cache)


def _is_qspec_checkpoint(path: str) -> bool:
    from qspec_jax.checkpoint import is_checkpoint  # noqa: PLC0415

    return is_checkpoint(path)


def quantize_to_checkpoint(
    model: str,
    method: str,
    out: str,
    *,
    group_size: int = 128,
    overwrite: bool = False,
    progress: bool = True,
    seed: int = 0,
    **quant_options,
) -> str:
    """Quantizes a model once and writes an orbax checkpoint that `load(out)` restores.

    Returns the checkpoint's absolute path. The write is atomic: an interrupted run leaves
    nothing at `out` that loads.
    """
    if method not in QUANT_METHODS or method == "none":
        raise UsageError(f"unknown method {method!r}: choose one of {', '.join(QUANT_METHODS[1:])}")
    if os.path.exists(out) and not (overwrite and _is_qspec_checkpoint(out)):
        what = (
            "a checkpoint (pass --overwrite to replace it)"
            if _is_qspec_checkpoint(out)
            else "not a checkpoint"
        )
        raise UsageError(f"{out} already exists and is {what}: choose another --out")
    from qspec_jax.checkpoint import save_quantized  # noqa: PLC0415
    from qspec_jax.loading import load_checkpoint  # noqa: PLC0415

    cfg, params, qcfg = load_checkpoint(model, keep_int4=(method == "gguf"))
    tokenizer = None
    if method.endswith("gptq"):
        tokenizer = quant_options.pop("calib_tokens", None) or _maybe_tokenizer(model)
    if method != "gguf":
        from qspec_jax.quant import quantize_model  # noqa: PLC0415

        params, qcfg = quantize_model(
            params,
            cfg,
            method,
            group_size,
            calib_tokens=tokenizer,
            seed=seed,
            progress=progress,
            **quant_options,
        )
    settings = dict(
        method=method,
        group_size=group_size,
        seed=seed,
        source=str(model),
        **{k: v for k, v in quant_options.items() if isinstance(v, (int, float, str, bool))},
    )
    return save_quantized(
        out, cfg, params, qcfg, str(model), extra_meta=dict(quantizer=settings), overwrite=overwrite
    )


def _tokenizer(source: str, use_cache: bool):
    """The model's tokenizer, through the cache unless `use_cache` is False."""
    if use_cache:
        return _maybe_tokenizer(source)
    from qspec_jax.loading.tokenizer import load_tokenizer  # noqa: PLC0415

    return load_tokenizer(source)


def _maybe_tokenizer(source: str):
    """The model's tokenizer; a GGUF's is converted once and then read from the cache.

    transformers builds a GGUF file's tokenizer by converting its vocabulary, about 16-18 s for
    SmolLM2 on a 2-core machine; the converted tokenizer is saved under the cache root
    (`qspec_jax.disk_cache.load_cached_tokenizer`) and read back in well under a second.
    ``QSPEC_JAX_QUANT_CACHE=0`` turns this off.
    """
    from qspec_jax.loading.tokenizer import load_tokenizer  # noqa: PLC0415

    if not disk_cache.quant_cache_enabled():
        return load_tokenizer(source)
    return disk_cache.load_cached_tokenizer(source, load_tokenizer)
