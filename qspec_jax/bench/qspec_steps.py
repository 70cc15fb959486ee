"""Step-time model of speculative decoding: one forward timed as the engine runs it, and its
H100 roofline projection.

`step_times` measures one draft step, one verify step and one autoregressive step of an engine
(`loop_time`: inside a `lax.fori_loop`, so weight-only work hoists out as in the engine's loop);
`roofline_step` projects the same forward on an H100 from bytes moved and FLOPs (a lower bound,
not a measurement). Used by experiments/bench_qspec.py, experiments/bench_tree.py and the GPU
check (`qspec_jax.bench.gpu_check`).
"""

from __future__ import annotations

from qspec_jax.bench.common import median_time

# H100 SXM peak figures (dense): HBM bandwidth, bf16 and int8 tensor-core rates.
H100 = dict(bw=3.35e12, bf16=989e12, int8=1979e12)


def loop_time(fwd, params, cache, toks, *extra, iters=(2, 6), timer=None):
    """Seconds of one `fwd` call inside a `lax.fori_loop`, the way the engine runs its steps.

    XLA hoists work that depends only on the weights out of a loop: on CPU the XLA path unpacks
    (W4A16: dequantizes) the int4 weights once before the engine's while_loop and reads that copy
    every step, so a forward jitted alone pays per call what the engine pays per generate call
    (measured: W4A16 forward alone 616 ms, in a loop 179 ms; README, profile table). Here each
    iteration's tokens are the previous iteration's argmax and the cache is carried, so nothing
    but weight-only work can leave the loop; the result is (T(i2) - T(i1)) / (i2 - i1) for loops
    of i1 and i2 iterations, so the hoisted work and the call overhead cancel.

    Args:
        fwd: (params, cache, toks, *extra) -> (logits [batch, t, V] or [batch, V], cache).
        params, cache, toks, extra: its arguments (toks int32 [batch, t]).
        iters: the two loop lengths.
        timer: timer(fn, *args) -> seconds (default `common.median_time`).

    Returns:
        Seconds per iteration (median-based; may be noisy on a loaded machine).
    """
    import jax
    import jax.numpy as jnp

    def run(n, p, c, t, *e):  # n is traced: one program serves both loop lengths
        def body(_, carry):
            c, t = carry
            logits, c = fwd(p, c, t, *e)
            nxt = jnp.argmax(logits.reshape(t.shape[0], -1, logits.shape[-1])[:, -1], -1)
            return c, jnp.broadcast_to(nxt.astype(t.dtype)[:, None], t.shape)

        return jax.lax.fori_loop(0, n, body, (c, t))[1]

    looped = jax.jit(run)
    timer = timer or median_time
    lo, hi = (timer(looped, jnp.int32(n), params, cache, toks, *extra) for n in iters)
    return (hi - lo) / (iters[1] - iters[0])


def step_times(engine, batch, gamma, capacity, filled, draft="w4a4", timer=None, in_loop=True):
    """Median seconds of one draft (`draft`, 1 token), verify (w4a16, gamma+1) and AR (w4a16, 1)
    step; `timer(fn, *args)` -> seconds (default: host-synchronized medians, `common.median_time`).
    With `in_loop` (default) each step is timed inside a fori_loop (`loop_time`), as the engine
    runs it; else jitted alone (on CPU that re-dequantizes the weights every call)."""
    import jax
    import jax.numpy as jnp

    from qspec_jax.cache import KVCache, set_lengths
    from qspec_jax.model.llama import forward

    cfg, qcfg = engine.config, engine.qconfig
    cache = set_lengths(KVCache.init(cfg, batch, capacity), jnp.full((batch,), filled, jnp.int32))
    last = jnp.zeros((batch,), jnp.int32)

    def fwd(precision, rows):
        def f(p, c, t):
            return forward(p, t, c, cfg, qcfg, precision, logits_index=last if rows else None)

        return f

    t1 = jnp.ones((batch, 1), jnp.int32)
    tg = jnp.ones((batch, gamma + 1), jnp.int32)
    timer = timer or median_time
    if in_loop:
        return dict(
            draft=loop_time(fwd(draft, True), engine.params, cache, t1, timer=timer),
            verify=loop_time(fwd("w4a16", False), engine.params, cache, tg, timer=timer),
            ar=loop_time(fwd("w4a16", True), engine.params, cache, t1, timer=timer),
        )
    alone = {
        k: jax.jit(lambda p, c, t, f=f: f(p, c, t)[0])
        for k, f in (
            ("draft", fwd(draft, True)),
            ("verify", fwd("w4a16", False)),
            ("ar", fwd("w4a16", True)),
        )
    }
    return dict(
        draft=timer(alone["draft"], engine.params, cache, t1),
        verify=timer(alone["verify"], engine.params, cache, tg),
        ar=timer(alone["ar"], engine.params, cache, t1),
    )


def roofline_step(cfg, group_size, tokens, ctx, act_bits):
    """Projected H100 seconds of one forward over `tokens` rows (batch * positions).

    Bytes: packed int4 linear weights + bf16 scales, bf16 LM head, bf16 KV cache read per
    sequence. FLOPs: 2 per weight per row. Linear FLOPs run at the int8 rate for act_bits <= 8
    (W4A4 as int4 values in int8 MMA: Hopper has no int4 MMA) and at the bf16 rate for W4A16;
    the LM head and attention at bf16. t = max(bytes / bandwidth, sum of flops / rates). Kernel
    launch overheads and dequantization work are ignored, so this is a lower bound.
    """
    d, f, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    lin = n_layers * (d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d + 2 * d * f + f * d)
    g = group_size or d
    weight_bytes = lin / 2 + lin / g * 2 + d * cfg.vocab_size * 2
    kv_bytes = 2 * n_layers * ctx * cfg.kv_size * 2 * tokens["batch"]
    rows = tokens["batch"] * tokens["positions"]
    lin_flops = 2 * lin * rows
    other_flops = 2 * d * cfg.vocab_size * rows + 4 * n_layers * ctx * cfg.q_size * rows
    lin_rate = H100["int8"] if act_bits <= 8 else H100["bf16"]
    compute = lin_flops / lin_rate + other_flops / H100["bf16"]
    return max((weight_bytes + kv_bytes) / H100["bw"], compute)
