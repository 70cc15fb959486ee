"""Long-context decoding on SmolLM2-135M: float KV vs QuantSpec's hierarchical int4/int8 KV.

The prompt is a long document written by this script (no download): a registry of numbered
items, each with a made-up code ("The code of the amber lantern in room 17 is 4821."), cut to
exactly N tokens and followed by a question about one item near the start of the document.

Per context length, in one process with one set of int4 weights, the prompt is **prefilled once
in all** (into the float cache; the hierarchical cache is filled from the same K/V by its
`finish_prefill`), and every mode's decode loop starts from that prefilled state (caches laid
out for the largest step, so one prefill serves every gamma and both cache kinds):

* W4A16 autoregressive with a float KV cache (the baseline) and with the hierarchical cache
  (int8 KV + float buffer of up to 2R tokens);
* QuantSpec (W4A16 drafts on int4 KV, W4A16 verify on int8 KV) at each gamma (default 1..6);
* QSpec (W4A8 drafts by default, `--draft`) on the hierarchical cache (QSpec x QuantSpec) at each
  gamma, and optionally on the float cache (mode ``qspec-float``).

Timing: every decode loop is compiled ahead of time; then --rounds rounds each run every mode
once, in order (so slow drifts of a shared machine hit all modes alike), and the median decode
time per mode is reported. Reported per row: decode tokens/s, its ratio to AR on the float
cache, acceptance, tokens per verify step, KV bytes per token at the end, whether the tokens
equal W4A16 AR's on the same cache (they must for the speculative rows), agreement of int8-KV
greedy with float-KV greedy (matching prefix length), whether the answer contains the asked
code, and each kind's prefill time. Greedy, EOS ignored. Writes the JSON and a PNG plot
(tokens/s against gamma) next to it.

    python -m experiments.bench_longctx [--contexts 8000] [--gammas 1,2,3,4,5,6]
        [--qspec-gammas 1,2,3,4,5,6] [--new-tokens 32] [--rounds 3] [--residual 128]
        [--quant gguf] [--modes ar-float,ar-hier,quantspec,qspec-hier]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

COLORS = [
    "amber",
    "blue",
    "crimson",
    "green",
    "ivory",
    "jade",
    "olive",
    "silver",
    "violet",
    "white",
]
THINGS = ["lantern", "clock", "vase", "mirror", "chest", "drum", "globe", "kettle", "lamp", "map"]


def document(n_items: int, seed: int = 0) -> tuple[list[str], list[tuple[str, int]]]:
    """Sentences of a made-up registry and the (item, code) facts they state."""
    rng = random.Random(seed)
    lines, facts = [], []
    for i in range(n_items):
        item = f"the {COLORS[i % 10]} {THINGS[(i // 10) % 10]} in room {i + 1}"
        code = rng.randint(1000, 9999)
        facts.append((item, code))
        lines.append(
            f"Entry {i + 1}: the code of {item} is {code}. It was checked on day "
            f"{rng.randint(1, 28)} and stored on shelf {rng.randint(1, 40)}."
        )
    return lines, facts


def build_prompt(tokenizer, n_tokens: int, question_item: int = 3) -> tuple[list[int], int]:
    """Token ids of exactly n_tokens: registry text, then a question about one early item."""
    lines, facts = document(800)
    item, code = facts[question_item]
    question = tokenizer.encode(
        f"\n\nQuestion: what is the code of {item}? Answer: The code of {item} is",
        add_special_tokens=False,
    )
    body = tokenizer.encode(
        "Registry of stored objects.\n" + "\n".join(lines), add_special_tokens=False
    )
    need = n_tokens - len(question)
    if len(body) < need:
        raise SystemExit(f"the document has only {len(body)} tokens; raise the item count")
    return body[:need] + question, code


def _prefill_state(engine, ids, kv, dc_plan, residual):
    """One prefill of the prompt into a `kv` cache laid out for dc_plan's step (compiled first).

    Returns (DecodeState after prefill, prefill seconds, capacity).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qspec_jax.cache import make_cache
    from qspec_jax.decoding.loop import prefill

    cfg, qcfg = engine.config, engine.qconfig
    _, t_bucket, capacity = engine._plan([ids], dc_plan)
    toks = np.full((1, t_bucket), cfg.pad_token_id, np.int32)
    toks[0, : len(ids)] = ids
    toks, lens = jnp.asarray(toks), jnp.asarray([len(ids)], jnp.int32)
    cache = make_cache(kv, cfg, 1, capacity, residual=residual, step_tokens=dc_plan.tokens_per_step)
    key = jax.random.PRNGKey(0)
    pf = jax.jit(prefill, static_argnames=("cfg", "qcfg", "dc"), donate_argnames=("cache",))
    pf = pf.lower(engine.params, cache, toks, lens, key, cfg=cfg, qcfg=qcfg, dc=dc_plan).compile()
    t0 = time.perf_counter()
    state = jax.block_until_ready(pf(engine.params, cache, toks, lens, key))
    return state, time.perf_counter() - t0, capacity


