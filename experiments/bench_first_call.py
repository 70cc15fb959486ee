"""First-call latency: a fresh `qspec-jax generate` process, cold and warm caches.

Runs the CLI as a new process (as a user would), with `QSPEC_JAX_CACHE_DIR` pointed at a
temporary directory, for every mode (`--modes`, default all of them), in up to three states
(`--states`, default cold and warm):

* ``cold``: empty cache directory (the process quantizes, if its mode needs it, and compiles);
* ``quant-warm``: the quantize-once checkpoint is there, the compilation cache is deleted first
  (the process loads the checkpoint and compiles);
* ``warm``: both caches are there from the previous runs (the process loads both; its
  generation program is read as an exported program, `qspec_jax.exported`, not traced);
* ``warm-traced``: as warm, with ``QSPEC_JAX_EXPORT_CACHE=0`` (the program is traced and
  lowered, and its executable read from JAX's cache; one unrecorded run before writes that
  executable, a different module from the exported program's): the baseline for the exported
  programs, measured in the same run.

Per run: the process's wall time (start to exit, Python and JAX import included) and the
generation's `stats["compile_s"]` and `compile_source` from `--json`. `--repeats` rounds per
mode, each in a new directory (cold, then the warm states after it); medians reported.

    python -m experiments.bench_first_call [--modes fp,qspec] [--states cold,warm] [--repeats 3]

To compare two versions of the code, run it from each checkout's root: the CLI subprocesses
import `qspec_jax` from the current directory.
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


def run_once(cache_dir: str, args, mode: str, export: bool = True) -> dict:
    """One `qspec-jax generate` process; its wall seconds and the JSON stats it printed."""
    env = dict(os.environ, QSPEC_JAX_CACHE_DIR=cache_dir, HF_HUB_OFFLINE="1")
    env["QSPEC_JAX_EXPORT_CACHE"] = "1" if export else "0"
    cmd = [
        sys.executable, "-m", "qspec_jax.cli", "generate", "--prompt", args.prompt,
        "--mode", mode, "--max-new-tokens", str(args.max_new_tokens), "--json",
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
        program_trace=stats.get("program_trace"),
        tokens=stats["tokens_generated"],
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="fp,w4a16,w4a4,w4a8,qspec,quantspec,hspec")
    ap.add_argument(
        "--states", default="cold,warm,warm-traced", help="of cold, quant-warm, warm, warm-traced"
    )
    ap.add_argument("--quant", default=None, help="--quant for the CLI (default: the mode's)")
    ap.add_argument("--prompt", default="Write a haiku about the sea.")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="rounds per mode, each from cold")
    ap.add_argument("--warm-repeats", type=int, default=1,
                    help="runs of each warm state per round (the median is over all of them)")
    ap.add_argument("--out", default="experiments/results/bench_first_call.json")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warm_repeats < 1:
        return usage_error(
            f"--repeats and --warm-repeats must be at least 1, got {args.repeats} and "
            f"{args.warm_repeats}"
        )

    states = args.states.split(",")
    known = {"cold", "quant-warm", "warm", "warm-traced"}
    if "cold" not in states or not set(states) <= known:
        return usage_error(
            "--states must list cold, then optionally quant-warm, warm and warm-traced: "
            f"got {args.states!r}"
        )
    started = time.time()
    runs = {m: {k: [] for k in states} for m in args.modes.split(",")}
    for mode, by_state in runs.items():
        for r in range(args.repeats):
            root = tempfile.mkdtemp(prefix="qspec-first-call-")
            try:
                by_state["cold"].append(run_once(root, args, mode))
                if "quant-warm" in states:
                    shutil.rmtree(os.path.join(root, "jax-cache"), ignore_errors=True)
                    by_state["quant-warm"].append(run_once(root, args, mode))
                if "warm-traced" in states:
                    # a traced program is another module than Exported.call's, with its own
                    # entry in JAX's cache: one unrecorded run writes it
                    run_once(root, args, mode, export=False)
                for _ in range(args.warm_repeats):  # alternating, so load drifts hit both
                    if "warm" in states:
                        by_state["warm"].append(run_once(root, args, mode))
                    if "warm-traced" in states:
                        by_state["warm-traced"].append(run_once(root, args, mode, export=False))
            finally:
                shutil.rmtree(root, ignore_errors=True)
            print(f"{mode} repeat {r + 1}: "
                  + ", ".join(f"{k} {v[-1]['wall_s']:.1f}s" for k, v in by_state.items()),
                  flush=True)  # fmt: skip

    summary = {
        m: {
            k: dict(
                median_wall_s=statistics.median(x["wall_s"] for x in v),
                median_compile_s=statistics.median(x["compile_s"] for x in v),
                compile_source=sorted({x["compile_source"] for x in v}),
                program_trace=sorted({str(x.get("program_trace")) for x in v}),
            )
            for k, v in by_state.items()
        }
        for m, by_state in runs.items()
    }
    meta = run_meta(started, settings=vars(args), cwd=os.getcwd())
    write_json(args.out, dict(meta=meta, summary=summary, runs=runs))
    print(f"\n{describe(meta)}\n")
    print("| mode | caches | process wall s (median) | compile_s (median) | executable | trace |")
    print("|---|---|---:|---:|---|---|")
    for m, by_state in summary.items():
        for k, v in by_state.items():
            print(f"| {m} | {k} | {v['median_wall_s']:.1f} | {v['median_compile_s']:.1f} | "
                  f"{', '.join(map(str, v['compile_source']))} | "
                  f"{', '.join(v['program_trace'])} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
