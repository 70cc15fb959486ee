"""SpecMQuant's compatibility measurement and the hierarchy end to end, SmolLM2-135M, one run.

Part 1 (`forward`): the time of ONE forward over a draft tree of N tokens (N = 1, 4, 8, 16, 32,
64; a root with N - 1 children, tree attention mask and depth positions, as a tree verification
runs) in fp, W4A16, W4A8 and W4A4, at batch 1 and 8, with a filled context. The ratio
t(N) / t(1) is the paper's question: how much more a tree verification costs than a one-token
step. Next to each measured CPU figure, an H100 roofline PROJECTION (not a measurement) of the
same forward for the SmolLM2-135M and Llama-2-7B shapes, the model bench_qspec uses.

Part 2 (`e2e`): tokens/s and committed tokens per step of W4A16 autoregressive decoding,
sequence QSpec (W4A4 -> W4A16) at several gammas, tree-into-W4A16 (levels w4a4,w4a16) and the
three-level hierarchy (w4a4,w4a8,w4a16) at several tree shapes; greedy, EOS ignored, exactly
--new-tokens per prompt, each prompt alone (batch 1) or all together; every speculative row's
tokens are checked against W4A16's.

    python -m experiments.bench_tree [--quant quarot-rtn] [--group-size 64] [--parts forward,e2e]
        [--ns 1,4,8,16,32,64] [--batches 1,8] [--trees 2,1:4,2,1:2,2,2:1,1,1] [--gammas 1,2,3]
        [--e2e-batches 1] [--new-tokens 48] [--prompts 3]

Writes experiments/results/bench_tree.json (rewritten after every row) and prints tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from qspec_jax.bench.common import QSPEC_PROMPTS, run_meta, usage_error, write_json
from qspec_jax.bench.qspec_steps import H100, loop_time

PRECISIONS = ("fp", "w4a16", "w4a8", "w4a4")


def roofline(cfg, group_size, batch, n, ctx, precision):
    """Projected H100 seconds of one forward over n tree tokens per sequence (a lower bound).

    Bytes: linear weights (bf16 for fp; packed int4 + bf16 group scales otherwise), the bf16 LM
    head, the bf16 KV cache of ctx positions per sequence. FLOPs: 2 per weight per row, at the
    int8 tensor-core rate for W4A8 / W4A4 (Hopper has no int4 MMA) and bf16 otherwise; head and
    attention at bf16. t = max(bytes / bandwidth, flops / rates); launches ignored.
    """
    d, f, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    lin = n_layers * (d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d + 2 * d * f + f * d)
    g = group_size or d
    w_bytes = lin * 2 if precision == "fp" else lin / 2 + lin / g * 2
    total_bytes = w_bytes + d * cfg.vocab_size * 2 + 2 * n_layers * ctx * cfg.kv_size * 2 * batch
    rows = batch * n
    lin_rate = H100["int8"] if precision in ("w4a8", "w4a4") else H100["bf16"]
    flops_other = 2 * d * cfg.vocab_size * rows + 4 * n_layers * (ctx + n) * cfg.q_size * rows
    compute = 2 * lin * rows / lin_rate + flops_other / H100["bf16"]
    return max(total_bytes / H100["bw"], compute)


def forward_times(engines, ns, batches, ctx, out, save, precisions=PRECISIONS):
    """Part 1: one tree forward of N tokens per precision and batch."""
    import jax.numpy as jnp

    from qspec_jax.cache import KVCache, set_lengths
    from qspec_jax.config import PRESETS
    from qspec_jax.decoding import tree as tr
    from qspec_jax.model.llama import forward

    rows = out.setdefault("forward", [])
    big = PRESETS["llama-2-7b"]
    for b in batches:
        for prec in precisions:
            eng = engines["fp" if prec == "fp" else "int4"]
            cfg, qcfg = eng.config, eng.qconfig
            cap = ctx + max(ns) + 64
            base = jnp.full((b,), ctx, jnp.int32)
            cache = set_lengths(KVCache.init(cfg, b, cap), base)
            for n in ns:
                tree = tr.TreeConfig((-1,) + (0,) * (n - 1)) if n > 1 else None
                toks = jnp.ones((b, n), jnp.int32)
                if tree is None:
                    extra = ()

                    def fwd(p, c, t, q=qcfg, pr=prec, cf=cfg):
                        return forward(p, t, c, cf, q, pr)
                else:
                    extra = (
                        tr.attention_mask(tree, base, 0, n, cap),
                        tr.rope_positions(tree, base, 0, n),
                    )

                    def fwd(p, c, t, m, r, q=qcfg, pr=prec, cf=cfg):
                        return forward(p, t, c, cf, q, pr, rope_positions=r, attn_mask=m)

                # inside a fori_loop, as the engine runs it (on CPU the int4 unpacking is
                # hoisted out of loops; a forward jitted alone would pay it on every call)
                t = loop_time(fwd, eng.params, cache, toks, *extra)
                row = dict(
                    batch=b,
                    precision=prec,
                    n=n,
                    ctx=ctx,
                    ms=t * 1e3,
                    h100_proj_us_135m=roofline(cfg, eng.qconfig.group_size or 64, b, n, ctx, prec)
                    * 1e6,
                    h100_proj_us_7b=roofline(big, 128, b, n, ctx, prec) * 1e6,
                )
                rows.append(row)
                print(f"forward b={b} {prec:>5} N={n:>2}: {t * 1e3:8.2f} ms", flush=True)
                save()
    # ratios to N = 1 within each (batch, precision)
    for r in rows:
        one = next(
            x
            for x in rows
            if x["batch"] == r["batch"] and x["precision"] == r["precision"] and x["n"] == 1
        )
        r["x_vs_n1"] = r["ms"] / one["ms"]
        r["h100_x_vs_n1_135m"] = r["h100_proj_us_135m"] / one["h100_proj_us_135m"]
        r["h100_x_vs_n1_7b"] = r["h100_proj_us_7b"] / one["h100_proj_us_7b"]
    save()


def e2e(eng, prompts, batches, gammas, trees, new_tokens, out, save):
    """Part 2: tokens/s and tokens per step of AR, QSpec and the hierarchies, one run."""
    rows = out.setdefault("e2e", [])
    configs = [("w4a16", {})]
    configs += [("qspec", dict(gamma=g)) for g in gammas]
    for t in trees:
        configs.append(("hspec", dict(tree=t, levels=("w4a4", "w4a16"))))
        configs.append(("hspec", dict(tree=t, levels=("w4a4", "w4a8", "w4a16"))))
    for b in batches:
        groups = [prompts[i : i + b] for i in range(0, len(prompts), b)]
        ref = None
        for mode, kw in configs:
            toks, wall, tot, steps, compile_s = [], 0.0, 0, 0, 0.0
            tree_kept = 0.0
            for grp in groups:
                eng.generate(
                    grp, mode=mode, max_new_tokens=new_tokens, ignore_eos=True, **kw
                )  # warm
                res = eng.generate(grp, mode=mode, max_new_tokens=new_tokens, ignore_eos=True, **kw)
                toks += res.tokens
                wall += res.stats["wall_s"]
                tot += res.stats["tokens_generated"]
                compile_s = max(compile_s, res.stats["compile_s"])
                steps += res.stats.get("verify_steps", 0) or 0
                tree_kept += res.stats.get("tree_accepted_per_step", 0.0) * (
                    res.stats.get("verify_steps", 0) or 0
                )
            if mode == "w4a16":
                ref = toks
            row = dict(
                batch=b,
                mode=mode,
                gamma=kw.get("gamma"),
                tree=list(kw["tree"]) if "tree" in kw else None,
                levels=list(kw["levels"]) if "levels" in kw else None,
                tokens=tot,
                wall_s=wall,
                tokens_per_s=tot / wall,
                compile_s=compile_s,
                # tokens committed per verify step per sequence (first token from prefill)
                tokens_per_step=(tot - len(prompts)) / steps if steps else None,
                tree_tokens_kept_per_step=tree_kept / steps if steps and mode == "hspec" else None,
                same_tokens_as_w4a16=sum(a == r for a, r in zip(toks, ref)),
                sequences=len(toks),
            )
            rows.append(row)
            label = mode + (f" g={kw['gamma']}" if "gamma" in kw else "")
            if mode == "hspec":
                label += f" tree={','.join(map(str, kw['tree']))} levels={','.join(kw['levels'])}"
            tps = "" if row["tokens_per_step"] is None else f"{row['tokens_per_step']:.2f}"
            print(
                f"e2e b={b} {label:<44} {row['tokens_per_s']:7.2f} tok/s  {tps:>5} tok/step  "
                f"same {row['same_tokens_as_w4a16']}/{len(toks)}",
                flush=True,
            )
            save()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="quarot-rtn")
    ap.add_argument(
        "--checkpoint",
        default=None,
        help="a quantized checkpoint from `qspec-jax quantize` (skips quantizing)",
    )
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--parts", default="forward,e2e")
    ap.add_argument("--ns", default="1,4,8,16,32,64")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="for part 1")
    ap.add_argument("--ctx", type=int, default=128, help="filled context for part 1")
    ap.add_argument("--trees", default="2,1:4,2,1:2,2,2:1,1,1")
    ap.add_argument("--gammas", default="1,2,3")
    ap.add_argument("--e2e-batches", default="1")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--out", default="experiments/results/bench_tree.json")
    args = ap.parse_args()
    try:
        ns = [int(x) for x in args.ns.split(",")]
        batches = [int(x) for x in args.batches.split(",")]
        e2e_batches = [int(x) for x in args.e2e_batches.split(",")]
        gammas = [int(x) for x in args.gammas.split(",")] if args.gammas else []
        trees = (
            [tuple(int(y) for y in t.split(",")) for t in args.trees.split(":")]
            if args.trees
            else []
        )
        parts = set(args.parts.split(","))
    except ValueError:
        return usage_error(
            "--ns/--batches/--gammas take comma-separated integers, --trees "
            "colon-separated trees such as 4,2,1:2,1"
        )
    if not parts <= {"forward", "e2e"}:
        return usage_error("--parts is a comma-separated subset of forward,e2e")

    import qspec_jax

    out = run_meta(quant=args.quant, group_size=args.group_size)

    def save():
        write_json(args.out, out)

    t0 = time.perf_counter()
    if args.checkpoint:
        int4 = qspec_jax.load(os.path.abspath(args.checkpoint))  # orbax wants absolute paths
        out.update(
            checkpoint=args.checkpoint,
            quant=int4.qconfig.method,
            group_size=int4.qconfig.group_size,
        )
    else:
        int4 = qspec_jax.load(
            "smollm2-135m", quant=args.quant, group_size=args.group_size, progress=False
        )
    print(f"loaded int4 model in {time.perf_counter() - t0:.0f}s", flush=True)
    if "forward" in parts:
        fp = qspec_jax.load("smollm2-135m")
        precs = tuple(p for p in args.precisions.split(",") if p in PRECISIONS)
        forward_times({"fp": fp, "int4": int4}, ns, batches, args.ctx, out, save, precs)
        del fp
    if "e2e" in parts:
        prompts = list(QSPEC_PROMPTS[: args.prompts])
        e2e(int4, prompts, e2e_batches, gammas, trees, args.new_tokens, out, save)
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
