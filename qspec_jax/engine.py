"""The public API: `load(...)` returns an `Engine` with `.generate` and `.logits`.

The engine owns the weights (one copy), the tokenizer and a cache of compiled generation
functions keyed by static shapes (batch bucket, prompt bucket, cache capacity, decode config), so
repeated calls with prompts in the same bucket never recompile. `max_new_tokens` is bucketed too
(the output buffer and cache are sized for the next power of two, the limit itself is a traced
argument), and JAX's persistent compilation cache (`qspec_jax.disk_cache`) keeps the compiled
programs across processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qspec_jax import disk_cache
from qspec_jax.cache.kv_cache import KVCache
from qspec_jax.cache.protocol import KV_FORMATS, make_cache
from qspec_jax.config import PRESETS, LlamaConfig, QuantConfig
from qspec_jax.decoding.loop import (
    DRAFT_PRECISIONS,
    FINISH_NAMES,
    MAX_GAMMA,
    MODES,
    SPEC_MODES,
    DecodeConfig,
    generate,
)
from qspec_jax.decoding.sampling import SamplingConfig
from qspec_jax.model.llama import forward
from qspec_jax.model.params import (
    Params,
    attach_q8_head,
    init_params,
    is_quantized,
    unstack_layers,
    weight_bytes,
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
            seconds and where the program came from (see `Engine.generate`), and for QSpec the
            draft statistics.
    """

    texts: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str]
    stats: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MIN_NEW_TOKENS_BUCKET = 16


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
    ):
        # Before anything compiles: a second process loads the same programs from disk.
        self.compile_cache_dir = disk_cache.enable_compilation_cache() if compile_cache else None
        self.config = config
        if unroll_layers is None:  # per-layer arrays run ~2x faster on XLA:CPU (no slice copies)
            unroll_layers = jax.default_backend() == "cpu"
        params = unstack_layers(params) if unroll_layers else params
        # The GGUF's Q8_0 head as int8 codes (same weights): the CPU head kernel reads 28 MB a
        # token instead of the float32 head's 113 MB (`qspec_jax.model.params.attach_q8_head`).
        params = attach_q8_head(params)
        self.mesh = mesh
        if mesh is not None:  # weights tensor-parallel over "model", batches over "data"
            from qspec_jax.sharding import shard_params  # noqa: PLC0415

            params = shard_params(params, mesh)
        self.params = params
        self.qconfig = qconfig
        self.tokenizer = tokenizer
        self.source = source
        self.load_info: dict[str, Any] = {}
        self._compiled: dict[tuple, Any] = {}  # (shapes, capacity, DecodeConfig) -> executable
        # Kernel implementation for every matmul (`pallas_kernels.dispatch`): None = auto (Pallas
        # on GPU, the CPU kernels on CPU, else XLA); "xla" / "cpu" / ... to compare paths.
        self.impl: str | None = None
        self._logits_fns: dict[tuple, Any] = {}

    # ------------------------------------------------------------------ properties
    @property
    def modes(self) -> tuple[str, ...]:
        """The generation modes this engine's weights support."""
        if is_quantized(self.params):
            return ("w4a16", "w4a4", "w4a8", "qspec", "quantspec", "hspec")
        return ("fp",)

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.params)

    def check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
        if mode not in self.modes:
            if mode == "fp":
                why = "this model holds only int4 weights; load it without --quant for fp"
            else:
                why = "this model holds float weights; load it with --quant (e.g. quarot-rtn) first"
            raise UsageError(f"mode {mode!r} is not available: {why}")

    # ------------------------------------------------------------------ tokens
    def encode(self, prompts: Sequence[str | Sequence[int]], chat: bool = True) -> list[list[int]]:
        """Prompt strings (chat template applied when chat=True) or token-id lists -> id lists."""
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise UsageError(
                        "this model has no tokenizer (random-init preset): pass token-id lists"
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
    def _decode_config(
        self,
        mode,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        gamma,
        draft="w4a8",
        tree=None,
        levels=None,
    ) -> DecodeConfig:
        self.check_mode(mode)
        if draft not in DRAFT_PRECISIONS:
            raise UsageError(
                f"unknown draft precision {draft!r}: choose one of {', '.join(DRAFT_PRECISIONS)}"
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if mode in SPEC_MODES and not (isinstance(gamma, int) and 1 <= gamma <= MAX_GAMMA):
            raise UsageError(f"gamma must be an integer in 1..{MAX_GAMMA}, got {gamma!r}")
        try:
            sc = SamplingConfig(
                temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        hs = {}
        if mode == "hspec":
            from qspec_jax.decoding import hspec  # noqa: PLC0415

            try:
                hs = dict(tree=hspec.check_tree(tree), levels=hspec.check_levels(levels))
            except ValueError as e:
                raise UsageError(str(e)) from None
        return DecodeConfig(
            mode=mode,
            # the static buffer bound; the real limit is passed to the program as an array
            max_new_tokens=_bucket(max_new_tokens, MIN_NEW_TOKENS_BUCKET),
            sampling=sc,
            eos_ids=tuple(self.config.eos_token_ids),
            gamma=gamma if mode in SPEC_MODES else 0,
            draft_precision=draft if mode == "qspec" else "w4a4",
            impl=self.impl,
            **hs,
        )

    def _check_kv_cache(self, mode: str, kv_cache, kv_residual, dc: DecodeConfig) -> str:
        """The cache format for a request; UsageError (one sentence) for a bad combination."""
        if kv_cache is None:
            kv_cache = "hier" if mode == "quantspec" else "float"
        if kv_cache not in KV_FORMATS:
            raise UsageError(
                f"unknown kv_cache {kv_cache!r}: choose one of {', '.join(KV_FORMATS)}"
            )
        if mode == "quantspec" and kv_cache != "hier":
            raise UsageError(
                "mode 'quantspec' drafts from the int4 halves of the hierarchical cache: "
                "use kv_cache='hier' (or mode 'qspec' with a float cache)"
            )
        if mode == "hspec" and kv_cache == "hier":
            raise UsageError("mode 'hspec' verifies trees, which need kv_cache='float'")
        if kv_cache == "hier":
            if self.mesh is not None:
                raise NotImplementedError(
                    "kv_cache='hier' is not sharded yet: run it without a mesh (--devices)"
                )
            if not isinstance(kv_residual, int) or kv_residual < 1:
                raise UsageError(f"kv_residual must be a positive integer, got {kv_residual!r}")
            if dc.tokens_per_step - 1 > kv_residual:
                raise UsageError(
                    f"gamma {dc.gamma} is larger than kv_residual {kv_residual}: a "
                    "speculative step must fit the float buffer (use gamma <= R)"
                )
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

    @property
    def num_compiled(self) -> int:
        """How many generation programs this engine has compiled (or loaded from disk)."""
        return len(self._compiled)

    def compiled_generate(self, cache: KVCache, toks, lens, key, limit, dc: DecodeConfig):
        """The AOT-compiled generation function for these arguments' shapes and shardings.

        Returns:
            (executable, compile_s, source): compile_s is the wall time of tracing, lowering
            and compiling in this call (0.0 when this engine already held the program);
            source is "memory" (held by this engine), "disk" (JAX's persistent cache supplied
            the executable; compile_s is then tracing + lowering + reading it) or "compiled"
            (XLA compiled it now).
        """
        ckey = (
            toks.shape,
            cache.capacity,
            jax.tree_util.tree_structure(cache),
            jax.tree_util.tree_structure(self.params),  # e.g. with or without the int8 head
            dc,
        )
        if ckey in self._compiled:
            return self._compiled[ckey], 0.0, "memory"
        hits = disk_cache.persistent_cache_hits()
        t0 = time.perf_counter()
        fn = generate.lower(
            self.params, cache, toks, lens, key, limit, cfg=self.config, qcfg=self.qconfig, dc=dc
        ).compile()
        compile_s = time.perf_counter() - t0
        self._compiled[ckey] = fn
        return fn, compile_s, "disk" if disk_cache.persistent_cache_hits() > hits else "compiled"

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        mode: str = "fp",
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        chat: bool = True,
        *,
        top_k: int = 0,
        top_p: float = 1.0,
        gamma: int = 3,
        draft: str = "w4a8",
        adaptive_gamma: bool = False,
        spec_max_active: int = 0,
        ignore_eos: bool = False,
        tree=(4, 2, 1),
        levels=("w4a4", "w4a8", "w4a16"),
        kv_cache: str | None = None,
        kv_residual: int = 128,
    ) -> GenerationResult:
        """Generates continuations for a batch of prompts.

        Args:
            prompts: strings (tokenized, with the chat template when chat=True) or token-id lists.
            mode: "fp", "w4a16", "w4a4", "w4a8" (autoregressive), "qspec" (drafts in `draft`),
                "quantspec" (W4A16 drafts reading the int4 halves of the hierarchical cache) or
                "hspec" (SpecMQuant's hierarchy: a W4A4 draft tree, verified into a sequence by
                W4A8, verified by W4A16; see `qspec_jax.decoding.hspec`).
            max_new_tokens: the most tokens generated per prompt.
            temperature: 0 for greedy; top_k / top_p filter the sampled distribution.
            seed: PRNG seed.
            chat: apply the tokenizer's chat template to string prompts.
            gamma: QSpec draft length (the maximum when adaptive_gamma).
            draft: QSpec's draft precision over the same int4 weights: "w4a8" (the default:
                accepted 0.97 at gamma 3 on held-out prompts, README "Quantization") or "w4a4"
                (the paper's drafter).
            adaptive_gamma: grow / shrink the draft length from the running acceptance.
            spec_max_active: run plain W4A16 steps while more than this many sequences are
                active (0 = always speculate).
            ignore_eos: generate exactly max_new_tokens (for benchmarks).
            tree: hspec's draft tree, branching per depth (e.g. (4, 2, 1) or "4,2,1") or a
                `qspec_jax.decoding.tree.TreeConfig`.
            levels: hspec's precisions, cheapest first, ending in "w4a16": ("w4a4", "w4a8",
                "w4a16"), ("w4a4", "w4a16") (tree straight into W4A16), ("w4a8", "w4a16").
            kv_cache: "float" (default; a dense cache in the activation dtype) or "hier"
                (QuantSpec's int4/int8 hierarchical cache: drafts read int4 KV, the verifier and
                autoregressive steps int8 KV, plus a float buffer); "quantspec" needs "hier"
                and defaults to it.
            kv_residual: R of the hierarchical cache (float buffer of up to 2R tokens); a
                speculative step needs gamma <= R.

        Returns:
            A GenerationResult. stats["compile_s"] is the wall time this call spent tracing,
            lowering and compiling its program (0.0 when the engine already held it);
            stats["compile_source"] says where the program came from: "memory", "disk"
            (JAX's persistent compilation cache) or "compiled".
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise UsageError("no prompts given: pass at least one prompt")
        if mode == "hspec" and (adaptive_gamma or spec_max_active):
            raise UsageError("adaptive_gamma and spec_max_active apply to qspec only, not hspec")
        dc = self._decode_config(
            mode, max_new_tokens, temperature, top_k, top_p, gamma, draft, tree, levels
        )
        kv_cache = self._check_kv_cache(mode, kv_cache, kv_residual, dc)
        if ignore_eos:
            dc = dataclasses.replace(dc, eos_ids=())
        if mode in SPEC_MODES:
            dc = dataclasses.replace(
                dc, adaptive_gamma=bool(adaptive_gamma), spec_max_active=int(spec_max_active)
            )
        token_lists = self.encode(prompts, chat=chat)
        batch, t_bucket, capacity = self._plan(token_lists, dc)

        n = len(token_lists)
        padded = token_lists + [token_lists[0]] * (batch - n)  # batch bucket filler rows
        toks = np.full((batch, t_bucket), self.config.pad_token_id, np.int32)
        for i, t in enumerate(padded):
            toks[i, : len(t)] = t
        lens = np.asarray([len(t) for t in padded], np.int32)
        cache = make_cache(
            kv_cache,
            self.config,
            batch,
            capacity,
            residual=kv_residual,
            step_tokens=dc.tokens_per_step,
            # impl "xla" asks for XLA everywhere; otherwise the hierarchical cache's default
            # (its CPU attention kernel where available)
            attention_impl="xla" if self.impl == "xla" else None,
        )
        toks, lens = jnp.asarray(toks), jnp.asarray(lens)
        if self.mesh is not None:
            from qspec_jax.sharding import shard_batch, shard_cache  # noqa: PLC0415

            cache = shard_cache(cache, self.mesh)
            toks, lens = shard_batch(toks, self.mesh), shard_batch(lens, self.mesh)
        key = jax.random.PRNGKey(seed)
        limit = jnp.asarray(max_new_tokens, jnp.int32)  # traced: no recompile within a bucket
        fn, compile_s, source = self.compiled_generate(cache, toks, lens, key, limit, dc)
        jax.block_until_ready((cache, toks, lens))

        t0 = time.perf_counter()
        state = fn(self.params, cache, toks, lens, key, limit)
        out = jax.device_get(
            (
                state.out_tokens,
                state.num_generated,
                state.finish,
                state.steps,
                state.draft_proposed,
                state.draft_accepted,
                state.verify_steps,
                state.spec_steps,
                state.tree_accepted,
            )
        )
        final_lengths = jax.device_get(state.cache.lengths)
        wall = time.perf_counter() - t0
        out_tokens, num_gen, finish, steps, proposed, accepted, vsteps, spec_steps, tree_acc = out

        tokens = [out_tokens[i, : num_gen[i]].tolist() for i in range(n)]
        reasons = [FINISH_NAMES[int(finish[i])] or "length" for i in range(n)]
        total = int(sum(len(t) for t in tokens))
        stats: dict[str, Any] = {
            "mode": mode,
            "batch": n,
            "tokens_generated": total,
            "wall_s": wall,
            "tokens_per_s": total / wall if wall > 0 else float("nan"),
            "compile_s": compile_s,
            "compile_source": source,
            "max_new_tokens_bucket": dc.max_new_tokens,
            "prompt_tokens": int(sum(len(t) for t in token_lists)),
            "steps": int(steps),
            "kv_cache": kv_cache,
            # bytes of K/V per token held at the end (hier: codes + scales + float buffer)
            "kv_bytes_per_token": type(state.cache).kv_bytes(state.cache, final_lengths[:n])
            / max(int(final_lengths[:n].sum()), 1),
        }
        if mode in SPEC_MODES:
            prop, acc = int(proposed[:n].sum()), int(accepted[:n].sum())
            v = int(vsteps[:n].sum())
            stats.update(
                gamma=dc.gamma,
                draft=dc.draft_weights_precision,  # quantspec drafts in the verify precision
                draft_tokens_proposed=prop,
                draft_tokens_accepted=acc,
                acceptance_rate=acc / prop if prop else float("nan"),
                # tokens committed per verify step (the first token comes from prefill)
                mean_tokens_per_step=(total - n) / v if v else float("nan"),
                verify_steps=v,
                speculative_steps=int(spec_steps),
                adaptive_gamma=dc.adaptive_gamma,
            )
        if mode == "hspec":
            prop, acc = int(proposed[:n].sum()), int(accepted[:n].sum())
            v = int(vsteps[:n].sum())
            stats.update(
                tree=list(dc.tree.parents),
                tree_nodes=dc.tree.num_nodes,
                tree_depth=dc.tree.depth,
                levels=list(dc.levels),
                # drafted tokens the tree verifier kept per step (three levels: W4A8's path)
                tree_accepted_per_step=int(tree_acc[:n].sum()) / v if v else float("nan"),
                # tokens handed to the last level (three levels: path + 1; two: tree depth)
                draft_tokens_proposed=prop,
                draft_tokens_accepted=acc,
                acceptance_rate=acc / prop if prop else float("nan"),
                mean_tokens_per_step=(total - n) / v if v else float("nan"),
                verify_steps=v,
            )
        texts = [self.decode(t) for t in tokens]
        return GenerationResult(texts=texts, tokens=tokens, finish_reasons=reasons, stats=stats)

    # ------------------------------------------------------------------ logits
    def logits(self, token_ids, precision: str = "fp") -> np.ndarray:
        """Teacher-forced logits float32 [batch, length, vocab] for equal-length id rows."""
        if precision not in ("fp", "w4a16", "w4a4", "w4a8"):
            raise UsageError(f"unknown precision {precision!r}: choose fp, w4a16, w4a4 or w4a8")
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
            quantizing (``QSPEC_JAX_QUANT_CACHE=0`` also turns it off). A cached checkpoint
            that fails validation is quantized again and replaced, never used.
            `Engine.load_info` says what happened.
        **quant_options: passed to `qspec_jax.quant.quantize_model`.
    """
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
    if quant != "none" and quant_cache and disk_cache.quant_cache_enabled():
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
