"""XLA:CPU's own per-operation times for one decode step of the engine's compiled program.

Runs `generate` with XLA's per-thunk trace events on (``--xla_cpu_enable_xprof_traceme``) under
``jax.profiler.trace`` for 9 and for 41 new tokens (3 calls each, EOS ignored), reads the
Perfetto JSON the profiler writes, and reports per generated token ((41-token trace − 9-token
trace) / 32, so prefill and compilation drop out): how many thunks (fusions, custom calls,
copies) run, the time summed per kind of thunk, and the custom calls per kernel and output
shape (named from the compiled HLO). Tracing adds a small cost to every thunk, so read the
counts and the shares, not the absolute times; the step time to quote comes from the
benchmarks.

    python -m experiments.trace_step [--modes w4a16,w4a8] [--quant gguf] [--top 12]

Prints one block per mode and writes experiments/results/trace_step.json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

# before anything imports jax: XLA reads its flags once
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()

PROMPT = "Write a short story about a robot who learns to paint."
NOT_THUNKS = (  # host-side events in the trace: Python frames, executor bookkeeping, waits
    "$", "ThunkExecutor", "np.", "PjitFunction", "SlinkyThreadPool", "end:", "Common",
    "ArrayImpl", "Thread", "Handle", "Wait", "PythonRef",
)  # fmt: skip


def _events(trace_dir: str) -> list[dict]:
    path = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and not e["name"].startswith(NOT_THUNKS)]


def _custom_call_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> "<target> <output shape>" for every custom call."""
    names = {}
    for line in hlo_text.split("\n"):
        m = re.search(r"(\S+) = (\S+) custom-call\(.*custom_call_target=\"(\w+)\"", line)
        if m:
            names[m.group(1).lstrip("%")] = f"{m.group(3)} {m.group(2).split('{')[0]}"
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="w4a16,w4a8", help="engine modes (qspec: W4A8 draft)")
    ap.add_argument("--quant", default="gguf")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--top", type=int, default=12, help="thunk kinds printed per mode")
    ap.add_argument("--out", default="experiments/results/trace_step.json")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]

    import jax

    import qspec_jax
    from qspec_jax.bench.common import run_meta, usage_error, write_json

    q = qspec_jax.load("smollm2-135m", quant=args.quant, progress=False)
    bad = [m for m in modes if m not in q.modes]
    if bad:
        return usage_error(f"unknown mode(s) {bad}; this engine has {list(q.modes)}")
    short, long_ = 9, 41
    results = {}
    for mode in modes:
        kw = dict(mode=mode, ignore_eos=True)
        if mode == "qspec":
            kw.update(gamma=args.gamma, draft="w4a8")
        known = set(q._compiled)
        per_len = {}
        for n in (short, long_):
            for _ in range(2):  # compile, then warm
                q.generate([PROMPT], max_new_tokens=n, **kw)
            with tempfile.TemporaryDirectory() as d:
                with jax.profiler.trace(d, create_perfetto_trace=True):
                    for _ in range(3):
                        res = q.generate([PROMPT], max_new_tokens=n, **kw)
                per_len[n] = _events(d)
        names = {}
        for key, fn in q._compiled.items():  # the program(s) this mode's calls compiled
            if key not in known:
                names.update(_custom_call_names(fn.as_text()))

        def totals(events, key):
            t, c = collections.Counter(), collections.Counter()
            for e in events:
                k = key(e["name"])
                if k is not None:
                    t[k] += e.get("dur", 0) / 3
                    c[k] += 1 / 3
            return t, c

        def kind(name):
            return re.sub(r"\.\d+$", "", name)

        def kernel(name, names=names):
            return names.get(name) if name.startswith(("ffi_call", "custom-call")) else None

        steps = long_ - short
        out = {"thunks_per_token": 0.0, "kinds": {}, "custom_calls": {}, "stats": res.stats}
        for key, field in ((kind, "kinds"), (kernel, "custom_calls")):
            (t_l, c_l), (t_s, c_s) = totals(per_len[long_], key), totals(per_len[short], key)
            rows = {
                k: dict(ms_per_token=(t_l[k] - t_s.get(k, 0)) / 1e3 / steps,
                        per_token=(c_l[k] - c_s.get(k, 0)) / steps)
                for k in t_l
            }  # fmt: skip
            out[field] = dict(sorted(rows.items(), key=lambda kv: -kv[1]["ms_per_token"]))
        out["thunks_per_token"] = sum(r["per_token"] for r in out["kinds"].values())
        out["thunk_ms_per_token"] = sum(r["ms_per_token"] for r in out["kinds"].values())
        results[mode] = out
        print(
            f"\n== {mode}: {out['thunks_per_token']:.0f} thunks / token, traced thunk time "
            f"{out['thunk_ms_per_token']:.2f} ms / token"
        )
        for k, r in list(out["kinds"].items())[: args.top]:
            print(f"  {r['ms_per_token']:7.3f} ms  {r['per_token']:6.1f} x  {k}")
        print("  custom calls:")
        for k, r in out["custom_calls"].items():
            print(f"  {r['ms_per_token']:7.3f} ms  {r['per_token']:6.1f} x  {k}")

    meta = run_meta()
    write_json(args.out, dict(meta=meta, modes=results))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
