"""Diagnose math-047: W4A16 vs QSpec (draft w4a8) greedy tokens differ at position 26 in the batch-16 run."""

import json
import sys
import time

import numpy as np

sys.path.insert(0, "/work/wt-eval")
import qspec_jax
from qspec_jax.eval import math as m

P = "/work/wt-eval/experiments/results/eval/eval_table_gguf.runs/math_all_new256_main.partial.jsonl"
recs = {}
for line in open(P):
    r = json.loads(line)
    if r.get("type") == "item" and r["id"] == "math-047":
        recs[r["mode"]] = r
a, b = recs["w4a16"]["tokens"], recs["qspec"]["tokens"]
i = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
prob = next(p for p in m.load_problems() if p["id"] == "math-047")
eng = qspec_jax.load("smollm2-135m", quant="gguf", progress=False)
ids = eng.encode([m.format_prompt(prob["question"])], chat=True)[0]
seq = ids + a[:i]
out = {"first_diff": i, "w4a16_token": a[i], "qspec_token": b[i]}
for prec in ("w4a16", "w4a8"):
    lg = eng.logits([seq], prec)[0, -1].astype(np.float64)
    top = np.argsort(-lg)[:3]
    out[prec] = {
        "top3": [[int(t), float(lg[t])] for t in top],
        "logit_w4a16_token": float(lg[a[i]]),
        "logit_qspec_token": float(lg[b[i]]),
    }
t0 = time.time()
for mode in ("w4a16", "qspec"):
    r = eng.generate([ids], mode=mode, max_new_tokens=64, draft="w4a8")
    out[f"batch1_{mode}_first40"] = r.tokens[0][:40]
out["batch1_equal_first64"] = out["batch1_w4a16_first40"] == out["batch1_qspec_first40"]
out["batch1_w4a16_matches_batch16_w4a16"] = out["batch1_w4a16_first40"] == a[:40]
out["batch1_qspec_matches_batch16_qspec"] = out["batch1_qspec_first40"] == b[:40]
out["gen_s"] = time.time() - t0
print(json.dumps(out, indent=1))