def _mode_state(state, dc):
    """The prefilled state adapted to a mode's DecodeConfig (output buffer, counters, limit)."""
    import jax.numpy as jnp

    b = state.out_tokens.shape[0]
    out = jnp.zeros((b, dc.out_len), jnp.int32)
    return state.replace(
        out_tokens=out.at[:, 0].set(state.out_tokens[:, 0]),
        carry=dc.method.init_carry(b),
        max_new=jnp.asarray(dc.max_new_tokens, jnp.int32),
    )


def _decoder(engine, state, dc):
    """The compiled decode loop of one mode (the prefilled state is not donated: it is reused)."""
    import jax

    from qspec_jax.decoding.loop import cond, step

    cfg, qcfg = engine.config, engine.qconfig

    def loop(st, params):
        return jax.lax.while_loop(cond, lambda s: step(s, params, cfg, qcfg, dc), st)

    return jax.jit(loop).lower(state, engine.params).compile()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--contexts", default="8000")
    ap.add_argument("--gammas", default="1,2,3,4,5,6", help="QuantSpec draft lengths")
    ap.add_argument("--qspec-gammas", default="1,2,3,4,5,6", help="QSpec draft lengths")
    ap.add_argument("--draft", default="w4a8", help="QSpec draft precision")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--quant", default="gguf")
    ap.add_argument("--group-size", type=int, default=64, help="for quantizers other than gguf")
    ap.add_argument("--modes", default="ar-float,ar-hier,quantspec,qspec-hier")
    ap.add_argument("--out", default="experiments/results/bench_longctx.json")
    args = ap.parse_args(argv)
    import dataclasses
    import statistics

    import jax
    import numpy as np

    import qspec_jax

    t0 = time.perf_counter()
    engine = qspec_jax.load(
        "smollm2-135m", quant=args.quant, group_size=args.group_size, progress=False
    )
    print(f"loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    gammas = [int(g) for g in args.gammas.split(",")]
    qgammas = [int(g) for g in args.qspec_gammas.split(",")]
    modes = args.modes.split(",")
    rows, prefills = [], []
    for ctx in (int(c) for c in args.contexts.split(",")):
        ids, code = build_prompt(engine.tokenizer, ctx)
        runs = []  # (name, mode, kv, gamma)
        for m in modes:
            if m.startswith("ar-"):
                runs.append((m, "w4a16", m[3:], None))
            elif m == "quantspec":
                runs += [(f"quantspec g{g}", "quantspec", "hier", g) for g in gammas]
            else:
                runs += [(f"{m} g{g}", "qspec", m.split("-")[1], g) for g in qgammas]

        def dconf(mode, g):
            opts = dict(gamma=g or 1, **({"draft": args.draft} if mode == "qspec" else {}))
            dc = engine.decode_config(engine.method(mode, **opts), args.new_tokens)
            return dataclasses.replace(dc, eos_ids=())

        dcs = {name: dconf(mode, g) for name, mode, _, g in runs}
        # one prefill per cache kind, laid out for the largest step (every mode fits it)
        dc_plan = max(dcs.values(), key=lambda d: d.tokens_per_step)
        # One prefill (into the float cache) serves both kinds: the hierarchical cache is filled
        # from its K/V by `finish_prefill`, which is what its own prefill computes whenever the
        # prompt bucket equals the capacity (8000-token prompts: both 8192), and otherwise
        # differs from it only in float32 rounding of the prompt's attention.
        import jax.numpy as jnp

        from qspec_jax.cache import make_cache

        t1 = time.perf_counter()
        engine._check_kv_cache("w4a16", "float", args.residual, dc_plan)
        st_f, t_pf, cap = _prefill_state(engine, ids, "float", dc_plan, args.residual)
        prefills.append(dict(context=ctx, kv_cache="float (shared)", prefill_s=t_pf, capacity=cap))
        print(f"ctx {ctx} prefill: {t_pf:.1f}s "
              f"({time.perf_counter() - t1:.0f}s incl. compile)", flush=True)  # fmt: skip
        states = {"float": st_f}
        if any(kv == "hier" for _, _, kv, _ in runs):
            engine._check_kv_cache("w4a16", "hier", args.residual, dc_plan)
            hc = make_cache("hier", engine.config, 1, cap, residual=args.residual,
                            step_tokens=dc_plan.tokens_per_step)  # fmt: skip
            lens = jnp.asarray([len(ids)], jnp.int32)
            fill = jax.jit(lambda c, s, n: c.finish_prefill(s, n))
            states["hier"] = st_f.replace(cache=jax.block_until_ready(fill(hc, st_f.cache, lens)))
        compiled = {}
        for name, mode, kv, _ in runs:
            t1 = time.perf_counter()
            engine._check_kv_cache(mode, kv, args.residual, dcs[name])
            s0 = _mode_state(states[kv], dcs[name])
            compiled[name] = (_decoder(engine, s0, dcs[name]), s0)
            print(f"compiled {name} in {time.perf_counter() - t1:.0f}s", flush=True)
        times = {name: [] for name, *_ in runs}
        finals = {}
        for r in range(args.rounds):
            for name, *_ in runs:
                fn, s0 = compiled[name]
                t1 = time.perf_counter()
                final = jax.block_until_ready(fn(s0, engine.params))
                times[name].append(time.perf_counter() - t1)
                n = int(final.num_generated[0])
                toks = np.asarray(final.out_tokens[0, :n]).tolist()
                if name in finals and finals[name][0] != toks:
                    raise SystemExit(f"{name}: tokens changed between rounds")
                finals[name] = (toks, final)
            print(f"round {r + 1}: " + ", ".join(
                f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)  # fmt: skip
        ref = {kv: finals[name][0] for name, mode, kv, _ in runs if mode == "w4a16"}
        for name, mode, kv, g in runs:
            toks, st = finals[name]
            t_dec = statistics.median(times[name])
            text = engine.decode(toks)
            same = None if mode == "w4a16" else toks == ref.get(kv)
            agree = None
            if mode == "w4a16" and kv == "hier" and "float" in ref:
                fl = ref["float"]
                agree = next((i for i, (a, b) in enumerate(zip(toks, fl)) if a != b), len(toks))
            prop, acc = int(st.draft_proposed[0]), int(st.draft_accepted[0])
            vsteps = int(st.verify_steps[0])
            lengths = [int(st.cache.lengths[0])]
            row = dict(
                context=ctx, prompt_tokens=len(ids), run=name, mode=mode, kv_cache=kv, gamma=g,
                draft=dcs[name].draft_precision if mode == "qspec" else None,
                decode_tokens_per_s=(len(toks) - 1) / t_dec, decode_s=t_dec,
                decode_s_rounds=times[name],
                prefill_s=t_pf,
                acceptance=acc / prop if prop else None,
                tokens_per_step=(len(toks) - 1) / vsteps if g else None,
                kv_bytes_per_token=type(st.cache).kv_bytes(st.cache, lengths) / lengths[0],
                attention_impl=getattr(getattr(st.cache, "layout", None), "attention_impl", None),
                same_tokens_as_w4a16=same, int8_vs_float_matching_prefix=agree,
                answer_has_code=str(code) in text, text=text[:80],
            )  # fmt: skip
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("text", "decode_s_rounds")}),
                  flush=True)  # fmt: skip
        _write(args.out, args, rows, prefills)
        del states, compiled, finals
    base = {r["context"]: r["decode_tokens_per_s"] for r in rows if r["run"] == "ar-float"}
    print(
        "\n| context | run | decode tok/s | vs AR float KV | acceptance | tok/step "
        "| KV B/token | same as W4A16 | answer |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        b = base.get(r["context"])
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        tps = "" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}"
        d = r["decode_tokens_per_s"]
        same = "" if r["same_tokens_as_w4a16"] is None else r["same_tokens_as_w4a16"]
        print(f"| {r['context']} | {r['run']} | {d:.2f} | {d / b if b else float('nan'):.2f}x | "
              f"{acc} | {tps} | {r['kv_bytes_per_token']:.0f} | {same} | "
              f"{'yes' if r['answer_has_code'] else 'no'} |")  # fmt: skip
    _plot(args.out, rows)
    return 0


