"""QSpec against autoregressive decoding on SmolLM2-135M, all in one run.

For each batch size: tokens/s of fp, w4a16 and w4a4 autoregressive decoding and of QSpec at each
gamma; QSpec's acceptance rate and tokens per verify step; the measured time of one draft step
(W4A4, one token), one verify step (W4A16, gamma + 1 tokens) and one W4A16 autoregressive step;
the speedup predicted from those (tokens_per_step * t_ar / (gamma * t_draft + t_verify)) next to
the speedup measured end to end (the gap is the engine's own overhead); and an H100 roofline
projection of the same steps, clearly a projection, not a measurement. Exactly N new tokens per
prompt (EOS ignored), greedy. Writes experiments/results/bench_qspec.json and PNG plots.

    python experiments/bench_qspec.py [--quant quarot-rtn] [--group-size 64] [--batches 1,4,16]
        [--gammas 1,2,3,4,5,6] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether? Think step by step.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in a few sentences why the sky is blue.",
    "A train travels 60 km per hour for 3 hours and then 40 km per hour for 2 hours. How far does it go?",
    "List three differences between lists and tuples in Python.",
    "What is the boiling point of water at sea level, in Celsius and Fahrenheit?",
    "Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many are left?",
    "Write a haiku about autumn leaves.",
]

# H100 SXM peak figures (dense): HBM bandwidth, bf16 and int8 tensor-core rates.
H100 = dict(bw=3.35e12, bf16=989e12, int8=1979e12)


def _median_time(fn, *args, reps=10):
    import jax

    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


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
        timer: timer(fn, *args) -> seconds (default `_median_time`).

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
    timer = timer or _median_time
    lo, hi = (timer(looped, jnp.int32(n), params, cache, toks, *extra) for n in iters)
    return (hi - lo) / (iters[1] - iters[0])


def step_times(engine, batch, gamma, capacity, filled, draft="w4a4", timer=None, in_loop=True):
    """Median seconds of one draft (`draft`, 1 token), verify (w4a16, gamma+1) and AR (w4a16, 1)
    step; `timer(fn, *args)` -> seconds (default: host-synchronized medians, `_median_time`).
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
    timer = timer or _median_time
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="quarot-rtn")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--gammas", default="1,2,3,4,5,6")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--draft", choices=("w4a4", "w4a8"), default="w4a4", help="QSpec draft")
    ap.add_argument("--out", default="experiments/results/bench_qspec.json")
    args = ap.parse_args()
    try:
        batches = [int(x) for x in args.batches.split(",")]
        gammas = [int(x) for x in args.gammas.split(",")]
    except ValueError:
        print("error: --batches and --gammas take comma-separated integers", file=sys.stderr)
        return 2

    import jax

    import qspec_jax
    from pallas_kernels import dispatch
    from qspec_jax.config import preset

    fp = qspec_jax.load("smollm2-135m")
    eng = qspec_jax.load("smollm2-135m", quant=args.quant, group_size=args.group_size)
    live_before = sum(a.nbytes for a in jax.live_arrays())
    n = args.new_tokens
    results = []
    for b in batches:
        prompts = (PROMPTS * (b // len(PROMPTS) + 1))[:b]
        ids = eng.encode(prompts, chat=True)

        def run(engine, mode, ids=ids, **kw):
            engine.generate(ids, mode=mode, max_new_tokens=n, ignore_eos=True, **kw)  # compile
            return engine.generate(ids, mode=mode, max_new_tokens=n, ignore_eos=True, **kw)

        base = {m: run(eng, m) for m in ("w4a16", "w4a4")}
        base["fp"] = run(fp, "fp")
        w4a16_tps = base["w4a16"].stats["tokens_per_s"]
        row = dict(
            batch=b, **{f"{m}_tps": r.stats["tokens_per_s"] for m, r in base.items()}, qspec=[]
        )
        print(
            f"batch {b}: "
            + ", ".join(f"{m} {r.stats['tokens_per_s']:.1f} tok/s" for m, r in base.items()),
            flush=True,
        )
        capacity = 64 * -(-(max(len(i) for i in ids) + n + 8) // 64)
        for g in gammas:
            r = run(eng, "qspec", gamma=g, draft=args.draft)  # as timed by step_times
            s = r.stats
            same = sum(a == c for a, c in zip(r.tokens, base["w4a16"].tokens))
            t = step_times(
                eng,
                len(ids) if len(ids) == b else b,
                g,
                capacity,
                filled=capacity // 2,
                draft=args.draft,
            )
            per_step = s["mean_tokens_per_step"]
            predicted = per_step * t["ar"] / (g * t["draft"] + t["verify"])
            measured = s["tokens_per_s"] / w4a16_tps
            ctx = capacity // 2
            proj = {}
            for name, cfg in (("smollm2-135m", eng.config), ("llama-2-7b", preset("llama-2-7b"))):
                gs = args.group_size
                ar = roofline_step(cfg, gs, dict(batch=b, positions=1), ctx, 16)
                dr = roofline_step(cfg, gs, dict(batch=b, positions=1), ctx, int(args.draft[-1]))
                ve = roofline_step(cfg, gs, dict(batch=b, positions=g + 1), ctx, 16)
                proj[name] = per_step * ar / (g * dr + ve)
            q = dict(
                gamma=g,
                tps=s["tokens_per_s"],
                acceptance=s["acceptance_rate"],
                tokens_per_step=per_step,
                same_tokens_as_w4a16=f"{same}/{b}",
                t_draft_ms=1e3 * t["draft"],
                t_verify_ms=1e3 * t["verify"],
                t_ar_ms=1e3 * t["ar"],
                draft_share=g * t["draft"] / (g * t["draft"] + t["verify"]),
                speedup_measured=measured,
                speedup_predicted=predicted,
                overhead=1 - measured / predicted,
                h100_projected_speedup=proj,
            )
            row["qspec"].append(q)
            print(
                f"  gamma {g}: {s['tokens_per_s']:.1f} tok/s, acceptance {s['acceptance_rate']:.2f}, "
                f"{per_step:.2f} tok/step, measured {measured:.2f}x, predicted {predicted:.2f}x, "
                f"same tokens {same}/{b}",
                flush=True,
            )
        results.append(row)

    meta = dict(
        command="python " + " ".join(sys.argv),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, CPU",
        kernels=dispatch.default_impl(),  # "cpu": the int4 CPU kernels; "xla": XLA's path
        quant=str(eng.qconfig),
        draft=args.draft,
        new_tokens=n,
        weight_bytes=dict(fp_model=fp.weight_bytes, int4_model_serving_all_modes=eng.weight_bytes),
        # device bytes held before and after running every mode: no mode keeps a
        # second (e.g. dequantized) weight copy alive
        live_bytes=dict(before=live_before, after=sum(a.nbytes for a in jax.live_arrays())),
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=2)
    os.replace(tmp, args.out)
    _plots(results, os.path.splitext(args.out)[0] + ".png")  # beside the JSON, same stem
    _table(meta, results)
    return 0


def _table(meta, results):
    print(f"\n{meta['date']}, {meta['machine']}: `{meta['command']}`\n")
    print(
        "| batch | mode | tok/s | vs w4a16 | acceptance | tok/step | predicted | overhead | H100 proj. 135M / 7B |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for m in ("fp", "w4a16", "w4a4"):
            print(
                f"| {r['batch']} | {m} | {r[m + '_tps']:.1f} | {r[m + '_tps'] / r['w4a16_tps']:.2f}x | | | | | |"
            )
        for q in r["qspec"]:
            p = q["h100_projected_speedup"]
            print(
                f"| {r['batch']} | qspec γ={q['gamma']} | {q['tps']:.1f} | {q['speedup_measured']:.2f}x | "
                f"{q['acceptance']:.2f} | {q['tokens_per_step']:.2f} | {q['speedup_predicted']:.2f}x | "
                f"{100 * q['overhead']:.0f}% | {p['smollm2-135m']:.2f}x / {p['llama-2-7b']:.2f}x |"
            )


def _plots(results, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        gs = [q["gamma"] for q in r["qspec"]]
        axes[0].plot(
            gs, [q["tps"] / r["w4a16_tps"] for q in r["qspec"]], "o-", label=f"batch {r['batch']}"
        )
        axes[1].plot(gs, [q["acceptance"] for q in r["qspec"]], "o-", label=f"batch {r['batch']}")
        axes[2].plot(
            gs,
            [q["speedup_predicted"] for q in r["qspec"]],
            "s--",
            label=f"predicted, batch {r['batch']}",
        )
        axes[2].plot(
            gs,
            [q["speedup_measured"] for q in r["qspec"]],
            "o-",
            label=f"measured, batch {r['batch']}",
        )
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set(title="QSpec tokens/s relative to W4A16 (CPU)", xlabel="gamma", ylabel="x W4A16")
    axes[1].set(
        title="Draft acceptance rate", xlabel="gamma", ylabel="accepted / proposed", ylim=(0, 1)
    )
    axes[2].set(
        title="Speedup: predicted from step times vs measured", xlabel="gamma", ylabel="x W4A16"
    )
    for a in axes:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
