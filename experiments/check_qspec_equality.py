"""QSpec's greedy tokens against W4A16's on a batch of the project's math problems, one run.

The evaluation table (`python -m experiments.eval_table`, run on XLA's CPU path) found
QSpec == W4A16 on 67/68 math items per draft: on math-047, in a batch of 16, W4A16's two best logits at generated
token 26 were 7.6e-6 apart and the verifier's 4-row forward rounded them the other way from the
1-row decode step. This reruns such a batch on the current default path and on XLA's, and
reports, per item, whether QSpec's tokens equal W4A16's.

    python -m experiments.check_qspec_equality [--items 32-47] [--drafts w4a8,w4a4]
        [--max-new-tokens 256] [--impls auto,xla]

Writes experiments/results/eval/check_qspec_equality.json.
"""

from __future__ import annotations

import argparse
import sys
import time

from qspec_jax.bench.common import run_meta, usage_error, write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", default="32-47", help="problem index range lo-hi (inclusive)")
    ap.add_argument("--drafts", default="w4a8,w4a4")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--impls", default="auto,xla")
    ap.add_argument("--out", default="experiments/results/eval/check_qspec_equality.json")
    args = ap.parse_args()
    try:
        lo, hi = (int(v) for v in args.items.split("-"))
        if not 0 <= lo <= hi:
            raise ValueError
    except ValueError:
        return usage_error("--items takes a range lo-hi of problem indices, e.g. 32-47")
    import qspec_jax
    from qspec_jax.eval import math as m

    probs = m.load_problems()[lo : hi + 1]
    eng = qspec_jax.load("smollm2-135m", quant="gguf")
    ids = eng.encode([m.format_prompt(p["question"]) for p in probs], chat=True)
    t0 = time.time()
    runs = {}
    for impl in args.impls.split(","):
        eng.impl = None if impl == "auto" else impl
        base = eng.generate(ids, mode="w4a16", max_new_tokens=args.max_new_tokens).tokens
        for d in args.drafts.split(","):
            q = eng.generate(ids, mode="qspec", draft=d, max_new_tokens=args.max_new_tokens)
            diff = [p["id"] for p, a, b in zip(probs, base, q.tokens) if a != b]
            runs[f"{impl}/{d}"] = dict(
                equal=len(probs) - len(diff),
                items=len(probs),
                differing=diff,
                acceptance=q.stats["acceptance_rate"],
            )
            print(impl, d, runs[f"{impl}/{d}"], flush=True)
    meta = run_meta(t0)
    write_json(args.out, dict(meta=meta, runs=runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
