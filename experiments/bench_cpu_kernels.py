"""The CPU int4 kernels against XLA's path, end to end in the engine, in one run.

For each batch size and each decoding mode (fp, w4a16, w4a8, w4a4, QSpec with a W4A8 draft at
the given gammas), the engine's own compiled program is timed with the matmuls on XLA's path
(`impl="xla"`: dequantized float32 weight copy + dot; per-group int8 dot loop) and on the CPU
kernels (`impl="cpu"`, `pallas_kernels.cpu_kernels`, with the int8 Q8_0 head kernel), and on
the CPU matmul kernels with the float32 head on XLA's dot ("cpu-f32head": the params without
`head_q8`), which isolates the head kernel's share. Time per token = (wall(41 tokens) -
wall(9 tokens)) / 32 with each wall the median of --reps calls, so prefill and compilation drop
out; the two implementations alternate within each round and the median of --rounds rounds is
reported, with every mode's ratio to
W4A16 on the same implementation. QSpec's tokens are checked against W4A16's on the same
implementation (they must be identical). Quantization: the shipped GGUF's codes (quant="gguf").

    python -m experiments.bench_cpu_kernels [--batches 1,8] [--gammas 1,3] [--rounds 3]

Writes experiments/results/bench_cpu_kernels.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from qspec_jax.bench.common import (
    COMPARE_PROMPTS,
    batch_prompts,
    describe,
    int_list,
    run_meta,
    usage_error,
    write_json,
)

PROMPTS = COMPARE_PROMPTS[:4]
IMPLS = ("xla", "cpu", "cpu-f32head")  # the last: CPU matmul kernels, float32 XLA head


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1")
    ap.add_argument("--gammas", default="1,3")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="calls per length per round (median)")
    ap.add_argument(
        "--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}"
    )
    ap.add_argument("--out", default="experiments/results/bench_cpu_kernels.json")
    args = ap.parse_args()
    try:
        batches, gammas = int_list(args.batches), int_list(args.gammas)
        impls = tuple(args.impls.split(","))
        if min(args.rounds, args.reps) < 1 or min(batches) < 1 or min(gammas) < 1:
            raise ValueError
        if not impls or not set(impls) <= set(IMPLS) or "cpu" not in impls:
            raise ValueError
    except ValueError:
        return usage_error(
            "--batches and --gammas take comma-separated positive integers, --rounds and "
            f"--reps >= 1, --impls a subset of {','.join(IMPLS)} that includes cpu"
        )

    import qspec_jax
    from pallas_kernels import cpu_kernels

    if not cpu_kernels.available():
        return usage_error(f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    eng = qspec_jax.load("smollm2-135m", quant="gguf")
    fp = qspec_jax.load("smollm2-135m")
    with_head = {id(e): e.params for e in (eng, fp)}
    float_only = {id(e): e.params.replace(head_q8=None) for e in (eng, fp)}
    modes = [("fp", {}), ("w4a16", {}), ("w4a8", {}), ("w4a4", {})] + [
        ("qspec", dict(gamma=g, draft="w4a8")) for g in gammas
    ]
    t_start = time.time()
    results = []
    for b in batches:
        ids = eng.encode(batch_prompts(PROMPTS, b), chat=True)
        times: dict[tuple, list[float]] = {}
        info: dict[tuple, dict] = {}
        for rnd in range(args.rounds):
            for impl in impls if rnd % 2 == 0 else impls[::-1]:
                for mode, kw in modes:
                    e = fp if mode == "fp" else eng
                    e.impl = "cpu" if impl.startswith("cpu") else impl
                    e.params = with_head[id(e)] if impl != "cpu-f32head" else float_only[id(e)]
                    if rnd == 0:  # compile both programs (one bucket) before timing
                        e.generate(ids, mode=mode, max_new_tokens=41, ignore_eos=True, **kw)
                    walls = {9: [], 41: []}
                    for _ in range(args.reps):
                        for n in walls:
                            long = e.generate(
                                ids, mode=mode, max_new_tokens=n, ignore_eos=True, **kw
                            )
                            walls[n].append(long.stats["wall_s"])
                    key = (impl, mode, kw.get("gamma", 0))
                    times.setdefault(key, []).append(
                        (statistics.median(walls[41]) - statistics.median(walls[9])) / (32 * b)
                    )
                    info[key] = dict(tokens=long.tokens, stats=long.stats)
        for key, ts in times.items():
            impl, mode, g = key
            ms = 1e3 * statistics.median(ts)
            w16 = 1e3 * statistics.median(times[(impl, "w4a16", 0)])
            row = dict(
                batch=b,
                impl=impl,
                mode=mode,
                gamma=g,
                ms_per_token=ms,
                tokens_per_s=1e3 / ms,
                vs_w4a16=w16 / ms,
                vs_xla=(
                    1e3 * statistics.median(times[("xla", mode, g)]) / ms
                    if ("xla", mode, g) in times
                    else None
                ),
                runs_ms=[1e3 * t for t in ts],
            )
            if mode == "qspec":
                st = info[key]["stats"]
                row.update(
                    acceptance=st["acceptance_rate"],
                    tokens_per_step=st["mean_tokens_per_step"],
                    same_tokens_as_w4a16=info[key]["tokens"] == info[(impl, "w4a16", 0)]["tokens"],
                )
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs_ms"}), flush=True)
    meta = run_meta(t_start, quant=str(eng.qconfig))
    write_json(args.out, dict(meta=meta, results=results))
    print(f"\n{describe(meta)}\n")
    print(
        "| batch | mode | XLA path ms/token | CPU kernels, float32 head | CPU kernels + int8 head "
        "| kernels vs XLA | kernels: vs W4A16 | QSpec acceptance | QSpec == W4A16 (kernels / "
        "float32 head / XLA) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")

    def other(r, impl):
        return next(
            (
                q
                for q in results
                if q["impl"] == impl
                and q["mode"] == r["mode"]
                and q["gamma"] == r["gamma"]
                and q["batch"] == r["batch"]
            ),
            None,
        )

    def cell(row, key, fmt):
        return "" if row is None or row.get(key) is None else format(row[key], fmt)

    for r in results:
        if r["impl"] != "cpu":
            continue
        x, f32h = other(r, "xla"), other(r, "cpu-f32head")
        name = r["mode"] + (f" γ={r['gamma']} (W4A8 draft)" if r["mode"] == "qspec" else "")
        acc = cell(r, "acceptance", ".2f")
        same = " / ".join("" if q is None else str(q.get("same_tokens_as_w4a16")) for q in (r, f32h, x))
        print(
            f"| {r['batch']} | {name} | {cell(x, 'ms_per_token', '.1f')} | "
            f"{cell(f32h, 'ms_per_token', '.1f')} | {r['ms_per_token']:.1f} | "
            f"{cell(r, 'vs_xla', '.2f')}x | {r['vs_w4a16']:.2f}x | {acc} | "
            f"{same if 'acceptance' in r else ''} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
