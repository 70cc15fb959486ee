"""The functional API: generation as pure functions of arrays, for use inside your own `jax.jit`.

    import qspec_jax
    from qspec_jax import QSpec

    engine = qspec_jax.load("smollm2-135m", quant="gguf")
    cfg, qcfg, params = engine.config, engine.qconfig, engine.params

    @jax.jit
    def run(params, tokens, lens, key):
        state = qspec_jax.generate(
            params, tokens, lens, key, cfg=cfg, qcfg=qcfg, method=QSpec(gamma=3)
        )
        return state.out_tokens, state.num_generated

`generate` is `prefill` followed by `lax.while_loop(cond, step, state)`: the same functions the
engine compiles, with the engine's defaults (the model's EOS ids, QSpec drafting in W4A8, the
float cache), and nothing jitted inside, so it composes with `jax.jit`, `jax.vmap` over keys or
your own loop around `step`. Prompts are right-padded int32 [batch, T] with their lengths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qspec_jax.cache.protocol import make_cache
from qspec_jax.config import LlamaConfig, QuantConfig
from qspec_jax.decoding import loop
from qspec_jax.decoding.config import GREEDY, DecodeConfig
from qspec_jax.decoding.methods import AR, DecodingMethod, resolve
from qspec_jax.decoding.sampling import SamplingConfig
from qspec_jax.decoding.state import DecodeState

__all__ = ["decode_config", "generate", "init_cache", "prefill", "step"]


def decode_config(
    cfg: LlamaConfig,
    qcfg: QuantConfig,
    method: DecodingMethod | str | None = None,
    max_new_tokens: int = 64,
    sampling: SamplingConfig = GREEDY,
    eos_ids: tuple[int, ...] | None = None,
    impl: str | None = None,
) -> DecodeConfig:
    """The static `DecodeConfig` with the engine's defaults.

    Args:
        cfg, qcfg: the model and quantization configs (`engine.config`, `engine.qconfig`).
        method: a decoding method object or mode string; None: autoregressive in the weights'
            own precision ("w4a16" for int4 weights, "fp" for float weights).
        max_new_tokens: the most tokens generated per sequence (sizes the output buffer).
        sampling: greedy (default) or temperature / top-k / top-p.
        eos_ids: ids that end a sequence; None: the model's (`cfg.eos_token_ids`).
        impl: kernel implementation override (`pallas_kernels.dispatch`); None = auto.
    """
    if method is None:
        method = AR("w4a16" if qcfg.quantized else "fp")
    return DecodeConfig(
        resolve(method),
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_ids=tuple(cfg.eos_token_ids) if eos_ids is None else tuple(eos_ids),
        impl=impl,
    )


def init_cache(
    cfg: LlamaConfig,
    dc: DecodeConfig,
    batch: int,
    prompt_len: int,
    kv_cache: str | None = None,
    kv_residual: int = 128,
):
    """An empty cache with room for the prompt, the new tokens and one step's headroom."""
    kind = kv_cache or dc.method.default_kv_cache
    capacity = prompt_len + dc.max_new_tokens + dc.tokens_per_step
    capacity = -(-capacity // 64) * 64
    return make_cache(
        kind, cfg, batch, capacity, residual=kv_residual, step_tokens=dc.tokens_per_step
    )


def prefill(params, cache, prompt_tokens, prompt_lens, key, *, cfg, qcfg, dc: DecodeConfig):
    """Runs the prompts and draws each sequence's first token; returns the `DecodeState`."""
    return loop.prefill(params, cache, prompt_tokens, prompt_lens, key, cfg, qcfg, dc)


def step(state: DecodeState, params, *, cfg, qcfg, dc: DecodeConfig) -> DecodeState:
    """One step of the decoding method (`dc.method`) for every running sequence."""
    return loop.step(state, params, cfg, qcfg, dc)


def generate(
    params,
    prompt_tokens: jnp.ndarray,
    prompt_lens: jnp.ndarray,
    key: jax.Array,
    *,
    cfg: LlamaConfig,
    qcfg: QuantConfig,
    method: DecodingMethod | str | None = None,
    max_new_tokens: int = 64,
    sampling: SamplingConfig = GREEDY,
    eos_ids: tuple[int, ...] | None = None,
    cache=None,
    kv_cache: str | None = None,
    kv_residual: int = 128,
    impl: str | None = None,
) -> DecodeState:
    """Prefill and the whole decode loop as one traceable function.

    Args:
        params: the weights (`engine.params`).
        prompt_tokens: int32 [batch, T] right-padded prompts.
        prompt_lens: int32 [batch] real prompt lengths (>= 1).
        key: PRNG key (used when sampling).
        cfg, qcfg: static model and quantization configs.
        method, max_new_tokens, sampling, eos_ids, impl: see `decode_config`.
        cache: a cache to reuse (its contents are ignored); None: `init_cache`'s.
        kv_cache, kv_residual: the cache format when `cache` is None ("float" or "hier";
            default the method's).

    Returns:
        The final `DecodeState`: tokens in out_tokens[b, :num_generated[b]], finish reasons in
        `finish` (`qspec_jax.decoding.FINISH_NAMES`), the method's counters in `carry`.
    """
    dc = decode_config(cfg, qcfg, method, max_new_tokens, sampling, eos_ids, impl)
    if cache is None:
        b, t = prompt_tokens.shape
        cache = init_cache(cfg, dc, b, t, kv_cache, kv_residual)
    state = loop.prefill(params, cache, prompt_tokens, prompt_lens, key, cfg, qcfg, dc)
    state = jax.lax.while_loop(loop.cond, lambda s: loop.step(s, params, cfg, qcfg, dc), state)
    return state.replace(cache=state.cache.flush())
