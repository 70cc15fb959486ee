"""Where a bfloat16 W4A16 decode step's time goes against float32's (SmolLM2-135M, CPU kernels).

For each dtype: the embedded SmolLM2 with the GGUF's int4 codes (quant="gguf"), one-token
`forward` at precision "w4a16" over a float KV cache of --capacity slots (donated, as in the
engine), compiled with the decoding programs' options (`loop.EXACT_ROUNDING`). Prints and
records:

* the step's median wall time (the two dtypes alternating call by call, --reps each);
* the compiled program's top-level operations by kind (custom calls by target, fusions by
  their computation's name): whether bfloat16's activation conversions around the int4 CPU
  kernels are separate operations or fused into their neighbours;
* the XLA:CPU operations that took the most time, from a `jax.profiler` trace of --reps steps
  (`jax.profiler.ProfileData`; per step, summed over threads).

    python -m experiments.profile_bf16_step [--capacity 128] [--reps 20] [--top 12]

Writes experiments/results/profile_bf16_step.json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

from qspec_jax.bench.common import describe, run_meta, usage_error, write_json

DTYPES = ("float32", "bfloat16")


def _compile(dtype: str, capacity: int):
    import jax
    import jax.numpy as jnp

    import qspec_jax
    from qspec_jax.cache.kv_cache import KVCache
    from qspec_jax.decoding.loop import EXACT_ROUNDING
    from qspec_jax.model.llama import forward

    eng = qspec_jax.load("smollm2-135m", quant="gguf", dtype=dtype, progress=False)
    cfg, qcfg = eng.config, eng.qconfig
    ids = jnp.zeros((1, 1), jnp.int32)  # [batch, t]
    cache = KVCache.init(cfg, 1, capacity)
    step = jax.jit(lambda p, ids, c: forward(p, ids, c, cfg, qcfg, "w4a16"), donate_argnums=2)
    compiled = step.lower(eng.params, ids, cache).compile(EXACT_ROUNDING)
    state = {"cache": cache}

    def call():
        logits, state["cache"] = compiled(eng.params, ids, state["cache"])
        jax.block_until_ready(logits)

    call()
    return call, compiled.as_text()


def _op_counts(hlo: str) -> dict[str, int]:
    """Top-level operations of the entry computation by kind (parameters left out)."""
    ops: collections.Counter = collections.Counter()
    for line in hlo[hlo.index("ENTRY") :].splitlines()[1:]:
        m = re.search(r"= \S+ ([\w-]+)\(", line)
        if not m or m.group(1) == "parameter":
            continue
        op = m.group(1)
        if op == "custom-call":
            op += ":" + re.search(r'custom_call_target="(\w+)"', line).group(1)
        elif op == "fusion":
            op += ":" + re.sub(r"[.\d]+$", "", re.search(r"calls=%?([\w.\-]+)", line).group(1))
        ops[op] += 1
    return dict(sorted(ops.items()))


def _profile(call, reps: int, top: int) -> list[dict]:
    """The XLA:CPU operations with the most time per step in a jax.profiler trace."""
    import jax
    from jax.profiler import ProfileData

    d = tempfile.mkdtemp(prefix="profile-bf16-")
    with jax.profiler.trace(d):
        for _ in range(reps):
            call()
    path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
    ns: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):  # XLA's threads, not Python's
                continue
            for ev in line.events:
                if ev.name.startswith("ThunkExecutor"):
                    continue
                key = re.sub(r"[.\d]+$", "", ev.name)
                ns[key] += ev.duration_ns
                count[key] += 1
    return [
        dict(op=k, ms_per_step=v / 1e6 / reps, calls_per_step=count[k] / reps)
        for k, v in ns.most_common(top)
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", default="experiments/results/profile_bf16_step.json")
    args = ap.parse_args()
    if min(args.capacity, args.reps, args.top) < 1:
        return usage_error("--capacity, --reps and --top must be >= 1")
    t0 = time.time()
    calls, ops = {}, {}
    for dt in DTYPES:
        calls[dt], hlo = _compile(dt, args.capacity)
        ops[dt] = _op_counts(hlo)
    walls: dict[str, list[float]] = {dt: [] for dt in DTYPES}
    for _ in range(args.reps):  # alternating: the machine's load moves
        for dt in DTYPES:
            s = time.perf_counter()
            calls[dt]()
            walls[dt].append(time.perf_counter() - s)
    rows = {}
    for dt in DTYPES:
        rows[dt] = dict(
            step_ms=1e3 * statistics.median(walls[dt]),
            top_level_ops=sum(ops[dt].values()),
            ops=ops[dt],
            profile=_profile(calls[dt], args.reps, args.top),
        )
    meta = run_meta(t0, module="experiments.profile_bf16_step")
    write_json(args.out, dict(meta=meta, capacity=args.capacity, dtypes=rows))
    print(f"\n{describe(meta)}\n")
    for dt, r in rows.items():
        print(f"{dt}: step {r['step_ms']:.1f} ms (median of {args.reps}), "
              f"{r['top_level_ops']} top-level ops")  # fmt: skip
        for k, v in r["ops"].items():
            print(f"    {v:5d}  {k}")
        print("  most time (ms/step, calls/step):")
        for p in r["profile"]:
            print(f"    {p['ms_per_step']:8.3f}  {p['calls_per_step']:6.1f}  {p['op']}")
    ratio = rows["float32"]["step_ms"] / rows["bfloat16"]["step_ms"]
    print(f"\nbfloat16 step speed vs float32: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
