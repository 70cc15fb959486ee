"""Where greedy QSpec and W4A16 part on one math item of an evaluation-table run, and why.

Reads the item's W4A16 and QSpec tokens from the run's results JSON (its "items" records), finds
the first position where they differ, prints the top-3 logits of W4A16 and of the draft
precision at that position (teacher-forced on W4A16's prefix), then reruns the item alone
(batch 1, 64 new tokens) in both modes to see whether the batch was what made them part.
Written for math-047 of the gguf table run (QSpec != W4A16 at token 26, logits 7.6e-6 apart):

    python -m experiments.diag_qspec_mismatch > experiments/results/eval/eval_table_gguf_diag_math047.out

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from qspec_jax.bench.common import RESULTS_DIR, usage_error

RUN = os.path.join(RESULTS_DIR, "eval", "eval_table_gguf.runs", "math_all_new256_main.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=RUN, help="a math run's results JSON (with its items)")
    ap.add_argument("--item", default="math-047")
    ap.add_argument("--draft", choices=("w4a4", "w4a8"), default="w4a8", help="QSpec's draft")
    args = ap.parse_args(argv)
    try:
        with open(args.run) as f:
            items = json.load(f)["items"]
    except (OSError, ValueError, KeyError) as e:
        return usage_error(f"cannot read the items of {args.run} ({e}): pass --run RESULTS.json")
    recs = {r["mode"]: r for r in items if r.get("type") == "item" and r["id"] == args.item}
    if not {"w4a16", "qspec"} <= set(recs):
        return usage_error(f"{args.run} holds no w4a16 and qspec records of {args.item}")

    import qspec_jax
    from qspec_jax.eval import math as m

    a, b = recs["w4a16"]["tokens"], recs["qspec"]["tokens"]
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if i is None:
        return usage_error(f"QSpec's and W4A16's tokens of {args.item} do not differ")
    prob = next(p for p in m.load_problems() if p["id"] == args.item)
    eng = qspec_jax.load("smollm2-135m", quant="gguf", progress=False)
    ids = eng.encode([m.format_prompt(prob["question"])], chat=True)[0]
    seq = ids + a[:i]
    out = {"first_diff": i, "w4a16_token": a[i], "qspec_token": b[i]}
    for prec in ("w4a16", args.draft):
        lg = eng.logits([seq], prec)[0, -1].astype(np.float64)  # [vocab]
        top = np.argsort(-lg)[:3]
        out[prec] = {
            "top3": [[int(t), float(lg[t])] for t in top],
            "logit_w4a16_token": float(lg[a[i]]),
            "logit_qspec_token": float(lg[b[i]]),
        }
    t0 = time.time()
    for mode in ("w4a16", "qspec"):
        r = eng.generate([ids], mode=mode, max_new_tokens=64, draft=args.draft)
        out[f"batch1_{mode}_first40"] = r.tokens[0][:40]
    out["batch1_equal_first64"] = out["batch1_w4a16_first40"] == out["batch1_qspec_first40"]
    out["batch1_w4a16_matches_batch16_w4a16"] = out["batch1_w4a16_first40"] == a[:40]
    out["batch1_qspec_matches_batch16_qspec"] = out["batch1_qspec_first40"] == b[:40]
    out["gen_s"] = time.time() - t0
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
