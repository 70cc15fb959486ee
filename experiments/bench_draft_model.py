"""A separate draft model on SmolLM2-135M: the target's first k layers as a self-draft.

One process, the embedded SmolLM2-135M with its own Q4_1 codes (W4A16 target, quant "gguf"),
loaded once per k with `draft_model="self:k"` (the draft shares the target's arrays: its first
k layers, embedding and head). Rows, all measured in the same run, batch 1, greedy, EOS
ignored, on the float KV cache:

* W4A16 autoregressive (the baseline);
* QSpec (W4A8 drafts over the same int4 weights, W4A16 verify) at each gamma;
* `DraftModelSpec` (mode "draftmodel") with the self-draft of k layers at each gamma.

Every program is compiled first; then --rounds rounds each run every row once over the prompts
(so slow drifts of a shared machine hit all rows alike). Reported per row: decode tokens/s
(generated tokens over the `generate` wall time, prefill included, compile excluded; median
over rounds), its ratio to W4A16 AR, acceptance, tokens per verify step, and whether every
prompt's tokens equal W4A16 AR's (they must). Writes the JSON and a PNG next to it.

    python -m experiments.bench_draft_model [--ks 6,10,15] [--gammas 2,4] [--prompts 4]
        [--new-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ks", default="6,10,15", help="layers the self-draft keeps (of 30)")
    ap.add_argument("--gammas", default="2,4")
    ap.add_argument("--qspec-draft", default="w4a8")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="experiments/results/bench_draft_model.json")
    args = ap.parse_args(argv)

    import qspec_jax
    from qspec_jax.bench.common import QSPEC_PROMPTS, describe, int_list, run_meta, write_json

    started = time.time()
    ks, gammas = int_list(args.ks), int_list(args.gammas)
    prompts = list(QSPEC_PROMPTS[: args.prompts])
    engines = {
        k: qspec_jax.load("smollm2-135m", quant="gguf", draft_model=f"self:{k}", progress=False)
        for k in ks
    }
    base = engines[ks[0]]
    # (row name, engine, mode, options, k, gamma)
    runs = [("w4a16 AR", base, "w4a16", {}, None, None)]
    runs += [
        (f"qspec {args.qspec_draft} g{g}", base, "qspec", dict(gamma=g, draft=args.qspec_draft),
         None, g)
        for g in gammas
    ]  # fmt: skip
    runs += [
        (f"self:{k} g{g}", engines[k], "draftmodel", dict(gamma=g), k, g)
        for k in ks
        for g in gammas
    ]
    kw = dict(max_new_tokens=args.new_tokens, ignore_eos=True)
    compile_s, tokens, stats = {}, {}, {}
    for name, eng, mode, opts, *_ in runs:  # compile (the first call per program), keep tokens
        t0 = time.perf_counter()
        res = [eng.generate([p], mode=mode, **opts, **kw) for p in prompts]
        compile_s[name] = sum(r.stats["compile_s"] for r in res)
        tokens[name] = [r.tokens[0] for r in res]
        stats[name] = [r.stats for r in res]
        print(f"{name}: first pass {time.perf_counter() - t0:.0f}s", flush=True)
    walls: dict[str, list[float]] = {name: [] for name, *_ in runs}
    for r in range(args.rounds):
        for name, eng, mode, opts, *_ in runs:
            res = [eng.generate([p], mode=mode, **opts, **kw) for p in prompts]
            if [x.tokens[0] for x in res] != tokens[name]:
                raise SystemExit(f"{name}: tokens changed between rounds")
            walls[name].append(sum(x.stats["wall_s"] for x in res))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in walls.items()),
              flush=True)  # fmt: skip
    ref = tokens["w4a16 AR"]
    n_tok = sum(len(t) for t in ref)
    rows = []
    for name, eng, mode, _, k, g in runs:
        st = stats[name]
        prop = sum(s.get("draft_tokens_proposed", 0) for s in st)
        acc = sum(s.get("draft_tokens_accepted", 0) for s in st)
        vsteps = sum(s.get("verify_steps", 0) for s in st)
        wall = statistics.median(walls[name])
        rows.append(dict(
            run=name, mode=mode, draft_layers=k, gamma=g,
            tokens_per_s=n_tok / wall, wall_s=wall, wall_s_rounds=walls[name],
            acceptance=acc / prop if prop else None,
            tokens_per_step=(n_tok - len(prompts)) / vsteps if vsteps else None,
            same_tokens_as_w4a16=tokens[name] == ref, compile_s=compile_s[name],
            weight_bytes=eng.weight_bytes_by_set,
        ))  # fmt: skip
    meta = run_meta(started, settings=vars(args), tokens_per_run=n_tok)
    write_json(args.out, dict(meta=meta, rows=rows))
    b = rows[0]["tokens_per_s"]
    print(f"\n{describe(meta)}\n")
    print("| run | tokens/s | vs W4A16 AR | acceptance | tokens/step | same as W4A16 |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        tps = "" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}"
        print(f"| {r['run']} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / b:.2f}x | {acc} "
              f"| {tps} | {r['same_tokens_as_w4a16']} |")  # fmt: skip
    _plot(args.out, rows)
    return 0 if all(r["same_tokens_as_w4a16"] for r in rows) else 1


def _plot(path, rows):
    """Tokens/s and acceptance per row, PNG next to path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = [r["run"] for r in rows]
    a1.bar(names, [r["tokens_per_s"] for r in rows], color="tab:blue")
    a1.axhline(rows[0]["tokens_per_s"], color="gray", linestyle=":", label="W4A16 AR")
    a1.set_ylabel("tokens/s (median of rounds)")
    a1.set_title("SmolLM2-135M W4A16 target, batch 1, greedy")
    a1.legend(fontsize=8)
    spec = [r for r in rows if r["acceptance"] is not None]
    a2.bar([r["run"] for r in spec], [r["acceptance"] for r in spec], color="tab:green")
    a2.set_ylim(0, 1)
    a2.set_ylabel("acceptance (accepted / proposed drafts)")
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=45, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
