"""Long-context decoding on SmolLM2-135M: float and int4 weights over float and hierarchical KV.

The prompt is a long document written by this script (no download): a registry of numbered
items, each with a made-up code ("The code of the amber lantern in room 17 is 4821."), cut to
exactly N tokens and followed by a question about one item near the start of the document.

One engine per target dtype (--dtypes, float32 and bfloat16) holding two weight sets
(`load("smollm2-135m", draft_quant=--draft-quant, dtype=...)`: the float target and the GGUF's
own Q4_1 codes as the 4-bit copy). Per context length the prompt is prefilled once per main
precision (fp, and w4a16 when a W4A16 row runs) into the float cache, laid out for the largest
step; the hierarchical cache is filled from the same K/V by its `finish_prefill`; every row's
decode loop starts from that prefilled state. Rows (--modes):

* ``fp-float`` float AR on the float cache (the baseline of every ratio), ``fp-hier`` float AR
  on the hierarchical cache (int8 KV + a float buffer of up to 2R tokens);
* ``w4a16-float`` / ``w4a16-hier`` W4A16 AR on the int4 copy;
* ``quantspec-fp`` QuantSpec as published, `QuantSpec(verify="fp")`: W4A16 drafts over the int4
  KV view, float verification over the int8 view, at each gamma (--gammas, default 1..6);
* ``quantspec`` (W4A16 drafts and verify), ``qspec-hier`` / ``qspec-float`` (QSpec, --draft).

Timing: every decode loop is compiled ahead of time; then --rounds rounds each run every row
once, in order (so slow drifts of a shared machine hit all rows alike); the median decode time
per row is reported. Per row: decode tokens/s, its ratio to float AR on the float cache and on
the hierarchical cache, acceptance, tokens per verify step, KV bytes per token at the end, the
bytes of the weight sets the row reads, the attention implementation, whether the tokens equal
the row's reference (speculative rows: AR in their verify precision on the same cache, exact),
and whether the answer contains the asked code. Greedy, EOS ignored. Writes the JSON and a PNG
plot (tokens/s against gamma, one panel per dtype and context) next to it.

    python -m experiments.bench_longctx [--contexts 1024,2048,4096,8000] [--gammas 1,2,3,4,5,6]
        [--dtypes float32,bfloat16] [--new-tokens 32] [--rounds 3] [--residual 128]
        [--modes fp-float,fp-hier,w4a16-float,quantspec-fp]
    python -m experiments.bench_longctx --merge a.json,b.json --out combined.json  # table+plot
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


def _runs(modes, gammas, qgammas):
    """(row name, mode, kv cache, gamma, verify) for the chosen --modes."""
    runs = []
    for m in modes:
        if m in ("fp-float", "fp-hier", "w4a16-float", "w4a16-hier"):
            prec, kv = m.split("-")
            runs.append((f"{prec} AR {kv}", prec, kv, None, prec))
        elif m == "quantspec-fp":
            runs += [(f"quantspec-fp g{g}", "quantspec", "hier", g, "fp") for g in gammas]
        elif m == "quantspec":
            runs += [(f"quantspec g{g}", "quantspec", "hier", g, "w4a16") for g in gammas]
        elif m in ("qspec-hier", "qspec-float"):
            kv = m.split("-")[1]
            runs += [(f"{m} g{g}", "qspec", kv, g, "w4a16") for g in qgammas]
        else:
            raise SystemExit(f"unknown row kind {m!r} in --modes")
    return runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--contexts", default="1024,2048,4096,8000")
    ap.add_argument("--gammas", default="1,2,3,4,5,6", help="QuantSpec draft lengths")
    ap.add_argument("--qspec-gammas", default="1,2,3,4,5,6", help="QSpec draft lengths")
    ap.add_argument("--draft", default="w4a8", help="QSpec draft precision")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="target dtypes")
    ap.add_argument("--draft-quant", default="gguf", help="the 4-bit copy's quantizer")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=64, help="for quantizers other than gguf")
    ap.add_argument("--modes", default="fp-float,fp-hier,w4a16-float,quantspec-fp")
    ap.add_argument("--out", default="experiments/results/bench_longctx.json")
    ap.add_argument(
        "--merge",
        default="",
        help="comma-separated result JSONs of runs made in parts: print their rows' table and "
        "plot them together to --out's PNG (runs nothing)",
    )
    args = ap.parse_args(argv)
    if args.merge:
        rows = []
        for path in args.merge.split(","):
            with open(path) as f:
                rows += json.load(f)["rows"]
        _table(rows)
        _plot(args.out, rows)
        return 0
    import dataclasses
    import statistics

    import jax
    import jax.numpy as jnp
    import numpy as np

    import qspec_jax
    from qspec_jax.cache import make_cache

    started = time.time()
    gammas = [int(g) for g in args.gammas.split(",")]
    qgammas = [int(g) for g in args.qspec_gammas.split(",")]
    runs = _runs(args.modes.split(","), gammas, qgammas)
    rows, prefills = [], []
    for dtype in args.dtypes.split(","):
        t0 = time.perf_counter()
        engine = qspec_jax.load(
            "smollm2-135m", draft_quant=args.draft_quant, group_size=args.group_size,
            dtype=dtype, progress=False,
        )  # fmt: skip
        wsets = engine.weight_bytes_by_set  # {"target": float bytes, "draft": int4 bytes}
        print(f"{dtype}: loaded in {time.perf_counter() - t0:.0f}s, weights {wsets}", flush=True)
        for ctx in (int(c) for c in args.contexts.split(",")):
            ids, code = build_prompt(engine.tokenizer, ctx)

            def dconf(eng, mode, g, verify):
                opts = dict(gamma=g or 1)
                if g is not None:  # speculative rows: their verifier's precision
                    opts["verify"] = verify
                if mode == "qspec":
                    opts["draft"] = args.draft
                m = eng.method(mode, **opts)
                dc = eng.decode_config(m, args.new_tokens)
                return dataclasses.replace(dc, eos_ids=())

            dcs = {name: dconf(engine, mode, g, v) for name, mode, _, g, v in runs}
            # one prefill per main precision into the float cache, laid out for the largest
            # step (every row fits it); the hierarchical cache is filled from its K/V by
            # `finish_prefill`, which is what its own prefill computes whenever the prompt
            # bucket equals the capacity, and otherwise differs only in float rounding.
            dc_plan = max(dcs.values(), key=lambda d: d.tokens_per_step)
            states, t_pf = {}, {}
            for prec in sorted({dcs[name].main_precision for name, *_ in runs}):
                plan = dataclasses.replace(dc_plan, method=engine.method(prec))
                t1 = time.perf_counter()
                st_f, t_pf[prec], cap = _prefill_state(engine, ids, "float", plan, args.residual)
                prefills.append(dict(dtype=dtype, context=ctx, precision=prec,
                                     prefill_s=t_pf[prec], capacity=cap))  # fmt: skip
                print(f"{dtype} ctx {ctx} {prec} prefill: {t_pf[prec]:.1f}s "
                      f"({time.perf_counter() - t1:.0f}s incl. compile)", flush=True)  # fmt: skip
                states[prec, "float"] = st_f
                if any(kv == "hier" for _, _, kv, *_ in runs):
                    hc = make_cache("hier", engine.config, 1, cap, residual=args.residual,
                                    step_tokens=dc_plan.tokens_per_step)  # fmt: skip
                    lens = jnp.asarray([len(ids)], jnp.int32)
                    fill = jax.jit(lambda c, s, n: c.finish_prefill(s, n))
                    hier = jax.block_until_ready(fill(hc, st_f.cache, lens))
                    states[prec, "hier"] = st_f.replace(cache=hier)
            compiled = {}
            for name, _, kv, _, _ in runs:
                t1 = time.perf_counter()
                engine._check_kv_cache(dcs[name].method, kv, args.residual)
                s0 = _mode_state(states[dcs[name].main_precision, kv], dcs[name])
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
            # the reference of a row: AR in its verify precision on its cache
            ref = {(v, kv): finals[name][0] for name, mode, kv, g, v in runs if g is None}
            for name, mode, kv, g, verify in runs:
                toks, st = finals[name]
                t_dec = statistics.median(times[name])
                text = engine.decode(toks)
                same = None if g is None else (
                    toks == ref[verify, kv] if (verify, kv) in ref else None)  # fmt: skip
                spec = g is not None
                prop = int(st.draft_proposed[0]) if spec else 0
                acc = int(st.draft_accepted[0]) if spec else 0
                vsteps = int(st.verify_steps[0])
                lengths = [int(st.cache.lengths[0])]
                m = dcs[name].method
                reads = sorted({"target" if p == "fp" else "draft" for p in
                                (m.precisions if spec else (m.main_precision,))})  # fmt: skip
                row = dict(
                    dtype=dtype, context=ctx, prompt_tokens=len(ids), run=name, mode=mode,
                    kv_cache=kv, gamma=g, verify=verify,
                    draft=m.draft_precision if spec else None,
                    decode_tokens_per_s=(len(toks) - 1) / t_dec, decode_s=t_dec,
                    decode_s_rounds=times[name],
                    prefill_s=t_pf[m.main_precision],
                    acceptance=acc / prop if prop else None,
                    tokens_per_step=(len(toks) - 1) / vsteps if spec else None,
                    kv_bytes_per_token=type(st.cache).kv_bytes(st.cache, lengths) / lengths[0],
                    weight_bytes_read={k: wsets[k] for k in reads},
                    weight_bytes_held=sum(wsets.values()),
                    attention_impl=getattr(getattr(st.cache, "layout", None),
                                           "attention_impl", None),
                    same_tokens_as_ar=same, answer_has_code=str(code) in text, text=text[:80],
                )  # fmt: skip
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items()
                                  if k not in ("text", "decode_s_rounds")}), flush=True)  # fmt: skip
            _write(args.out, args, rows, prefills, started)
            del states, compiled, finals
        del engine
    _table(rows)
    _plot(args.out, rows)
    return 0


def _table(rows):
    """The markdown table of every row, ratios against float AR on each cache."""

    def base(r, kv):
        return next((x["decode_tokens_per_s"] for x in rows if x["dtype"] == r["dtype"]
                     and x["context"] == r["context"] and x["run"] == f"fp AR {kv}"), None)  # fmt: skip

    print(
        "\n| dtype | context | run | decode tok/s | vs fp AR float KV | vs fp AR hier KV "
        "| acceptance | tok/step | KV B/token | weight MB read | same as AR | answer |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        d = r["decode_tokens_per_s"]
        bf, bh = base(r, "float"), base(r, "hier")
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        tps = "" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}"
        same = "" if r["same_tokens_as_ar"] is None else r["same_tokens_as_ar"]
        mb = sum(r["weight_bytes_read"].values()) / 1e6
        print(f"| {r['dtype']} | {r['context']} | {r['run']} | {d:.2f} | "
              f"{d / bf if bf else float('nan'):.2f}x | {d / bh if bh else float('nan'):.2f}x | "
              f"{acc} | {tps} | {r['kv_bytes_per_token']:.0f} | {mb:.0f} | {same} | "
              f"{'yes' if r['answer_has_code'] else 'no'} |")  # fmt: skip


def _write(path, args, rows, prefills, started):
    from qspec_jax.bench.common import run_meta, write_json

    meta = run_meta(started, settings=vars(args))
    write_json(path, dict(meta=meta, prefills=prefills, rows=rows))


def _plot(path, rows):
    """Decode tokens/s against gamma, one panel per (dtype, context); AR rows as horizontal
    lines. PNG next to path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    panels = sorted({(r["dtype"], r["context"]) for r in rows})
    ncol = len({c for _, c in panels})
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.5 * ncol, 4.2 * nrow), squeeze=False)
    styles = {"fp AR float": ("gray", ":"), "fp AR hier": ("black", "--"),
              "w4a16 AR float": ("tab:red", ":"), "w4a16 AR hier": ("tab:red", "--")}  # fmt: skip
    for ax, (dtype, ctx) in zip(axes.flat, panels):
        rs = [r for r in rows if r["context"] == ctx and r["dtype"] == dtype]
        for r in (r for r in rs if r["gamma"] is None):
            color, ls = styles.get(r["run"], ("tab:gray", "-."))
            ax.axhline(r["decode_tokens_per_s"], color=color, linestyle=ls, label=r["run"])
        for family in sorted({r["run"].split(" ")[0] for r in rs if r["gamma"] is not None}):
            fr = sorted((r for r in rs if r["run"].split(" ")[0] == family),
                        key=lambda r: r["gamma"])  # fmt: skip
            ax.plot([r["gamma"] for r in fr], [r["decode_tokens_per_s"] for r in fr], "o-",
                    label=family)  # fmt: skip
            for r in fr:
                if r["acceptance"] is not None:
                    ax.annotate(f"{r['acceptance']:.2f}", (r["gamma"], r["decode_tokens_per_s"]),
                                fontsize=7, textcoords="offset points", xytext=(0, 5))  # fmt: skip
        ax.set_xlabel("gamma (draft tokens per step; labels: acceptance)")
        ax.set_ylabel("decode tokens/s (median)")
        ax.set_title(f"SmolLM2-135M {dtype}, {ctx}-token prompt, batch 1", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    png = os.path.splitext(path)[0] + ".png"
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
