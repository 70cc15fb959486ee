"""Where continuous batching spends its time: phase totals of one `generate_many` run.

Wraps the pieces `Engine.generate_many` calls (`loop.insert_prompt`, `loop.run_steps`,
`jax.device_get`, `_TextTracker.update`) with timers that block on their results, so each
phase's device time lands on the phase that caused it, then runs the first `--limit` HumanEval
prompts once to warm up and once timed. Blocking adds a little synchronisation the real run
does not have; the totals say which phase dominates, not the exact wall.

    python -m experiments.profile_continuous [--limit 24] [--mode w4a16] [--chunk-steps 8]
"""

from __future__ import annotations

import argparse
import collections
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--mode", default="w4a16")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunk-steps", type=int, default=8)
    args = ap.parse_args(argv)

    import jax

    import qspec_jax
    from qspec_jax import engine as engine_mod
    from qspec_jax.decoding import loop
    from qspec_jax.eval.humaneval import build_prompt, load_humaneval

    problems = load_humaneval()[: args.limit]
    prompts = [build_prompt(p)[0] for p in problems]
    eng = qspec_jax.load("smollm2-135m", quant="gguf", progress=False)
    ids = eng.encode(prompts, chat=False)
    print("prompt lengths:", sorted(len(t) for t in ids))
    totals: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()

    def timed(name, fn, block=True):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if block:
                jax.block_until_ready(out)
            totals[name] += time.perf_counter() - t0
            counts[name] += 1
            return out

        return wrapper

    loop.insert_prompt = timed("insert_prompt", loop.insert_prompt)
    loop.run_steps = timed("run_steps", loop.run_steps)
    loop.empty_state = timed("empty_state", loop.empty_state)
    engine_mod.jax.device_get = timed("device_get", jax.device_get)
    engine_mod._TextTracker.update = timed("tracker_update", engine_mod._TextTracker.update, False)
    kw = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
              chunk_steps=args.chunk_steps, chat=False)  # fmt: skip
    for label in ("warm-up", "timed"):
        totals.clear()
        counts.clear()
        t0 = time.perf_counter()
        res = eng.generate_many(ids, args.mode, **kw)
        wall = time.perf_counter() - t0
        print(f"{label}: wall {wall:.2f} s, {res.stats['tokens_generated']} tokens, "
              f"{res.stats['steps']} steps")  # fmt: skip
        for name, s in totals.most_common():
            print(f"  {name:16s} {s:7.2f} s  {counts[name]:5d} calls  {s / wall:6.1%}")
    t0 = time.perf_counter()
    n_tok = 0
    for s in range(0, len(ids), args.batch_size):
        r = eng.generate(ids[s : s + args.batch_size], args.mode, chat=False,
                         max_new_tokens=args.max_new_tokens)  # fmt: skip
        if r.stats["compile_source"] != "memory":
            r = eng.generate(ids[s : s + args.batch_size], args.mode, chat=False,
                             max_new_tokens=args.max_new_tokens)  # fmt: skip
        n_tok += r.stats["tokens_generated"]
        totals["static_wall"] += r.stats["wall_s"]
    print(f"static batches: wall {totals['static_wall']:.2f} s (compile excluded), {n_tok} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
