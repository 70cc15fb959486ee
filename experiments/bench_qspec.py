"""QSpec against autoregressive decoding on SmolLM2-135M, all in one run.

For each batch size: tokens/s of fp, w4a16 and w4a4 autoregressive decoding and of QSpec at each
gamma; QSpec's acceptance rate and tokens per verify step; the measured time of one draft step
(W4A4, one token), one verify step (W4A16, gamma + 1 tokens) and one W4A16 autoregressive step;
the speedup predicted from those (tokens_per_step * t_ar / (gamma * t_draft + t_verify)) next to
the speedup measured end to end (the gap is the engine's own overhead); and an H100 roofline
projection of the same steps, clearly a projection, not a measurement. Exactly N new tokens per
prompt (EOS ignored), greedy. Writes experiments/results/bench_qspec.json and PNG plots.

    python -m experiments.bench_qspec [--quant quarot-rtn] [--group-size 64] [--batches 1,4,16]
        [--gammas 1,2,3,4,5,6] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import sys

from qspec_jax.bench.common import (
    QSPEC_PROMPTS,
    batch_prompts,
    describe,
    int_list,
    run_meta,
    usage_error,
    write_json,
)
from qspec_jax.bench.qspec_steps import roofline_step, step_times


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
        batches, gammas = int_list(args.batches), int_list(args.gammas)
    except ValueError:
        return usage_error("--batches and --gammas take comma-separated integers")

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
        ids = eng.encode(batch_prompts(QSPEC_PROMPTS, b), chat=True)

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

    meta = run_meta(
        kernels=dispatch.default_impl(),  # "cpu": the int4 CPU kernels; "xla": XLA's path
        quant=str(eng.qconfig),
        draft=args.draft,
        new_tokens=n,
        weight_bytes=dict(fp_model=fp.weight_bytes, int4_model_serving_all_modes=eng.weight_bytes),
        # device bytes held before and after running every mode: no mode keeps a
        # second (e.g. dequantized) weight copy alive
        live_bytes=dict(before=live_before, after=sum(a.nbytes for a in jax.live_arrays())),
    )
    write_json(args.out, dict(meta=meta, results=results))
    _plots(results, os.path.splitext(args.out)[0] + ".png")  # beside the JSON, same stem
    _table(meta, results)
    return 0


def _table(meta, results):
    print(f"\n{describe(meta)}\n")
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
