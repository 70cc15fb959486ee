"""QSpec acceptance per weight quantization, draft precision and gamma, on held-out chat prompts.

For each quantization of SmolLM2-135M (``--quants``, e.g. ``gguf`` = the file's own Q4_1 codes,
so W4A16 is the shipped model exactly, and ``quarot-rtn``): W4A16 greedy answers the 24 held-out
chat prompts of ``experiments/data/heldout_prompts.json`` (EOS honoured, up to --new-tokens),
then QSpec answers them with each draft precision (``--drafts``) at each gamma (``--gammas``).
Reported per setting: acceptance (accepted / proposed draft tokens over all prompts), committed
tokens per verify step, and how many answers equal W4A16's token for token (must be all: QSpec
greedy is exact). The prompts run as one batch: on CPU every row of every kernel is computed
independently of the others (tests/test_decoding.py), so each prompt's tokens and acceptance
are those of a batch-1 run.

    python -m experiments.bench_acceptance [--quants gguf,quarot-rtn] [--drafts w4a4,w4a8]
        [--gammas 1,2,3,4,5,6] [--new-tokens 96] [--group-size 64]

Writes experiments/results/quality/acceptance.json (atomically, after every row) and acceptance.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from qspec_jax.bench.common import (
    DATA_DIR,
    REPO_ROOT,
    RESULTS_DIR,
    int_list,
    run_meta,
    usage_error,
    write_json,
)

PROMPTS_FILE = os.path.join(DATA_DIR, "heldout_prompts.json")
OUT = os.path.join(RESULTS_DIR, "quality", "acceptance.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quants", default="gguf,quarot-rtn")
    ap.add_argument("--drafts", default="w4a4,w4a8")
    ap.add_argument("--gammas", default="1,2,3,4,5,6")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--group-size", type=int, default=64, help="for the re-quantizing methods")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    try:
        gammas = int_list(args.gammas)
    except ValueError:
        return usage_error(f"--gammas takes comma-separated integers, got {args.gammas!r}")
    drafts = [d for d in args.drafts.split(",") if d]
    if any(d not in ("w4a4", "w4a8") for d in drafts):
        return usage_error(f"--drafts takes w4a4 and/or w4a8, got {args.drafts!r}")

    import qspec_jax

    with open(PROMPTS_FILE) as f:
        prompts = json.load(f)["prompts"]
    results = []
    started = time.time()
    for quant in [q for q in args.quants.split(",") if q]:
        t0 = time.time()
        eng = qspec_jax.load("smollm2-135m", quant=quant, group_size=args.group_size, progress=False)
        ids = eng.encode(prompts, chat=True)
        ref = eng.generate(ids, mode="w4a16", max_new_tokens=args.new_tokens)
        print(f"{quant}: loaded + W4A16 in {time.time() - t0:.0f} s, "
              f"{ref.stats['tokens_generated']} tokens", flush=True)
        for draft in drafts:
            for g in gammas:
                r = eng.generate(ids, mode="qspec", gamma=g, draft=draft,
                                 max_new_tokens=args.new_tokens)
                s = r.stats
                row = dict(quant=quant, group_size=None if quant == "gguf" else args.group_size,
                           draft=draft, gamma=g, prompts=len(ids),
                           acceptance=s["acceptance_rate"],
                           tokens_per_step=s["mean_tokens_per_step"],
                           same_as_w4a16=sum(a == b for a, b in zip(r.tokens, ref.tokens)),
                           tokens=s["tokens_generated"])
                results.append(row)
                _write(args.out, results, args.new_tokens, started)  # after every row: a stop keeps them
                print(f"  {quant} draft {draft} γ={g}: acceptance {row['acceptance']:.3f}, "
                      f"{row['tokens_per_step']:.2f} tokens/step, same as W4A16 "
                      f"{row['same_as_w4a16']}/{len(ids)}", flush=True)
    _write(args.out, results, args.new_tokens, started)
    _plot(results, args.out[:-5] + ".png")
    print(f"wrote {args.out}")
    return 0


def _write(path, results, new_tokens, started):
    """Writes the results so far atomically, with the run's metadata (`run_meta`)."""
    doc = dict(**run_meta(started), new_tokens=new_tokens,
               prompts_file=os.path.relpath(PROMPTS_FILE, REPO_ROOT), results=results)
    write_json(path, doc)


def _plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    keys = sorted({(r["quant"], r["draft"]) for r in results})
    for quant, draft in keys:
        rows = [r for r in results if (r["quant"], r["draft"]) == (quant, draft)]
        ax.plot([r["gamma"] for r in rows], [r["acceptance"] for r in rows], marker="o",
                label=f"{quant}, draft {draft}")
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("γ (draft tokens per verify step)")
    ax.set_ylabel("acceptance (accepted / proposed)")
    ax.set_title("QSpec acceptance on 24 held-out chat prompts, SmolLM2-135M")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
