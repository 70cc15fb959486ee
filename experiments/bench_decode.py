"""Decode speed of this engine against transformers' `generate` on SmolLM2-135M (CPU, float32).

Same prompts, same run, greedy, exactly N new tokens each (EOS ignored on both sides), batch 1
and 8. Tokens/s counts generated tokens over the wall time of the whole call (prefill included,
compilation excluded: the engine's function is compiled and warmed up first); --repeats timed
runs per side, alternating, and the median is reported. Prints a markdown
table with the ratio and writes experiments/results/bench_decode.json.

    python -m experiments.bench_decode [--new-tokens 64] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from qspec_jax.bench.common import (
    DECODE_PROMPTS,
    batch_prompts,
    describe,
    int_list,
    left_padded,
    run_meta,
    usage_error,
    write_json,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (median)")
    ap.add_argument("--out", default="experiments/results/bench_decode.json")
    args = ap.parse_args()
    try:
        batches = int_list(args.batches)
    except ValueError:
        return usage_error(f"--batches must be comma-separated integers, got {args.batches!r}")

    import torch
    from transformers import AutoModelForCausalLM

    import qspec_jax
    from qspec_jax.loading import embedded_gguf_path

    engine = qspec_jax.load("smollm2-135m")
    path = embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    pad = engine.config.pad_token_id

    rows = []
    for b in batches:
        ids = engine.encode(batch_prompts(DECODE_PROMPTS, b), chat=True)
        compile_s = engine.generate(  # the first call compiles (or reads the disk cache)
            ids, mode="fp", max_new_tokens=args.new_tokens, ignore_eos=True
        ).stats["compile_s"]

        x, mask, longest = left_padded(ids, pad)  # [b, longest] each, for transformers
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

    meta = run_meta(
        torch_threads=torch.get_num_threads(), new_tokens=args.new_tokens, repeats=args.repeats
    )
    write_json(args.out, dict(meta=meta, rows=rows))
    print(f"\n{describe(meta)}\n")
    print("| batch | qspec-jax fp32 tok/s | transformers fp32 tok/s | ratio | same tokens |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['qspec_jax_tps']:.1f} | {r['transformers_tps']:.1f} | "
              f"{r['ratio']:.2f}x | {r['same_tokens']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
