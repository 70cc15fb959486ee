"""Long-context decoding on SmolLM2-135M: float KV vs QuantSpec's hierarchical int4/int8 KV.

The prompt is a long document written by this script (no download): a registry of numbered
items, each with a made-up code ("The code of the amber lantern in room 17 is 4821."), cut to
exactly N tokens and followed by a question about one item near the start of the document. Per
context length, in one process with one set of int4 weights:

* W4A16 autoregressive with a float KV cache (the baseline) and with the hierarchical cache
  (int8 KV + float buffer of up to 2R tokens);
* QuantSpec (W4A16 drafts on int4 KV, W4A16 verify on int8 KV) at each gamma;
* QSpec (W4A4 drafts) on the float cache and on the hierarchical cache (QSpec x QuantSpec).

Reported per row: decode tokens/s (prefill and decode loop compiled ahead of time and timed
separately; compile excluded), prefill seconds, acceptance, tokens per verify step, KV bytes per
token at the end, whether the tokens equal the W4A16 row on the same cache format (they must for
the speculative rows), agreement of int8-KV greedy with float-KV greedy (matching prefix
length), and whether the answer contains the asked code. Greedy, EOS ignored.

    python experiments/bench_longctx.py [--contexts 1024,2048,4096,8000] [--gammas 5]
        [--qspec-gammas 3]
        [--new-tokens 32] [--residual 128] [--quant quarot-rtn] [--group-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLORS = ["amber", "blue", "crimson", "green", "ivory", "jade", "olive", "silver", "violet", "white"]
THINGS = ["lantern", "clock", "vase", "mirror", "chest", "drum", "globe", "kettle", "lamp", "map"]


def document(n_items: int, seed: int = 0) -> tuple[list[str], list[tuple[str, int]]]:
    """Sentences of a made-up registry and the (item, code) facts they state."""
    rng = random.Random(seed)
    lines, facts = [], []
    for i in range(n_items):
        item = f"the {COLORS[i % 10]} {THINGS[(i // 10) % 10]} in room {i + 1}"
        code = rng.randint(1000, 9999)
        facts.append((item, code))
        lines.append(f"Entry {i + 1}: the code of {item} is {code}. It was checked on day "
                     f"{rng.randint(1, 28)} and stored on shelf {rng.randint(1, 40)}.")
    return lines, facts


def build_prompt(tokenizer, n_tokens: int, question_item: int = 3) -> tuple[list[int], int]:
    """Token ids of exactly n_tokens: registry text, then a question about one early item."""
    lines, facts = document(800)
    item, code = facts[question_item]
    question = tokenizer.encode(f"\n\nQuestion: what is the code of {item}? Answer: The code of {item} is",
                                add_special_tokens=False)
    body = tokenizer.encode("Registry of stored objects.\n" + "\n".join(lines), add_special_tokens=False)
    need = n_tokens - len(question)
    if len(body) < need:
        raise SystemExit(f"the document has only {len(body)} tokens; raise the item count")
    return body[:need] + question, code


def timed_run(engine, ids, mode, kv, gamma, new_tokens, residual):
    """Prefill and decode timed separately (each compiled ahead of time, compile excluded).

    Returns (tokens, prefill seconds, decode seconds, final DecodeState, kv format).
    """
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from qspec_jax.cache import make_cache
    from qspec_jax.decoding.loop import cond, prefill, step

    cfg, qcfg = engine.config, engine.qconfig
    dc = engine._decode_config(mode, new_tokens, 0.0, 0, 1.0, gamma)
    kv = engine._check_kv_cache(mode, kv, residual, dc)
    dc = dataclasses.replace(dc, eos_ids=())
    _, t_bucket, capacity = engine._plan([ids], dc)
    toks = np.full((1, t_bucket), cfg.pad_token_id, np.int32)
    toks[0, : len(ids)] = ids
    toks, lens = jnp.asarray(toks), jnp.asarray([len(ids)], jnp.int32)
    cache = make_cache(kv, cfg, 1, capacity, residual=residual, step_tokens=dc.tokens_per_step)
    key = jax.random.PRNGKey(0)
    pf = jax.jit(prefill, static_argnames=("cfg", "qcfg", "dc"), donate_argnames=("cache",))
    pf = pf.lower(engine.params, cache, toks, lens, key, cfg=cfg, qcfg=qcfg, dc=dc).compile()

    def loop(state, params):
        return jax.lax.while_loop(cond, lambda st: step(st, params, cfg, qcfg, dc), state)

    t0 = time.perf_counter()
    state = jax.block_until_ready(pf(engine.params, cache, toks, lens, key))
    t_prefill = time.perf_counter() - t0
    dec = jax.jit(loop, donate_argnums=0).lower(state, engine.params).compile()
    t0 = time.perf_counter()
    final = jax.block_until_ready(dec(state, engine.params))
    t_decode = time.perf_counter() - t0
    n = int(final.num_generated[0])
    return np.asarray(final.out_tokens[0, :n]).tolist(), t_prefill, t_decode, final, kv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1024,2048")
    ap.add_argument("--gammas", default="5", help="QuantSpec draft lengths")
    ap.add_argument("--qspec-gammas", default="3", help="QSpec (W4A4 draft) draft lengths")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--quant", default="quarot-rtn")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--modes", default="ar-float,ar-hier,quantspec,qspec-float,qspec-hier")
    ap.add_argument("--out", default="experiments/results/bench_longctx.json")
    args = ap.parse_args(argv)
    import jax

    import qspec_jax

    t0 = time.perf_counter()
    engine = qspec_jax.load("smollm2-135m", quant=args.quant, group_size=args.group_size, progress=False)
    print(f"loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    gammas = [int(g) for g in args.gammas.split(",")]
    qgammas = [int(g) for g in args.qspec_gammas.split(",")]
    modes = args.modes.split(",")
    rows = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        ids, code = build_prompt(engine.tokenizer, ctx)
        runs = []
        for m in modes:
            if m.startswith("ar-"):
                runs.append((m, "w4a16", m[3:], None))
            elif m == "quantspec":
                runs += [(f"quantspec g{g}", "quantspec", "hier", g) for g in gammas]
            else:
                runs += [(f"{m} g{g}", "qspec", m.split("-")[1], g) for g in qgammas]
        ref: dict[str, list[int]] = {}
        for name, mode, kv, g in runs:
            t1 = time.perf_counter()
            toks, t_pf, t_dec, st, kv = timed_run(engine, ids, mode, kv, g or 3, args.new_tokens,
                                                 args.residual)
            text = engine.decode(toks)
            if mode == "w4a16":
                ref[kv] = toks
            same = None if mode == "w4a16" else toks == ref.get(kv)
            agree = None
            if mode == "w4a16" and kv == "hier" and "float" in ref:
                fl = ref["float"]
                agree = next((i for i, (a, b) in enumerate(zip(toks, fl)) if a != b), len(toks))
            prop, acc = int(st.draft_proposed[0]), int(st.draft_accepted[0])
            vsteps = int(st.verify_steps[0])
            lengths = [int(st.cache.lengths[0])]
            row = dict(
                context=ctx, run=name, mode=mode, kv_cache=kv, gamma=g,
                decode_tokens_per_s=(len(toks) - 1) / t_dec, prefill_s=t_pf, decode_s=t_dec,
                acceptance=acc / prop if prop else None,
                tokens_per_step=(len(toks) - 1) / vsteps if g else None,
                kv_bytes_per_token=type(st.cache).kv_bytes(st.cache, lengths) / lengths[0],
                same_tokens_as_w4a16=same, int8_vs_float_matching_prefix=agree,
                answer_has_code=str(code) in text, text=text[:80],
            )
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "text"}),
                  f"({time.perf_counter() - t1:.0f}s incl. compile)", flush=True)
            _write(args.out, args, rows)
    base = {r["context"]: r["decode_tokens_per_s"] for r in rows if r["run"] == "ar-float"}
    print("\n| context | run | decode tok/s | vs AR float KV | prefill s | acceptance | tok/step "
          "| KV B/token | same as W4A16 | answer |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        b = base.get(r["context"])
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        tps = "" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}"
        d = r["decode_tokens_per_s"]
        print(f"| {r['context']} | {r['run']} | {d:.2f} | {d / b if b else float('nan'):.2f}x | "
              f"{r['prefill_s']:.1f} | {acc} | {tps} | "
              f"{r['kv_bytes_per_token']:.0f} | {'' if r['same_tokens_as_w4a16'] is None else r['same_tokens_as_w4a16']} | "
              f"{'yes' if r['answer_has_code'] else 'no'} |")
    del jax
    return 0


def _write(path, args, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    meta = dict(argv=sys.argv, machine=platform.machine(), python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), settings=vars(args))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
