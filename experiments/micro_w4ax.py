"""The low-bit linear's CPU kernels alone, SmolLM2-135M shapes: where a W4A8 draft's time goes.

For each linear shape at batch 1 (and the gate_up shape at 4 and 8 rows), medians of --reps
timed calls of one jitted function, in rounds that alternate the variants:

* "w4a16": the W4A16 kernel (float activations, dequantized in registers);
* "w4a8 two steps": XLA's activation quantization (group 32) then the W4AX kernel;
* "w4a8 fused": `cpu_kernels.quantize_w4ax_matmul_cpu` (the quantization inside the kernel);
* "w4a8 fused avx2": the same with the AVX2 build forced (isa="avx2"), where the CPU has VNNI.

"hot" calls one weight again and again (it stays in L2: the kernel's compute speed);
"streamed" runs the same shape over all 30 layers' weights of the real model (the GGUF's Q4_1
codes) in one call, as the decode loop does, so the bytes come from L3 / memory; the time is
per linear and GB/s counts packed codes + scales + mins.

    python -m experiments.micro_w4ax [--reps 30] [--rounds 5]

Writes experiments/results/micro_w4ax.json and prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from qspec_jax.bench.common import describe, median_wall, run_meta, usage_error, write_json

SHAPES = {  # name: (field, K, N)
    "qkv": ("wqkv", 576, 960),
    "o": ("wo", 576, 576),
    "gate_up": ("w_gate_up", 576, 3072),
    "down": ("w_down", 1536, 576),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="experiments/results/micro_w4ax.json")
    args = ap.parse_args()
    if min(args.reps, args.rounds) < 1:
        return usage_error("--reps and --rounds must be positive")

    import jax
    import jax.numpy as jnp

    import qspec_jax
    from pallas_kernels import act_quant, cpu_kernels

    if not cpu_kernels.available():
        return usage_error(f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    q = qspec_jax.load("smollm2-135m", quant="gguf", progress=False)
    ga = q.qconfig.act_group_size

    def w4a16(x, p, s, mn):
        return cpu_kernels.w4a16_matmul_cpu(x, p, s, mn)

    def two_steps(x, p, s, mn):
        codes, sa = act_quant.quantize_activations_reference(x, bits=8, group_size=ga)
        return cpu_kernels.w4ax_matmul_cpu(codes, sa, p, s, mn)

    def fused(isa):
        return lambda x, p, s, mn: cpu_kernels.quantize_w4ax_matmul_cpu(
            x, p, s, mn, bits=8, group_size=ga, isa=isa
        )

    variants = {"w4a16": w4a16, "w4a8 two steps": two_steps, "w4a8 fused": fused("auto")}
    if cpu_kernels.has_vnni():
        variants["w4a8 fused avx2"] = fused("avx2")

    def chained(kern, n):
        def run(x, ws):
            acc = jnp.zeros((x.shape[0], n), jnp.float32)
            for p, s, mn in ws:
                acc = acc + kern(x, p, s, mn)  # [M, N]
            return acc

        return jax.jit(run)

    cases = [(name, 1) for name in SHAPES] + [("gate_up", 4), ("gate_up", 8)]
    rows = []
    t_start = time.time()
    for name, m in cases:
        field, k, n = SHAPES[name]
        layers = [getattr(lp, field) for lp in q.params.layers]
        streamed = [(w.packed, w.scales, w.mins) for w in layers]
        hot = streamed[:1]
        nbytes = sum(p.nbytes + s.nbytes + mn.nbytes for p, s, mn in streamed)
        x = jax.random.normal(jax.random.key(m), (m, k))  # [M, K]
        for where, ws in (("hot", hot), ("streamed", streamed)):
            fns = {v: chained(f, n) for v, f in variants.items()}
            for f in fns.values():
                f(x, ws).block_until_ready()
            per: dict[str, list[float]] = {v: [] for v in fns}
            for _ in range(args.rounds):
                for v, f in fns.items():
                    call = lambda f=f, x=x, ws=ws: f(x, ws).block_until_ready()  # noqa: E731
                    per[v].append(median_wall(call, args.reps) / len(ws))
            for v, runs in per.items():
                us = statistics.median(runs) * 1e6
                row = dict(shape=name, m=m, k=k, n=n, where=where, variant=v, us_per_linear=us,
                           rounds_us=[r * 1e6 for r in runs])  # fmt: skip
                if where == "streamed":
                    row["gb_per_s"] = nbytes / len(ws) / (us * 1e-6) / 1e9
                rows.append(row)

    meta = run_meta(t_start, vnni=cpu_kernels.has_vnni(), reps=args.reps, rounds=args.rounds)
    write_json(args.out, dict(meta=meta, rows=rows))
    print(f"\n{describe(meta)}, VNNI {meta['vnni']}\n")
    names = list(variants)
    print("| linear | rows | weights | " + " | ".join(f"{v} (us)" for v in names) + " |")
    print("|---|---:|---|" + "---:|" * len(names))
    for name, m in cases:
        for where in ("hot", "streamed"):
            cells = []
            for v in names:
                r = next(
                    r for r in rows
                    if r["shape"] == name and r["m"] == m and r["where"] == where
                    and r["variant"] == v
                )  # fmt: skip
                gb = f" ({r['gb_per_s']:.1f} GB/s)" if "gb_per_s" in r else ""
                cells.append(f"{r['us_per_linear']:.0f}{gb}")
            print(f"| {name} | {m} | {where} | " + " | ".join(cells) + " |")
    print(f"\nwrote {args.out} ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
