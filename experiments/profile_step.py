"""Where one decode step's time goes, SmolLM2-135M on CPU: measured steps and their parts.

Everything is timed the way the engine runs it: inside a loop. XLA hoists work that depends
only on the weights out of a loop (on CPU it unpacks / dequantizes the int4 weights once,
before the engine's while_loop, and then reads the unpacked copy every step), so a part timed
alone would pay costs the engine does not. For each batch size, medians of --reps calls:

* "step in generate": the engine's own compiled program; (wall(41 tokens) - wall(9 tokens)) /
  (steps(41) - steps(9)), so prefill and compilation drop out (both lengths share one
  max_new_tokens bucket, hence one program). AR fp, w4a16, w4a4, and one QSpec round (gamma
  W4A4 drafts + one W4A16 verify of gamma + 1 positions + acceptance + commit). EOS ignored.
* "forward + argmax in a loop": `forward` + argmax, --iters times in a fori_loop (the cache in
  the carry, updated in place), divided by --iters: AR fp / w4a16 / w4a4 (= one QSpec draft
  token) and the verify forward over gamma + 1 positions. "forward alone" is the same forward
  jitted by itself, for comparison (it unpacks the int4 weights on every call).
* the parts of those forwards, each in its own fori_loop doing the part for all 30 layers with
  each layer's own weights (so one iteration is the part's cost per step): the four linears of
  a block (activation quantization included for w4a4, and measured alone), the online
  Hadamard transforms (QuaRot), attention over the whole cache capacity, the cache writes,
  the rest of the block (RMSNorms, RoPE, SiLU, residual adds), the embedding lookup, the LM
  head (final norm + the [576, 49152] float32 matmul) and greedy sampling (argmax).

"sum of parts" is compared with the measured forward (isolated parts lose the fusions across
their boundaries, and each loop iteration adds a small feedback reduction, so the two need not
match; the gap is printed, not hidden); "step - forward" is the loop's own bookkeeping (commit,
finish checks, copies). The machine is shared: compare only within one run.

    python -m experiments.profile_step [--batches 1,8] [--gamma 3] [--context 64]
        [--capacity 192] [--reps 15] [--iters 8] [--group-size 64]

Writes experiments/results/profile_step.json and prints one table per batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from qspec_jax.bench.common import int_list, median_time, run_meta, usage_error, write_json

PARTS = (
    "qkv matmul",
    "o matmul",
    "gate_up matmul",
    "down matmul",
    "online Hadamard",
    "attention",
    "cache writes",
    "norms/RoPE/SiLU/residual",
    "embed",
    "lm_head",
)


def _looped(part, n_iter):
    """jit(run(consts, x)): `part(consts, x)` n_iter times in a fori_loop, each iteration's
    input depending on the previous output (through a scalar), so nothing that depends on x is
    hoisted, while what depends only on `consts` (e.g. int4 dequantization) may be hoisted out
    of the loop exactly as XLA does in the engine's while_loop."""
    import jax
    import jax.numpy as jnp

    def run(consts, x):
        def body(i, x):
            out = part(consts, x)
            s = sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree_util.tree_leaves(out))
            bump = (s * 1e-30 + 0.0 * i).astype(jnp.float32)
            return jax.tree_util.tree_map(
                lambda a: (
                    a + (bump > 1e30).astype(a.dtype)
                    if a.dtype.kind in "iu"
                    else a + bump.astype(a.dtype)
                ),
                x,
            )

        return jax.lax.fori_loop(0, n_iter, body, x)

    return jax.jit(run)


