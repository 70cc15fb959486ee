"""bfloat16 against float32 on the CPU kernels, in one run: the engine and the kernels alone.

Engine: the embedded SmolLM2-135M with the shipped GGUF's int4 codes (quant="gguf"), loaded in
float32 and in bfloat16 (`load(..., dtype=...)`), W4A16 autoregressive decoding and QSpec
(W4A8 draft, gamma 3) at batch 1 on the default (CPU kernel) path. Time per token =
(wall(41 tokens) - wall(9 tokens)) / 32, each wall the median of --reps calls, so prefill and
compilation drop out; the dtypes alternate within each round and the median of --rounds rounds is
reported. QSpec's tokens are checked against W4A16's in each dtype (they must be identical).

Kernels alone (median of --kernel-reps jitted calls, the two dtypes alternating call by call): the W4A16
matmul at SmolLM2's shapes (bfloat16 activations converted at the call boundary), the fused
W4A8 quantize + matmul, float-cache attention over a 1024-token cache (bfloat16 cache read by the
kernel), the float LM head kernel (float32 vs bfloat16 weights, 576 x 49152) next to XLA's dot
on the same head, and the Q8_0 head.

    python -m experiments.bench_bf16 [--rounds 3] [--reps 3] [--kernel-reps 50]

Writes experiments/results/bench_bf16.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from qspec_jax.bench.common import (
    COMPARE_PROMPTS,
    describe,
    run_meta,
    usage_error,
    write_json,
)

DTYPES = ("float32", "bfloat16")
MODES = (("w4a16", {}), ("qspec", dict(gamma=3, draft="w4a8")))


def bench_engine(rounds: int, reps: int) -> list[dict]:
    import qspec_jax

    engines = {dt: qspec_jax.load("smollm2-135m", quant="gguf", dtype=dt) for dt in DTYPES}
    ids = engines["float32"].encode(COMPARE_PROMPTS[:1], chat=True)
    times: dict[tuple, list[float]] = {}
    info: dict[tuple, dict] = {}
    for rnd in range(rounds):
        for dt in DTYPES if rnd % 2 == 0 else DTYPES[::-1]:
            e = engines[dt]
            for mode, kw in MODES:
                if rnd == 0:  # compile before timing
                    e.generate(ids, mode=mode, max_new_tokens=41, ignore_eos=True, **kw)
                walls = {9: [], 41: []}
                for _ in range(reps):
                    for n in walls:
                        res = e.generate(ids, mode=mode, max_new_tokens=n, ignore_eos=True, **kw)
                        walls[n].append(res.stats["wall_s"])
                key = (dt, mode)
                times.setdefault(key, []).append(
                    (statistics.median(walls[41]) - statistics.median(walls[9])) / 32
                )
                info[key] = dict(tokens=res.tokens, stats=res.stats)
    rows = []
    for (dt, mode), ts in times.items():
        ms = 1e3 * statistics.median(ts)
        row = dict(
            dtype=dt,
            mode=mode,
            ms_per_token=ms,
            tokens_per_s=1e3 / ms,
            vs_float32=1e3 * statistics.median(times[("float32", mode)]) / ms,
            runs_ms=[1e3 * t for t in ts],
            head=("q8_0 kernel" if engines[dt].params.head_q8 is not None else "float kernel"),
            kv_bytes_per_token=info[(dt, mode)]["stats"].get("kv_bytes_per_token"),
        )
        if mode == "qspec":
            row.update(
                acceptance=info[(dt, mode)]["stats"]["acceptance_rate"],
                same_tokens_as_w4a16=info[(dt, mode)]["tokens"] == info[(dt, "w4a16")]["tokens"],
            )
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "runs_ms"}), flush=True)
    return rows


def bench_kernels(reps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp

    from pallas_kernels import cpu_kernels, dispatch
    from pallas_kernels.int4 import pack_int4

    key = jax.random.key(0)

    def weight(k, n, g=32):
        codes = jax.random.randint(key, (k, n), 0, 16)
        packed = pack_int4(codes)
        scales = jnp.full((k // g, n), 0.01, jnp.float32)
        mins = jnp.full((k // g, n), -0.08, jnp.float32)
        return packed, scales, mins

    cases = []
    for k, n in ((576, 1536), (1536, 576)):
        packed, scales, mins = weight(k, n)
        for m in (1, 4):
            x = jax.random.normal(key, (m, k))
            f = jax.jit(cpu_kernels.w4a16_matmul_cpu)
            cases.append((f"w4a16 M={m} K={k} N={n}", f, lambda dt, x=x: (x.astype(dt),),
                          (packed, scales, mins)))  # fmt: skip
            fq = jax.jit(
                lambda x, p, s, mn: cpu_kernels.quantize_w4ax_matmul_cpu(
                    x, p, s, mn, bits=8, group_size=0, out_dtype=x.dtype
                )
            )
            cases.append((f"fused w4a8 M={m} K={k} N={n}", fq, lambda dt, x=x: (x.astype(dt),),
                          (packed, scales, mins)))  # fmt: skip
    s_cap, pos = 1024, 500
    for t in (1, 4):
        ks = jax.random.split(key, 3)
        q = jax.random.normal(ks[0], (1, t, 9, 64))
        kc = jax.random.normal(ks[1], (1, s_cap, 3, 64))
        vc = jax.random.normal(ks[2], (1, s_cap, 3, 64))
        p = jnp.arange(t, dtype=jnp.int32)[None] + pos
        att = jax.jit(lambda q, k, v, p: cpu_kernels.attention_cpu(q, k, v, p).astype(q.dtype))
        cases.append((f"attention T={t}, {pos + t} live keys of {s_cap}", att,
                      lambda dt, q=q, kc=kc, vc=vc: (q.astype(dt), kc.astype(dt), vc.astype(dt)),
                      (p,)))  # fmt: skip
    w = 0.05 * jax.random.normal(key, (576, 49152))
    x = jax.random.normal(key, (1, 576))
    cases.append(("float head M=1 576x49152", jax.jit(cpu_kernels.float_head_cpu),
                  lambda dt: (x.astype(dt), w.astype(dt)), ()))  # fmt: skip
    cases.append(("XLA's dot (the head without the kernel) M=1 576x49152",
                  jax.jit(dispatch.float_matmul_xla),
                  lambda dt: (x.astype(dt), w.astype(dt)), ()))  # fmt: skip
    codes = jax.random.randint(key, (49152, 576), -127, 128).astype(jnp.int8)
    qs = jnp.full((49152, 576 // 32), 0.01, jnp.float32)
    cases.append(("q8_0 head M=1 49152x576", jax.jit(cpu_kernels.q8_matmul_cpu),
                  lambda dt: (x.astype(dt),), (codes, qs)))  # fmt: skip
    rows = []
    for name, fn, make, rest in cases:
        calls = {}
        for dt in (jnp.float32, jnp.bfloat16):
            args = (*make(dt), *rest)
            jax.block_until_ready(fn(*args))  # compile and warm up
            calls[jnp.dtype(dt).name] = (fn, args)
        # The two dtypes alternate call by call (the machine's load moves): median of each.
        ts = {k: [] for k in calls}
        for _ in range(reps):
            for k, (f, args) in calls.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args))
                ts[k].append(time.perf_counter() - t0)
        us = {k: 1e6 * statistics.median(v) for k, v in ts.items()}
        row = dict(kernel=name, float32_us=us["float32"], bfloat16_us=us["bfloat16"],
                   bf16_vs_f32=us["float32"] / us["bfloat16"])  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="engine calls per length per round")
    ap.add_argument("--kernel-reps", type=int, default=50)
    ap.add_argument("--skip-engine", action="store_true", help="kernels alone only")
    ap.add_argument("--out", default="experiments/results/bench_bf16.json")
    args = ap.parse_args()
    if min(args.rounds, args.reps, args.kernel_reps) < 1:
        return usage_error("--rounds, --reps and --kernel-reps must be >= 1")
    from pallas_kernels import cpu_kernels

    if not cpu_kernels.available():
        return usage_error(f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    t0 = time.time()
    kernels = bench_kernels(args.kernel_reps)
    engine = [] if args.skip_engine else bench_engine(args.rounds, args.reps)
    meta = run_meta(t0, module="experiments.bench_bf16")
    write_json(args.out, dict(meta=meta, kernels=kernels, engine=engine))
    print(f"\n{describe(meta)}\n")
    print("| kernel | float32 µs | bfloat16 µs | bfloat16 speed vs float32 |")
    print("|---|---:|---:|---:|")
    for r in kernels:
        print(f"| {r['kernel']} | {r['float32_us']:.1f} | {r['bfloat16_us']:.1f} | "
              f"{r['bf16_vs_f32']:.2f}x |")  # fmt: skip
    if engine:
        print("\n| mode | dtype | ms/token | tokens/s | vs float32 | LM head | KV B/token | "
              "QSpec acceptance | QSpec == W4A16 |")  # fmt: skip
        print("|---|---|---:|---:|---:|---|---:|---:|---|")
        for r in engine:
            print(f"| {r['mode']} | {r['dtype']} | {r['ms_per_token']:.1f} | "
                  f"{r['tokens_per_s']:.1f} | {r['vs_float32']:.2f}x | {r['head']} | "
                  f"{r['kv_bytes_per_token']} | {r.get('acceptance', '')} | "
                  f"{r.get('same_tokens_as_w4a16', '')} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
