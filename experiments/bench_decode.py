"""Decode speed of this engine against transformers' `generate` on SmolLM2-135M (CPU, float32).

Same prompts, same run, greedy, exactly N new tokens each (EOS ignored on both sides), batch 1
and 8. Tokens/s counts generated tokens over the wall time of the whole call (prefill included,
compilation excluded: the engine's function is compiled and warmed up first); --repeats timed
runs per side, alternating, and the median is reported. Prints a markdown
table with the ratio and writes experiments/results/bench_decode.json.

    python experiments/bench_decode.py [--new-tokens 64] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle for a ten-year-old.",
    "Give three tips for writing clean Python code.",
    "Why do cats purr?",
    "Summarize the plot of Romeo and Juliet.",
    "How do vaccines train the immune system?",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (median)")
    ap.add_argument("--out", default="experiments/results/bench_decode.json")
    args = ap.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        print(f"error: --batches must be comma-separated integers, got {args.batches!r}", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoModelForCausalLM

    import qspec_jax
    from qspec_jax.eval.harness import write_json_atomic
    from qspec_jax.loading import embedded_gguf_path

    engine = qspec_jax.load("smollm2-135m")
    path = embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    pad = engine.config.pad_token_id

    rows = []
    for b in batches:
        prompts = (PROMPTS * (b // len(PROMPTS) + 1))[:b]
        ids = engine.encode(prompts, chat=True)
        compile_s = engine.generate(  # the first call compiles (or reads the disk cache)
            ids, mode="fp", max_new_tokens=args.new_tokens, ignore_eos=True
        ).stats["compile_s"]

        longest = max(len(i) for i in ids)  # left-padded batch for transformers
        x = torch.full((b, longest), pad, dtype=torch.long)
        mask = torch.zeros((b, longest), dtype=torch.long)
        for r, i in enumerate(ids):
            x[r, longest - len(i):] = torch.tensor(i)
            mask[r, longest - len(i):] = 1
        with torch.no_grad():
            hf.generate(x, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                        pad_token_id=pad)  # warm up
        ours_runs, theirs_runs = [], []
        for _ in range(args.repeats):  # alternating, so drifts of a shared machine hit both
            res = engine.generate(ids, mode="fp", max_new_tokens=args.new_tokens, ignore_eos=True)
            ours_runs.append(res.stats["tokens_generated"] / res.stats["wall_s"])
            with torch.no_grad():
                t0 = time.perf_counter()
                out = hf.generate(x, attention_mask=mask, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False,
                                  pad_token_id=pad)
                hf_wall = time.perf_counter() - t0
            theirs_runs.append((out.shape[1] - longest) * b / hf_wall)
        ours, theirs = statistics.median(ours_runs), statistics.median(theirs_runs)
        same = sum(out[r, longest:].tolist() == res.tokens[r] for r in range(b))
        rows.append(dict(batch=b, qspec_jax_tps=ours, transformers_tps=theirs, ratio=ours / theirs,
                         qspec_jax_runs=ours_runs, transformers_runs=theirs_runs,
                         same_tokens=f"{same}/{b}", compile_s=compile_s))

    meta = dict(
        command="python " + " ".join(sys.argv),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        torch_threads=torch.get_num_threads(),
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        loadavg_at_end=os.getloadavg(),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json_atomic(args.out, dict(meta=meta, rows=rows))
    print(f"\n{meta['date']}, {meta['machine']}: `{meta['command']}`\n")
    print("| batch | qspec-jax fp32 tok/s | transformers fp32 tok/s | ratio | same tokens |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['qspec_jax_tps']:.1f} | {r['transformers_tps']:.1f} | "
              f"{r['ratio']:.2f}x | {r['same_tokens']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