def _write(path, args, rows, prefills):
    from qspec_jax.bench.common import run_meta, write_json

    write_json(path, dict(meta=run_meta(settings=vars(args)), prefills=prefills, rows=rows))


def _plot(path, rows):
    """Decode tokens/s against gamma per context (AR rows as horizontal lines), PNG next to path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.2), squeeze=False)
    for ax, ctx in zip(axes[0], contexts):
        rs = [r for r in rows if r["context"] == ctx]
        for r in (r for r in rs if r["gamma"] is None):
            fl = r["kv_cache"] == "float"
            ax.axhline(r["decode_tokens_per_s"], linestyle=":" if fl else "--",
                       color="gray" if fl else "black", label=f"W4A16 AR, {r['kv_cache']} KV")  # fmt: skip
        for family in sorted({r["run"].split(" ")[0] for r in rs if r["gamma"] is not None}):
            fr = sorted((r for r in rs if r["run"].split(" ")[0] == family),
                        key=lambda r: r["gamma"])  # fmt: skip
            ax.plot([r["gamma"] for r in fr], [r["decode_tokens_per_s"] for r in fr], "o-",
                    label=family)  # fmt: skip
        ax.set_xlabel("gamma (draft tokens per step)")
        ax.set_ylabel("decode tokens/s (median)")
        ax.set_title(f"SmolLM2-135M, {ctx}-token prompt, batch 1")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
