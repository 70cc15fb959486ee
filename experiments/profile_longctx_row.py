"""Where one row of bench_longctx spends its decode time: the XLA:CPU operations by time.

Builds exactly what `experiments.bench_longctx` times for the chosen rows (the same prompt,
prefill, hierarchical-cache fill and compiled decode loop of --new-tokens tokens), runs each
row's loop --reps times (rows alternating) for the median wall time, then traces --reps more
runs with `jax.profiler` and lists the operations with the most time per decode token (summed
over XLA's threads, so two busy threads can add up to more than the wall time).

    python -m experiments.profile_longctx_row --dtype bfloat16 --context 1024 \
        [--rows fp-float,fp-hier] [--gamma 3] [--reps 3] [--top 15]

Rows: fp-float, fp-hier, w4a16-float, w4a16-hier, quantspec-fp (at --gamma). Writes
experiments/results/profile_longctx_row.json (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

from experiments.bench_longctx import _decoder, _mode_state, _prefill_state, build_prompt
from experiments.profile_bf16_step import _profile
from qspec_jax.bench.common import describe, run_meta, usage_error, write_json

ROWS = ("fp-float", "fp-hier", "w4a16-float", "w4a16-hier", "quantspec-fp")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--rows", default="fp-float,fp-hier")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", default="experiments/results/profile_longctx_row.json")
    args = ap.parse_args()
    rows = args.rows.split(",")
    if not set(rows) <= set(ROWS):
        return usage_error(f"--rows must be a subset of {','.join(ROWS)}, got {args.rows!r}")
    if min(args.context, args.reps, args.top, args.gamma, args.new_tokens) < 1:
        return usage_error("--context, --reps, --top, --gamma and --new-tokens must be >= 1")

    import jax
    import jax.numpy as jnp

    import qspec_jax
    from qspec_jax.cache import make_cache

    t0 = time.time()
    eng = qspec_jax.load("smollm2-135m", draft_quant="gguf", dtype=args.dtype, progress=False)
    ids, _ = build_prompt(eng.tokenizer, args.context)

    def dconf(row):
        prec, kv = row.split("-")
        if prec == "quantspec":
            m = eng.method("quantspec", gamma=args.gamma, verify="fp")
            kv = "hier"
        else:
            m = eng.method(prec)
        return kv, dataclasses.replace(eng.decode_config(m, args.new_tokens), eos_ids=())

    dcs = {row: dconf(row) for row in rows}
    plan = max((dc for _, dc in dcs.values()), key=lambda d: d.tokens_per_step)
    calls, prefilled = {}, {}
    for row, (kv, dc) in dcs.items():
        prec = dc.main_precision
        if prec not in prefilled:  # one prefill per precision, as bench_longctx does
            prefilled[prec] = _prefill_state(
                eng, ids, "float", dataclasses.replace(plan, method=eng.method(prec)),
                args.residual,
            )  # fmt: skip
        st, _, cap = prefilled[prec]
        if kv == "hier":
            hc = make_cache("hier", eng.config, 1, cap, residual=args.residual,
                            step_tokens=plan.tokens_per_step)  # fmt: skip
            lens = jnp.asarray([len(ids)], jnp.int32)
            fill = jax.jit(lambda c, s, n: c.finish_prefill(s, n))
            st = st.replace(cache=jax.block_until_ready(fill(hc, st.cache, lens)))
        s0 = _mode_state(st, dc)
        fn = _decoder(eng, s0, dc)
        calls[row] = lambda fn=fn, s0=s0: jax.block_until_ready(fn(s0, eng.params))
        calls[row]()  # warm
    walls = {row: [] for row in rows}
    for _ in range(args.reps):
        for row in rows:
            s = time.perf_counter()
            final = calls[row]()
            walls[row].append(time.perf_counter() - s)
    tokens = int(final.num_generated[0]) - 1  # decode tokens after the prefill's first
    out = {}
    for row in rows:
        prof = _profile(calls[row], args.reps, args.top)
        for p in prof:  # per decode token instead of per loop run
            p["ms_per_token"] = p.pop("ms_per_step") / tokens
            p["calls_per_token"] = p.pop("calls_per_step") / tokens
        out[row] = dict(ms_per_token=1e3 * statistics.median(walls[row]) / tokens, profile=prof)
    meta = run_meta(t0, module="experiments.profile_longctx_row")
    write_json(args.out, dict(meta=meta, dtype=args.dtype, context=args.context,
                              decode_tokens=tokens, rows=out))  # fmt: skip
    print(f"\n{describe(meta)}\n")
    for row, r in out.items():
        print(f"{row}: {r['ms_per_token']:.1f} ms per decode token (median of {args.reps})")
        for p in r["profile"]:
            print(f"    {p['ms_per_token']:8.3f} ms  {p['calls_per_token']:6.1f}/token  {p['op']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
