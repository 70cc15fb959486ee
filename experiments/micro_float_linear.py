"""Micro-benchmark: SmolLM2-135M's float linears (all 30 layers) for 1 row against gamma + 1 rows.

    python -m experiments.micro_float_linear [--rows 1,4] [--dtypes float32,bfloat16]
        [--impls xla,cpu] [--repeats 7] [--out experiments/results/micro_float_linear.json]

Loads the float target (`qspec_jax.load("smollm2-135m", draft_quant="gguf")`, its `.target`
weights), then times one jitted `lax.scan` over the 30 stacked layers that runs the four float
linears of a decoder block (wqkv [576, 960], wo [576, 576], gate_up [576, 3072],
w_down [1536, 576]) on M rows, the way `qspec_jax.model.linear.linear` calls them in precision
"fp": impl "xla" is XLA's dot (`jnp.einsum`), impl "cpu" the registry's "float_linear" CPU
kernel (`pallas_kernels.cpu_kernels.float_linear_cpu`), impl "head" the LM head's "float_matmul"
kernel (`pallas_kernels.cpu_kernels.float_head_cpu`), impl "w4a16" the same linears of the int4
copy (`.draft`) through the registry's W4A16 matmul (what a QuantSpec draft token runs; its
GB/s column still divides the float bytes). The layers' weights (425 MB in float32) do not fit
the 32 MB L3, so every call streams them from memory as decoding does. Prints the median (and min) ms of
--repeats calls (the cases interleaved), the cost of M rows relative to one row, and the GB/s of weight bytes read.
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def _layer_fn(impl: str):
    from pallas_kernels import dispatch  # noqa: PLC0415

    def mm(x, w):
        if impl == "xla":
            return jnp.einsum("mk,kn->mn", x, w.astype(x.dtype))  # [M, N]
        if impl == "w4a16":  # the int4 draft copy's W4A16 kernel (registry auto), for comparison
            y = dispatch.w4a16_matmul(x, w.packed, w.scales, w.mins)  # [M, N]
            return y.astype(x.dtype)
        if impl == "head":  # the LM head's kernel (cpu_kernels.float_head_cpu)
            return dispatch.float_matmul(x, w, impl="cpu").astype(x.dtype)  # [M, N]
        return dispatch.float_linear(x, w, impl="cpu")  # [M, N] (cpu_kernels.float_linear_cpu)

    def body(acc, lp):
        wqkv, wo, wgu, wd = lp
        d = wqkv.shape[0]
        h = acc  # [M, D]
        qkv = mm(h, wqkv)  # [M, q + 2 kv]
        o = mm(qkv[:, : wo.shape[0]], wo)  # [M, D]
        gu = mm(h + o, wgu)  # [M, 2F]
        dn = mm(gu[:, : wd.shape[0]], wd)  # [M, D]
        return (h + 1e-3 * dn[:, :d]).astype(acc.dtype), None

    @jax.jit
    def run(x, layers):
        for lp in layers:  # unrolled, as `qspec_jax.model.llama` runs per-layer weights on CPU
            x, _ = body(x, lp)
        return x

    return run


def main() -> None:
    """Times the float linears and prints one line per dtype, implementation and row count."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--impls", default="xla,cpu,head")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="experiments/results/micro_float_linear.json")
    args = ap.parse_args()

    import qspec_jax  # noqa: PLC0415

    model = qspec_jax.load("smollm2-135m", draft_quant="gguf")
    lps = model.params.target.layers  # the engine's CPU layout: a tuple of per-layer params
    if not isinstance(lps, tuple):
        raise NotImplementedError("expected the engine's unstacked (per-layer) CPU layout")
    base = [(lp.wqkv, lp.wo, lp.w_gate_up, lp.w_down) for lp in lps]  # [K, N] each
    dlps = model.params.draft.layers  # the int4 copy (QuantizedWeight), per layer
    draft = tuple((lp.wqkv, lp.wo, lp.w_gate_up, lp.w_down) for lp in dlps)
    del model
    rng = np.random.default_rng(0)
    results = []
    load0 = os.getloadavg()
    for dt in args.dtypes.split(","):
        dtype = jnp.dtype(dt)
        layers = tuple(tuple(w.astype(dtype) for w in lp) for lp in base)
        nbytes = sum(int(w.size) * dtype.itemsize for lp in layers for w in lp)
        cases = []  # (impl, rows, runner, x)
        for impl in args.impls.split(","):
            run = _layer_fn(impl)
            for m in (int(r) for r in args.rows.split(",")):
                x = jnp.asarray(rng.standard_normal((m, base[0][0].shape[0])), dtype)  # [M, D]
                ws = draft if impl == "w4a16" else layers
                run(x, ws).block_until_ready()
                cases.append((impl, m, run, x, ws))
        times = {(impl, m): [] for impl, m, *_ in cases}
        for _ in range(args.repeats):  # interleaved: a shared machine's drifts hit every case
            for impl, m, run, x, ws in cases:
                t0 = time.perf_counter()
                run(x, ws).block_until_ready()
                times[impl, m].append(time.perf_counter() - t0)
        for impl, m, *_ in cases:
            ts = times[impl, m]
            ms, ms_min = 1e3 * float(np.median(ts)), 1e3 * min(ts)
            one = 1e3 * float(np.median(times[impl, 1])) if (impl, 1) in times else None
            rel = ms / one if one else None
            gbs = nbytes / (ms * 1e-3) / 1e9  # the float weights' bytes (also for w4a16)
            print(
                f"{dt:9s} {impl:4s} M={m}: median {ms:7.2f} ms (min {ms_min:7.2f})  "
                f"x{rel:.2f} of M=1  {gbs:5.2f} GB/s of {nbytes / 1e6:.0f} MB",
                flush=True,
            )
            results.append(
                {
                    "dtype": dt,
                    "impl": impl,
                    "rows": m,
                    "ms": ms,
                    "min_ms": ms_min,
                    "times_ms": [1e3 * t for t in ts],
                    "relative_to_one_row": rel,
                    "weight_bytes": nbytes,
                    "gb_per_s": gbs,
                }
            )
    meta = {
        "command": "python -m experiments.micro_float_linear "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": "2-core AMD EPYC CPU, no GPU",
        "load_average_before": load0,
        "load_average_after": os.getloadavg(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print("wrote", args.out, "load before", load0, "after", os.getloadavg())


if __name__ == "__main__":
    main()
