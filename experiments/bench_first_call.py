"""First-call latency: a fresh `qspec-jax generate` process, cold and warm caches.

Runs the CLI as a new process (as a user would), with `QSPEC_JAX_CACHE_DIR` pointed at a
temporary directory, in three states:

* ``cold``: empty cache directory (the process quantizes, if its mode needs it, and compiles);
* ``quant-warm``: the quantize-once checkpoint is there, the compilation cache is deleted first
  (the process loads the checkpoint and compiles);
* ``warm``: both caches are there from the previous runs (the process loads both).

Per run: the process's wall time (start to exit, Python and JAX import included) and the
generation's `stats["compile_s"]` and `compile_source` from `--json`. `--repeats` runs of the
warm states (median reported); the cold state runs once per repeat in a new directory.

    python -m experiments.bench_first_call [--mode qspec] [--max-new-tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from qspec_jax.bench.common import describe, run_meta, usage_error, write_json


def run_once(cache_dir: str, args) -> dict:
    """One `qspec-jax generate` process; its wall seconds and the JSON stats it printed."""
    env = dict(os.environ, QSPEC_JAX_CACHE_DIR=cache_dir, HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable, "-m", "qspec_jax.cli", "generate", "--prompt", args.prompt,
        "--mode", args.mode, "--max-new-tokens", str(args.max_new_tokens), "--json",
    ]  # fmt: skip
    if args.quant:
        cmd += ["--quant", args.quant]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"qspec-jax generate failed ({proc.returncode}): {proc.stderr[-2000:]}")
    stats = json.loads(proc.stdout.strip().splitlines()[-1])["stats"]
    return dict(
        wall_s=wall,
        compile_s=stats["compile_s"],
        compile_source=stats["compile_source"],
        tokens=stats["tokens_generated"],
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="qspec")
    ap.add_argument("--quant", default=None, help="--quant for the CLI (default: the mode's)")
    ap.add_argument("--prompt", default="Write a haiku about the sea.")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="experiments/results/bench_first_call.json")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        return usage_error(f"--repeats must be at least 1, got {args.repeats}")

    runs = {"cold": [], "quant-warm": [], "warm": []}
    for r in range(args.repeats):
        root = tempfile.mkdtemp(prefix="qspec-first-call-")
        try:
            runs["cold"].append(run_once(root, args))
            shutil.rmtree(os.path.join(root, "jax-cache"), ignore_errors=True)
            runs["quant-warm"].append(run_once(root, args))
            runs["warm"].append(run_once(root, args))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]['wall_s']:.1f}s" for k, v in runs.items()),
              flush=True)  # fmt: skip

    summary = {
        k: dict(
            median_wall_s=statistics.median(x["wall_s"] for x in v),
            median_compile_s=statistics.median(x["compile_s"] for x in v),
            compile_source=sorted({x["compile_source"] for x in v}),
        )
        for k, v in runs.items()
    }
    meta = run_meta(settings=vars(args))
    write_json(args.out, dict(meta=meta, summary=summary, runs=runs))
    print(f"\n{describe(meta)}\n")
    print("| caches | process wall s (median) | compile_s (median) | program from |")
    print("|---|---:|---:|---|")
    for k, v in summary.items():
        print(f"| {k} | {v['median_wall_s']:.1f} | {v['median_compile_s']:.1f} | "
              f"{', '.join(map(str, v['compile_source']))} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