def profile_batch(fp, q, batch, gamma, context, capacity, reps, n_iter=8, alone=True):
    """All timings of one batch size (ms per step); returns a list of row dicts."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import dispatch
    from qspec_jax.cache import KVCache, set_lengths
    from qspec_jax.cache.kv_cache import write_layer
    from qspec_jax.decoding.sampling import SamplingConfig, sample
    from qspec_jax.model.linear import ACT_BITS, linear
    from qspec_jax.model.llama import (
        apply_rope,
        attention,
        forward,
        lm_head,
        rms_norm,
        rope_inv_freq,
    )

    cfg = q.config
    rows = []
    key = jax.random.PRNGKey(2)

    def cache_at(fill):
        c = KVCache.init(cfg, batch, capacity)
        return set_lengths(c, jnp.full((batch,), fill, jnp.int32))

    def add(kind, part, seconds):
        rows.append(dict(batch=batch, kind=kind, part=part, ms=seconds * 1e3))
        print(f"  b={batch} {kind:<16} {part:<32} {seconds * 1e3:9.3f} ms", flush=True)

    def timed_loop(part, consts, x):
        return median_time(_looped(part, n_iter), consts, x, reps=reps) / n_iter

    # ------------------------------------------------------------------ steps inside generate
    # The engine's own program; (wall(long) - wall(short)) / (steps(long) - steps(short)) is
    # the cost of one loop iteration with prefill and compilation taken out. Both lengths fall
    # in one max_new_tokens bucket, so they run the same compiled program.
    prompts = [list(range(100 + 7 * i, 100 + 7 * i + context)) for i in range(batch)]
    short, long_ = 9, 41
    gens = (
        ("AR fp", fp, "fp"),
        ("AR w4a16", q, "w4a16"),
        ("AR w4a4 / draft", q, "w4a4"),
        ("QSpec round", q, "qspec"),
    )
    for kind, eng, mode in gens:
        kw = dict(mode=mode, gamma=gamma, ignore_eos=True)
        eng.generate(prompts, max_new_tokens=long_, **kw)  # compile / warm up
        per = []
        for _ in range(max(3, reps // 3)):
            a = eng.generate(prompts, max_new_tokens=short, **kw).stats
            z = eng.generate(prompts, max_new_tokens=long_, **kw).stats
            per.append((z["wall_s"] - a["wall_s"]) / max(z["steps"] - a["steps"], 1))
        add(kind, "step in generate", statistics.median(per))

    # ------------------------------------------------------------------ forwards in a loop
    forwards = (
        ("AR fp", fp, "fp", 1),
        ("AR w4a16", q, "w4a16", 1),
        ("AR w4a4 / draft", q, "w4a4", 1),
        (f"verify (w4a16, {gamma + 1})", q, "w4a16", gamma + 1),
    )

    def fwd_part(eng, precision, t):
        def part(p, carry):
            toks, ck, cv = carry
            c = cache_at(context).replace(k=ck, v=cv)
            logits, c = forward(p, toks, c, cfg, eng.qconfig, precision)  # [batch, t, V]
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [batch, t]
            return nxt, c.k, c.v

        def run(p, carry):
            def body(i, carry):
                return part(p, carry)

            return jax.lax.fori_loop(0, n_iter, body, carry)

        return jax.jit(run, donate_argnums=(1,))

    for kind, eng, precision, t in forwards:
        c = cache_at(context)
        fn = fwd_part(eng, precision, t)
        carry = (jnp.ones((batch, t), jnp.int32), c.k, c.v)
        sec = median_time(fn, eng.params, carry, reps=reps, feed=lambda a, o: (a[0], o)) / n_iter
        add(kind, "forward + argmax in a loop", sec)
        if not alone:
            continue
        # the same forward jitted alone: XLA cannot hoist the int4 unpacking out of a loop
        fn1 = jax.jit(
            lambda p, toks, ck, cv, e=eng, pr=precision: (
                forward(p, toks, cache_at(context).replace(k=ck, v=cv), cfg, e.qconfig, pr)[1].k
            ),
        )
        add(
            kind,
            "forward alone (not in a loop)",
            median_time(
                fn1,
                eng.params,
                jnp.ones((batch, t), jnp.int32),
                cache_at(context).k,
                cache_at(context).v,
                reps=reps,
            ),
        )

    # ------------------------------------------------------------------ parts in a loop
    inv_freq = rope_inv_freq(cfg)
    n = cfg.num_layers
    keys = jax.random.split(key, 6 * n)

    def parts(kind, eng, precision, t):
        layers = eng.params.layers
        qc = eng.qconfig

        def rnd(i, *shape):  # distinct inputs per layer, so XLA cannot merge the 30 copies
            return jax.random.normal(keys[i], shape, jnp.float32)

        xs576 = [rnd(i, batch, t, cfg.hidden_size) for i in range(n)]
        xs1536 = [rnd(n + i, batch, t, cfg.intermediate_size) for i in range(n)]

        def lin(field, big):
            return lambda ls, xs: [
                linear(x, getattr(lp, field), precision, qc) for lp, x in zip(ls, xs)
            ]

        for name, field, xs in (
            ("qkv matmul", "wqkv", xs576),
            ("o matmul", "wo", xs576),
            ("gate_up matmul", "w_gate_up", xs576),
            ("down matmul", "w_down", xs1536),
        ):
            add(kind, name, timed_loop(lin(field, xs is xs1536), layers, xs))
        if precision in ACT_BITS:
            bits = ACT_BITS[precision]

            def aq(_, xs):
                a576, a1536 = xs
                out = []
                for a, b in zip(a576, a1536):  # inputs of qkv, o, gate_up (576) and down (1536)
                    for x in (a, a * 0.5, a * 2.0, b):
                        out.append(
                            dispatch.quantize_activations(
                                x,
                                bits=bits,
                                group_size=qc.act_group_size,
                                clip_ratio=qc.act_clip_ratio,
                            )
                        )
                return out

            add(kind, "(of which act. quantization)", timed_loop(aq, None, (xs576, xs1536)))
        if qc.rotated:

            def had(_, xs):
                return [
                    (dispatch.hadamard_transform(a), dispatch.hadamard_transform(b))
                    for a, b in zip(*xs)
                ]

            add(kind, "online Hadamard", timed_loop(had, None, (xs576, xs1536)))
        else:
            add(kind, "online Hadamard", 0.0)

        cache = cache_at(context)
        positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        qs = [rnd(2 * n + i, batch, t, cfg.num_heads, cfg.head_dim) for i in range(n)]
        kvs = [rnd(3 * n + i, batch, t, cfg.num_kv_heads, cfg.head_dim) for i in range(n)]

        def attn(kv, qs):
            ck, cv = kv
            return [attention(qh, ck[i], cv[i], positions) for i, qh in enumerate(qs)]

        add(kind, "attention", timed_loop(attn, (cache.k, cache.v), qs))

        def writes(p, carry):  # the cache is the carry: updated in place, as in the engine
            kvs, (ck, cv) = p, carry
            for i, kv in enumerate(kvs):
                ck, cv = write_layer(ck, cv, jnp.int32(i), positions, kv, kv)
            return ck, cv

        def run_writes(kvs, carry):
            return jax.lax.fori_loop(0, n_iter, lambda i, c: writes(kvs, c), carry)

        add(
            kind,
            "cache writes",
            median_time(
                jax.jit(run_writes, donate_argnums=(1,)),
                kvs,
                (cache.k, cache.v),
                reps=reps,
                feed=lambda a, o: (a[0], o),
            )
            / n_iter,
        )

        def rest(ls, xs):
            x, qs, kvs, gs = xs
            outs = []
            for lp, qh, kv, g in zip(ls, qs, kvs, gs):
                h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)  # [batch, t, D]
                outs.append(apply_rope(qh, positions, inv_freq))
                outs.append(apply_rope(kv, positions, inv_freq))
                x = x + h  # residual
                h2 = rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
                outs.append(jax.nn.silu(g) * (g + 1.0))  # SiLU(gate) * up  [batch, t, F]
                x = x + h2
            return x, outs

        add(kind, "norms/RoPE/SiLU/residual", timed_loop(rest, layers, (xs576[0], qs, kvs, xs1536)))
        toks = jnp.ones((batch, t), jnp.int32)
        add(kind, "embed", timed_loop(lambda p, tk: p.embed[tk], eng.params, toks))
        xh = xs576[0] if t > 1 else xs576[0][:, 0]

        def head(p, x):
            return lm_head(p, rms_norm(x, p.final_norm, cfg.rms_norm_eps))

        add(kind, "lm_head", timed_loop(head, eng.params, xh))
        shape = (batch, t, cfg.vocab_size) if t > 1 else (batch, cfg.vocab_size)
        logits = jax.random.normal(key, shape)
        add(
            kind,
            "sampling (argmax)",
            timed_loop(lambda _, lg: sample(lg, key, SamplingConfig()), None, logits),
        )

    for kind, eng, precision, t in forwards:
        parts(kind, eng, precision, t)
    return rows


def summarize(rows, gamma):
    """Per (batch, kind): the measured rows plus sum of parts, unexplained and bookkeeping."""
    out = []
    for b in sorted({r["batch"] for r in rows}):
        kinds = []
        for r in rows:
            if r["batch"] == b and r["kind"] not in kinds:
                kinds.append(r["kind"])
        for k in kinds:
            mine = {r["part"]: r["ms"] for r in rows if r["batch"] == b and r["kind"] == k}
            fwd = mine.get("forward + argmax in a loop")
            if fwd is not None:
                s = sum(mine.get(p, 0.0) for p in PARTS)
                mine["sum of parts"] = s
                mine["forward - sum of parts"] = fwd - s
            if fwd is not None and "step in generate" in mine:
                mine["step - forward (loop bookkeeping)"] = mine["step in generate"] - fwd
            out.append(dict(batch=b, kind=k, parts=mine))
        by = {o["kind"]: o["parts"] for o in out if o["batch"] == b}
        d, v = (
            by.get("AR w4a4 / draft", {}),
            next((p for k, p in by.items() if k.startswith("verify")), {}),
        )
        r = by.get("QSpec round")
        if (
            r is not None
            and "forward + argmax in a loop" in d
            and "forward + argmax in a loop" in v
        ):
            pred = gamma * d["forward + argmax in a loop"] + v["forward + argmax in a loop"]
            r["gamma x draft + verify (forwards)"] = pred
            r["round - forwards (accept, commit, loop)"] = r["step in generate"] - pred
    return out


def print_table(table):
    for b in sorted({o["batch"] for o in table}):
        cols = [o for o in table if o["batch"] == b]
        names = []
        for o in cols:
            for p in o["parts"]:
                if p not in names:
                    names.append(p)
        first = ("step in generate", "forward + argmax in a loop", "forward alone (not in a loop)")
        order = [n for n in first if n in names] + [n for n in names if n not in first]
        print(f"\nbatch {b} (ms per call, median)")
        print("| part | " + " | ".join(o["kind"] for o in cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for n in order:
            cells = [f"{o['parts'][n]:.2f}" if n in o["parts"] else "" for o in cols]
            print(f"| {n} | " + " | ".join(cells) + " |")


def hoist_check(eng, context, max_new=41):
    """Where the int4 unpacking runs in the engine's compiled W4A16 generate program.

    Returns {computation: number of fusions that shift packed uint8 codes}, "ENTRY" meaning
    before the while_loop (hoisted: float copies written once per call), plus one example line.
    """
    import re

    import jax
    import jax.numpy as jnp

    from qspec_jax.cache import KVCache

    dc = eng.decode_config(eng.method("w4a16"), max_new, ignore_eos=True)
    toks = jnp.zeros((1, context), jnp.int32)
    lens = jnp.full((1,), context, jnp.int32)
    cap = eng._plan([[0] * context], dc)[2]
    fn, _, _ = eng.compiled_generate(
        KVCache.init(eng.config, 1, cap), toks, lens, jax.random.PRNGKey(0), jnp.int32(max_new), dc
    )
    comps, owner, cur = {}, {}, None
    for line in fn.as_text().split("\n"):
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            cur = "ENTRY" if line.startswith("ENTRY") else line.split(" ")[0]
            comps[cur] = []
            continue
        if cur is not None:
            comps[cur].append(line)
        for m in re.finditer(r"calls=(%[\w.\-]+)", line):
            owner.setdefault(m.group(1), set()).add(cur)
    unpack = [c for c, ls in comps.items() if any("shift-right" in x and "u8[" in x for x in ls)]
    where: dict[str, int] = {}
    for c in unpack:
        for o in owner.get(c, {"?"}):
            where[o] = where.get(o, 0) + 1
    example = next(
        (x.strip()[:120] for x in comps.get("ENTRY", []) if "fusion(" in x and "packed" in x), ""
    )
    return dict(unpack_fusions_called_from=where, example=example)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--context", type=int, default=64, help="tokens already in the cache")
    ap.add_argument(
        "--capacity",
        type=int,
        default=192,
        help="KV cache capacity of the parts (192: what the engine allocates for --context 64)",
    )
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--iters", type=int, default=8, help="loop iterations per timed call")
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (or tiny, to smoke-test)")
    ap.add_argument("--quant", default="quarot-rtn")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default="experiments/results/profile_step.json")
    ap.add_argument(
        "--hoist-check",
        action="store_true",
        help="only report where the W4A16 generate program unpacks the int4 weights",
    )
    args = ap.parse_args()
    try:
        batches = int_list(args.batches)
    except ValueError:
        return usage_error("--batches takes comma-separated integers, e.g. 1,8")
    if not (
        1 <= args.gamma <= 16
        and 1 <= args.context
        and args.context + 8 * (args.gamma + 1) <= args.capacity
    ):
        return usage_error("need 1 <= gamma <= 16 and context + 8 (gamma + 1) <= capacity")

    import qspec_jax

    q = qspec_jax.load(args.model, quant=args.quant, group_size=args.group_size, progress=False)
    if args.hoist_check:
        print(json.dumps(hoist_check(q, args.context)))
        return 0
    fp = qspec_jax.load(args.model, progress=False)
    t0 = time.time()
    rows = []
    for i, b in enumerate(batches):
        rows += profile_batch(
            fp,
            q,
            b,
            args.gamma,
            args.context,
            args.capacity,
            args.reps,
            args.iters,
            alone=(i == 0),
        )
        table = summarize(rows, args.gamma)
        result = run_meta(
            t0,
            settings=vars(args),
            complete=(i == len(batches) - 1),
            rows=rows,
            table=table,
        )
        write_json(args.out, result)  # after every batch size: a long run keeps what it measured
    print_table(table)
    print(f"\nwrote {args.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
