"""Continuous batching against static batches: every HumanEval prompt, W4A16 and QSpec.

Static: the prompts in their order, 8 at a time through `Engine.generate` (each batch waits
for its slowest row). Continuous: `Engine.generate_many(batch_size=8)`, a finished row takes
the next prompt in place. Same engine, same process, greedy, generation stops at EOS or at
`--max-new-tokens`. Every configuration is compiled before it is timed (static: the timed
wall is the sum of the calls' `stats["wall_s"]`, which excludes compiling; continuous: a
warm-up call over one prompt of every prompt-length bucket compiles the same programs). Both
paths' tokens are compared prompt by prompt.

    python -m experiments.bench_continuous [--start 0] [--limit 164] [--methods w4a16,qspec]

On a busy machine the run can be made in parts (`--start`/`--limit` pick HumanEval problems
[start, start + limit), `--methods` one method at a time); each part writes its own JSON
(atomically) with its range in the metadata, and the parts' walls and tokens add up.
Writes experiments/results/bench_continuous.json (or `--out`) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--start", type=int, default=0, help="first HumanEval problem")
    ap.add_argument("--limit", type=int, default=164, help="HumanEval problems (all: 164)")
    ap.add_argument("--methods", default="w4a16,qspec", help="comma-separated: w4a16, qspec")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--chunk-steps", type=int, default=8)
    ap.add_argument("--out", default="experiments/results/bench_continuous.json")
    args = ap.parse_args(argv)

    import qspec_jax
    from qspec_jax.bench.common import run_meta, write_json
    from qspec_jax.eval.humaneval import build_prompt, load_humaneval

    started = time.time()
    load_at_start = os.getloadavg()
    problems = load_humaneval()[args.start : args.start + args.limit]
    prompts = [build_prompt(p)[0] for p in problems]
    chat = build_prompt(problems[0])[1]
    eng = qspec_jax.load("smollm2-135m", quant="gguf", progress=False)
    ids = eng.encode(prompts, chat=chat)
    n_new, bs = args.max_new_tokens, args.batch_size
    known = {"w4a16": qspec_jax.AR("w4a16"), "qspec": qspec_jax.QSpec(args.gamma)}
    methods = {
        (m if m == "w4a16" else f"{m} g{args.gamma}"): known[m] for m in args.methods.split(",")
    }
    # one prompt per prompt-length bucket: generate_many prefills each prompt in its own bucket
    buckets = {}
    for i, t in enumerate(ids):
        buckets.setdefault(max(16, 1 << (len(t) - 1).bit_length()), i)
    rows = []
    for name, method in methods.items():
        # static batches (compile outside the timed wall: stats["wall_s"] excludes it)
        static_tokens, static_wall, compile_s = [], 0.0, 0.0
        for s in range(0, len(ids), bs):
            res = eng.generate(ids[s : s + bs], method, max_new_tokens=n_new)
            if res.stats["compile_source"] != "memory":  # first use of this shape: run again
                compile_s += res.stats["compile_s"]
                res = eng.generate(ids[s : s + bs], method, max_new_tokens=n_new)
            static_tokens += res.tokens
            static_wall += res.stats["wall_s"]
        # continuous batching: warm up the same programs, then time the whole run
        warm = [ids[i] for i in buckets.values()]
        eng.generate_many(warm, method, max_new_tokens=n_new, batch_size=bs,
                          chunk_steps=args.chunk_steps)  # fmt: skip
        t0 = time.perf_counter()
        cont = eng.generate_many(
            ids, method, max_new_tokens=n_new, batch_size=bs, chunk_steps=args.chunk_steps
        )
        cont_wall = time.perf_counter() - t0
        n_tok = sum(len(t) for t in static_tokens)
        same = sum(a == b for a, b in zip(static_tokens, cont.tokens))
        for kind, wall, toks in (
            ("static", static_wall, n_tok),
            ("continuous", cont_wall, cont.stats["tokens_generated"]),
        ):
            rows.append(
                dict(method=name, batching=kind, wall_s=wall, tokens=toks, tokens_per_s=toks / wall,
                     same_tokens=f"{same}/{len(ids)}",
                     acceptance=cont.stats.get("acceptance_rate") if kind == "continuous" else None)
            )  # fmt: skip
        rows[-1]["speedup_vs_static"] = rows[-1]["tokens_per_s"] / rows[-2]["tokens_per_s"]
        print(name, rows[-2:], flush=True)
    meta = run_meta(
        started, prompts=len(ids), humaneval_range=[args.start, args.start + len(ids)],
        load_average_at_start=[round(x, 2) for x in load_at_start],
        max_new_tokens=n_new, batch_size=bs, chunk_steps=args.chunk_steps,
    )  # fmt: skip
    write_json(args.out, dict(meta=meta, rows=rows))
    print("| method | batching | wall s | tokens | tokens/s | vs static | same tokens |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        vs = f"{r['speedup_vs_static']:.2f}x" if "speedup_vs_static" in r else "1.00x"
        print(f"| {r['method']} | {r['batching']} | {r['wall_s']:.1f} | {r['tokens']} | "
              f"{r['tokens_per_s']:.1f} | {vs} | {r['same_tokens']} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
