"""The public API: `load(...)` returns an `Engine` with `.generate` and `.logits`.

The engine owns the weights (one copy), the tokenizer and a cache of compiled generation
functions keyed by static shapes (batch bucket, prompt bucket, cache capacity, decode config), so
repeated calls with prompts in the same bucket never recompile.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qspec_jax.cache.kv_cache import KVCache
from qspec_jax.cache.protocol import KV_FORMATS, make_cache
from qspec_jax.config import PRESETS, LlamaConfig, QuantConfig
from qspec_jax.decoding.loop import (
    FINISH_NAMES,
    MAX_GAMMA,
    MODES,
    SPEC_MODES,
    DecodeConfig,
    generate,
)
from qspec_jax.decoding.sampling import SamplingConfig
from qspec_jax.model.llama import forward
from qspec_jax.model.params import Params, init_params, is_quantized, unstack_layers, weight_bytes

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
            seconds, and for QSpec the draft statistics.
    """

    texts: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str]
    stats: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    """

    def __init__(self, config: LlamaConfig, params: Params, qconfig: QuantConfig, tokenizer=None,
                 source: str = "", unroll_layers: bool | None = None, mesh=None):
        self.config = config
        if unroll_layers is None:  # per-layer arrays run ~2x faster on XLA:CPU (no slice copies)
            unroll_layers = jax.default_backend() == "cpu"
        params = unstack_layers(params) if unroll_layers else params
        self.mesh = mesh
        if mesh is not None:  # weights tensor-parallel over "model", batches over "data"
            from qspec_jax.sharding import shard_params  # noqa: PLC0415

            params = shard_params(params, mesh)
        self.params = params
        self.qconfig = qconfig
        self.tokenizer = tokenizer
        self.source = source
        self._compiled: dict[tuple, Any] = {}
        self._logits_fns: dict[tuple, Any] = {}

    # ------------------------------------------------------------------ properties
    @property
    def modes(self) -> tuple[str, ...]:
        """The generation modes this engine's weights support."""
        if is_quantized(self.params):
            return ("w4a16", "w4a4", "w4a8", "qspec", "quantspec")
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
    def _decode_config(self, mode, max_new_tokens, temperature, top_k, top_p, gamma) -> DecodeConfig:
        self.check_mode(mode)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if mode in SPEC_MODES and not (isinstance(gamma, int) and 1 <= gamma <= MAX_GAMMA):
            raise UsageError(f"gamma must be an integer in 1..{MAX_GAMMA}, got {gamma!r}")
        try:
            sc = SamplingConfig(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
        except ValueError as e:
            raise UsageError(str(e)) from None
        return DecodeConfig(
            mode=mode,
            max_new_tokens=max_new_tokens,
            sampling=sc,
            eos_ids=tuple(self.config.eos_token_ids),
            gamma=gamma if mode in SPEC_MODES else 0,
        )

    def _check_kv_cache(self, mode: str, kv_cache, kv_residual, dc: DecodeConfig) -> str:
        """The cache format for a request; UsageError (one sentence) for a bad combination."""
        if kv_cache is None:
            kv_cache = "hier" if mode == "quantspec" else "float"
        if kv_cache not in KV_FORMATS:
            raise UsageError(f"unknown kv_cache {kv_cache!r}: choose one of {', '.join(KV_FORMATS)}")
        if mode == "quantspec" and kv_cache != "hier":
            raise UsageError("mode 'quantspec' drafts from the int4 halves of the hierarchical cache: "
                             "use kv_cache='hier' (or mode 'qspec' with a float cache)")
        if kv_cache == "hier":
            if self.mesh is not None:
                raise NotImplementedError(
                    "kv_cache='hier' is not sharded yet: run it without a mesh (--devices)")
            if not isinstance(kv_residual, int) or kv_residual < 1:
                raise UsageError(f"kv_residual must be a positive integer, got {kv_residual!r}")
            if dc.tokens_per_step - 1 > kv_residual:
                raise UsageError(f"gamma {dc.gamma} is larger than kv_residual {kv_residual}: a "
                                 "speculative step must fit the float buffer (use gamma <= R)")
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
        batch = _bucket(len(token_lists), 1)
        if self.mesh is not None:  # the batch must split evenly over the data axis
            d = self.mesh.shape["data"]
            batch = -(-batch // d) * d
        return batch, t_bucket, capacity

    def compiled_generate(self, cache: KVCache, toks, lens, key, dc: DecodeConfig):
        """The AOT-compiled generation function for these arguments' shapes and shardings (cached)."""
        ckey = (toks.shape, cache.capacity, jax.tree_util.tree_structure(cache), dc)
        if ckey not in self._compiled:
            t0 = time.perf_counter()
            fn = generate.lower(
                self.params, cache, toks, lens, key, cfg=self.config, qcfg=self.qconfig, dc=dc
            ).compile()
            self._compiled[ckey] = (fn, time.perf_counter() - t0)
        return self._compiled[ckey]

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
        adaptive_gamma: bool = False,
        spec_max_active: int = 0,
        ignore_eos: bool = False,
        kv_cache: str | None = None,
        kv_residual: int = 128,
    ) -> GenerationResult:
        """Generates continuations for a batch of prompts.

        Args:
            prompts: strings (tokenized, with the chat template when chat=True) or token-id lists.
            mode: "fp", "w4a16", "w4a4", "w4a8" (autoregressive), "qspec" (W4A4 drafts) or
                "quantspec" (W4A16 drafts reading the int4 halves of the hierarchical cache).
            max_new_tokens: the most tokens generated per prompt.
            temperature: 0 for greedy; top_k / top_p filter the sampled distribution.
            seed: PRNG seed.
            chat: apply the tokenizer's chat template to string prompts.
            gamma: QSpec draft length (the maximum when adaptive_gamma).
            adaptive_gamma: grow / shrink the draft length from the running acceptance.
            spec_max_active: run plain W4A16 steps while more than this many sequences are
                active (0 = always speculate).
            ignore_eos: generate exactly max_new_tokens (for benchmarks).
            kv_cache: "float" (default; a dense cache in the activation dtype) or "hier"
                (QuantSpec's int4/int8 hierarchical cache: drafts read int4 KV, the verifier and
                autoregressive steps int8 KV, plus a float buffer); "quantspec" needs "hier"
                and defaults to it.
            kv_residual: R of the hierarchical cache (float buffer of up to 2R tokens); a
                speculative step needs gamma <= R.

        Returns:
            A GenerationResult.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise UsageError("no prompts given: pass at least one prompt")
        dc = self._decode_config(mode, max_new_tokens, temperature, top_k, top_p, gamma)
        kv_cache = self._check_kv_cache(mode, kv_cache, kv_residual, dc)
        if ignore_eos:
            dc = dataclasses.replace(dc, eos_ids=())
        if mode in SPEC_MODES:
            dc = dataclasses.replace(dc, adaptive_gamma=bool(adaptive_gamma),
                                     spec_max_active=int(spec_max_active))
        token_lists = self.encode(prompts, chat=chat)
        batch, t_bucket, capacity = self._plan(token_lists, dc)

        n = len(token_lists)
        padded = token_lists + [token_lists[0]] * (batch - n)  # batch bucket filler rows
        toks = np.full((batch, t_bucket), self.config.pad_token_id, np.int32)
        for i, t in enumerate(padded):
            toks[i, : len(t)] = t
        lens = np.asarray([len(t) for t in padded], np.int32)
        cache = make_cache(kv_cache, self.config, batch, capacity, residual=kv_residual,
                           step_tokens=dc.tokens_per_step)
        toks, lens = jnp.asarray(toks), jnp.asarray(lens)
        if self.mesh is not None:
            from qspec_jax.sharding import shard_batch, shard_cache  # noqa: PLC0415

            cache = shard_cache(cache, self.mesh)
            toks, lens = shard_batch(toks, self.mesh), shard_batch(lens, self.mesh)
        key = jax.random.PRNGKey(seed)
        fn, compile_s = self.compiled_generate(cache, toks, lens, key, dc)
        jax.block_until_ready((cache, toks, lens))

        t0 = time.perf_counter()
        state = fn(self.params, cache, toks, lens, key)
        out = jax.device_get(
            (state.out_tokens, state.num_generated, state.finish, state.steps,
             state.draft_proposed, state.draft_accepted, state.verify_steps, state.spec_steps)
        )
        final_lengths = jax.device_get(state.cache.lengths)
        wall = time.perf_counter() - t0
        out_tokens, num_gen, finish, steps, proposed, accepted, vsteps, spec_steps = out

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
                draft_tokens_proposed=prop,
                draft_tokens_accepted=acc,
                acceptance_rate=acc / prop if prop else float("nan"),
                # tokens committed per verify step (the first token comes from prefill)
                mean_tokens_per_step=(total - n) / v if v else float("nan"),
                verify_steps=v,
                speculative_steps=int(spec_steps),
                adaptive_gamma=dc.adaptive_gamma,
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
    dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
    mesh=None,
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
        dtype: activation / float weight dtype.
        seed: seed for random-init presets and randomized rotations.
        progress: show progress bars while quantizing.
        mesh: optional `jax.sharding.Mesh` from `qspec_jax.sharding.make_mesh`: batches split
            over its "data" axis, weights tensor-parallel over its "model" axis.
        **quant_options: passed to `qspec_jax.quant.quantize_model`.
    """
    quant = quant or "none"
    if quant not in QUANT_METHODS:
        raise UsageError(f"unknown quantization {quant!r}: choose one of {', '.join(QUANT_METHODS)}")
    from qspec_jax.loading import load_checkpoint  # noqa: PLC0415
    from qspec_jax.loading.errors import LoadError  # noqa: PLC0415

    tokenizer = None
    if model in PRESETS and model != EMBEDDED_MODEL:
        if quant == "gguf":
            raise UsageError(f"quant 'gguf' needs a GGUF file, but {model!r} is a random-init preset")
        cfg = PRESETS[model].replace(dtype=dtype)
        params = init_params(cfg, jax.random.PRNGKey(seed))
        qcfg = QuantConfig()
    elif os.path.isdir(str(model)) and _is_qspec_checkpoint(model):
        from qspec_jax.checkpoint import load_quantized  # noqa: PLC0415

        if quant not in ("none",):
            raise UsageError(f"{model} is already quantized; do not pass quant={quant!r}")
        cfg, params, qcfg, tok_source = load_quantized(model)
        tokenizer = _maybe_tokenizer(tok_source) if tok_source else None
        return Engine(cfg, params, qcfg, tokenizer, source=str(model), mesh=mesh)
    else:
        cfg, params, qcfg = load_checkpoint(model, dtype=dtype, keep_int4=(quant == "gguf"))
        try:
            tokenizer = _maybe_tokenizer(model)
        except LoadError:
            raise
    if quant not in ("none", "gguf"):
        from qspec_jax.quant import quantize_model  # noqa: PLC0415

        # GPTQ calibrates on the project's own text, tokenized by the model's tokenizer.
        calib = quant_options.pop("calib_tokens", tokenizer)
        params, qcfg = quantize_model(
            params, cfg, quant, group_size, calib_tokens=calib, seed=seed, progress=progress,
            **quant_options,
        )
    return Engine(cfg, params, qcfg, tokenizer, source=str(model), mesh=mesh)


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
        what = "a checkpoint (pass --overwrite to replace it)" if _is_qspec_checkpoint(out) else "not a checkpoint"
        raise UsageError(f"{out} already exists and is {what}: choose another --out")
    from qspec_jax.checkpoint import save_quantized  # noqa: PLC0415
    from qspec_jax.loading import load_checkpoint  # noqa: PLC0415

    cfg, params, qcfg = load_checkpoint(model, keep_int4=(method == "gguf"))
    tokenizer = None
    if method.endswith("gptq"):
        tokenizer = quant_options.pop("calib_tokens", None) or _maybe_tokenizer(model)
    if method != "gguf":
        from qspec_jax.quant import quantize_model  # noqa: PLC0415

        params, qcfg = quantize_model(params, cfg, method, group_size, calib_tokens=tokenizer,
                                      seed=seed, progress=progress, **quant_options)
    settings = dict(method=method, group_size=group_size, seed=seed, source=str(model), **{
        k: v for k, v in quant_options.items() if isinstance(v, (int, float, str, bool))})
    return save_quantized(out, cfg, params, qcfg, str(model), extra_meta=dict(quantizer=settings),
                          overwrite=overwrite)


def _maybe_tokenizer(source: str):
    from qspec_jax.loading.tokenizer import load_tokenizer  # noqa: PLC0415

    return load_tokenizer(source)
