"""Hierarchical-cache attention on this CPU: the XLA block loop vs the AVX2 kernel vs float KV.

For SmolLM2-135M's attention shapes (30 layers, 9 query heads on 3 KV heads, head_dim 64,
float32), batch 1, R = 128, a cache prefilled with random K/V to each context length, one jitted
call runs the attention of all 30 layers (a `fori_loop` over the layer index, as the model's
layer scan does; the whole cache is far larger than the 32 MiB L3 at long contexts, so the reads
come from memory as in a real decode step) for t = 1 (an autoregressive or draft step) and
t = 6 (gamma = 5 verification) query rows at positions ctx .. ctx + t - 1:

* ``float``: the dense float32 cache (`KVCache.attend`, XLA's attention);
* ``xla-target`` / ``xla-draft``: `HierKVCache.attend` on the XLA block-wise path (int8 / int4);
* ``cpu-target`` / ``cpu-draft``: the same with ``attention_impl="cpu"`` (the AVX2 kernel).

Paths alternate within each round; per path the median over rounds is reported, with the bytes
the path must read (codes + scales + float buffer, or the float cache, summed over layers) and
the achieved GB/s (bytes / median time), and the median process CPU time per call (all threads:
on a machine shared with other jobs wall time includes waiting for a core, CPU time much less).

The machine's read bandwidth is measured in the same run, in the same rounds (so under the same
load): a streaming read of a buffer of the size of the 8k int8 (target) cache of all 30 layers
(`read_bandwidth`: numpy's sum of a float64 array, on one thread and split over two threads; numpy
releases the GIL in the reduction). Each path's ``frac_bw`` is its GB/s over the larger of the
two medians (the machine's best measured read bandwidth), and ``draft_vs_target`` is the cpu-draft
speed over the cpu-target speed (same context and t).

    python -m experiments.bench_hier_attention_cpu [--contexts 1024,2048,4096,8192] [--rounds 15]
        [--paths float,xla-target,xla-draft,cpu-target,cpu-draft]

Writes experiments/results/bench_hier_attention_cpu.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import time

PATHS = ("float", "xla-target", "xla-draft", "cpu-target", "cpu-draft")


def bytes_read(path: str, ctx_pos: int, cfg, residual: int, group: int) -> int:
    """Bytes one call must read for a row at `ctx_pos` (the last row's keys), all layers."""
    nl, kvh, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    n = ctx_pos + 1  # keys the last row reads
    if path == "float":
        return nl * n * kvh * hd * 4 * 2
    cut = residual * max(0, -(-(ctx_pos - 2 * residual) // residual))
    code = 1.0 if path.endswith("target") else 0.5  # bytes per value: both halves or the upper
    codes = cut * kvh * hd * code * 2  # keys and values
    scales = (
        cut // group
    ) * kvh * hd * 8 + cut * kvh * 8  # key (scale, min) per group, values per token
    floats = (n - cut) * kvh * hd * 4 * 2
    return int(nl * (codes + scales + floats))


def read_bandwidth(buf, threads: int, pool) -> float:
    """Seconds to stream-read `buf` (a float64 array) once: numpy sums over `threads` slices."""
    if threads == 1:
        t0 = time.perf_counter()
        buf.sum()
        return time.perf_counter() - t0
    parts = [buf[i * buf.size // threads : (i + 1) * buf.size // threads] for i in range(threads)]
    t0 = time.perf_counter()
    list(pool.map(lambda x: x.sum(), parts))
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="1024,2048,4096,8192")
    ap.add_argument("--ts", default="1,6")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--paths", default=",".join(PATHS), help="subset of " + ",".join(PATHS))
    ap.add_argument("--out", default="experiments/results/bench_hier_attention_cpu.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import cpu_kernels
    from qspec_jax.bench.common import run_meta, write_json
    from qspec_jax.cache import HierKVCache, KVCache
    from qspec_jax.config import preset

    if not cpu_kernels.available():
        print(f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}", file=sys.stderr)
        return 1
    cfg = preset("smollm2-135m")
    nl, kvh, hd, h = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    contexts = [int(x) for x in args.contexts.split(",")]
    ts = [int(x) for x in args.ts.split(",")]
    paths = tuple(args.paths.split(","))
    if not set(paths) <= set(PATHS) or "cpu-target" not in paths:
        print(f"--paths must be a subset of {','.join(PATHS)} including cpu-target",
              file=sys.stderr)  # fmt: skip
        return 2
    rows = []
    # A buffer of the size of the 8k target cache (codes, scales and buffer, all layers).
    bw_bytes = bytes_read("cpu-target", 8192, cfg, args.residual, args.residual)
    bw_buf = np.ones(bw_bytes // 8, np.float64)  # touched: resident before timing
    pool = concurrent.futures.ThreadPoolExecutor(2)
    bw_times = {1: [], 2: []}

    def all_layers(view):
        def f(cache, q, pos):
            def body(i, acc):
                return acc + cache.attend(i, q, pos, view)  # [1, t, h * hd]

            return jax.lax.fori_loop(0, nl, body, jnp.zeros(q.shape[:2] + (h * hd,), q.dtype))

        return jax.jit(f)

    fns = {
        "float": all_layers("target"),
        "target": all_layers("target"),
        "draft": all_layers("draft"),
    }
    for ctx in contexts:
        cap = ctx + max(ts) + 8
        rng = np.random.default_rng(ctx)
        shape = (nl, 1, cap, kvh, hd)
        k = jnp.asarray(
            rng.standard_normal(shape, np.float32) * rng.uniform(0.2, 3.0, hd).astype(np.float32)
        )
        v = jnp.asarray(rng.standard_normal(shape, np.float32))
        lens = jnp.asarray([ctx], jnp.int32)
        fc = KVCache.init(cfg, 1, cap)
        fc = jax.jit(lambda c, s, n: c.finish_prefill(s, n))(
            fc, fc.prefill_cache(cap).replace(k=k, v=v), lens
        )
        caches = {"float": fc}
        for impl in [i for i in ("xla", "cpu") if any(p.startswith(i) for p in paths)]:
            hc = HierKVCache.init(
                cfg, 1, cap, residual=args.residual, step_tokens=max(ts), attention_impl=impl
            )
            scratch = hc.prefill_cache(cap).replace(k=k, v=v)
            caches[impl] = jax.jit(lambda c, s, n: c.finish_prefill(s, n))(hc, scratch, lens)
        del k, v
        group = caches["cpu"].layout.key_group
        for t in ts:
            q = jnp.asarray(rng.standard_normal((1, t, h, hd), np.float32))
            pos = jnp.asarray(ctx + np.arange(t)[None], jnp.int32)  # [1, t]
            calls = {  # path -> (jitted function, cache)
                p: (fns[p.split("-")[-1]], caches[p.split("-")[0]]) for p in paths
            }
            outs = {p: np.asarray(f(c, q, pos)) for p, (f, c) in calls.items()}  # compile
            times = {p: [] for p in paths}
            cpu_times = {p: [] for p in paths}  # process CPU time (all threads) per call
            for _ in range(args.rounds):
                for p in paths:
                    f, c = calls[p]
                    t0, c0 = time.perf_counter(), time.process_time()
                    jax.block_until_ready(f(c, q, pos))
                    times[p].append(time.perf_counter() - t0)
                    cpu_times[p].append(time.process_time() - c0)
                for n in (1, 2):
                    bw_times[n].append(read_bandwidth(bw_buf, n, pool))
            agree = {
                view: float(np.abs(outs[f"cpu-{view}"] - outs[f"xla-{view}"]).max())
                for view in ("target", "draft")
                if f"cpu-{view}" in outs and f"xla-{view}" in outs
            }
            bw = {
                n: bw_bytes / statistics.median(bw_times[n][-args.rounds :]) / 1e9 for n in (1, 2)
            }
            best_bw = max(bw.values())
            for p in paths:
                med = statistics.median(times[p])
                nbytes = bytes_read(p, ctx + t - 1, cfg, args.residual, group)
                rows.append(
                    dict(
                        context=ctx,
                        t=t,
                        path=p,
                        median_ms=med * 1e3,
                        min_ms=min(times[p]) * 1e3,
                        median_cpu_ms=statistics.median(cpu_times[p]) * 1e3,
                        bytes=nbytes,
                        gb_per_s=nbytes / med / 1e9,
                        vs_float=(
                            statistics.median(times["float"]) / med if "float" in times else None
                        ),
                        max_abs_diff_cpu_vs_xla=agree.get(p.split("-")[-1]),
                        read_bw_1thread_gb_per_s=bw[1],
                        read_bw_2threads_gb_per_s=bw[2],
                        frac_bw=nbytes / med / 1e9 / best_bw,
                        draft_vs_target=(
                            statistics.median(times["cpu-target"]) / med
                            if p == "cpu-draft"
                            else None
                        ),
                    )  # fmt: skip
                )
                r = rows[-1]
                print(f"ctx {ctx} t {t} {p:11s} {r['median_ms']:8.2f} ms  {nbytes / 1e6:7.1f} MB "
                      f"{r['gb_per_s']:6.1f} GB/s  {100 * r['frac_bw']:5.1f}% of "
                      f"{best_bw:.1f} GB/s (1 thr {bw[1]:.1f})"
                      + (f"  draft/target {r['draft_vs_target']:.2f}x" if r["draft_vs_target"]
                         else ""), flush=True)  # fmt: skip
        del caches, calls

    print("\n| context | t | path | median ms (30 layers) | CPU ms | MB read | GB/s | % of read bw "
          "| draft vs target | speed vs float KV |")  # fmt: skip
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        dvt = f"{r['draft_vs_target']:.2f}x" if r["draft_vs_target"] else ""
        vsf = f"{r['vs_float']:.2f}x" if r["vs_float"] else ""
        print(f"| {r['context']} | {r['t']} | {r['path']} | {r['median_ms']:.2f} | "
              f"{r['median_cpu_ms']:.1f} | {r['bytes'] / 1e6:.1f} | {r['gb_per_s']:.1f} | {100 * r['frac_bw']:.0f}% | {dvt} "
              f"| {vsf} |")  # fmt: skip
    med_bw = {n: statistics.median(bw_times[n]) for n in (1, 2)}
    print(f"read bandwidth ({bw_bytes / 1e6:.1f} MB buffer, median of {len(bw_times[1])}): "
          f"1 thread {bw_bytes / med_bw[1] / 1e9:.1f} GB/s, 2 threads "
          f"{bw_bytes / med_bw[2] / 1e9:.1f} GB/s")  # fmt: skip
    meta = run_meta(
        jax=jax.__version__, model_shapes="smollm2-135m",
        residual=args.residual, rounds=args.rounds, batch=1, paths=list(paths),
        read_bw_buffer_bytes=bw_bytes,
        read_bw_1thread_gb_per_s=bw_bytes / med_bw[1] / 1e9,
        read_bw_2threads_gb_per_s=bw_bytes / med_bw[2] / 1e9,
    )  # fmt: skip
    write_json(args.out, dict(meta=meta, rows=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
