"""Counts the copies XLA put inside the decoding loop of the compiled generation program.

Compiles `qspec_jax.decoding.loop.generate` (prefill + the `while_loop`) for one mode and KV
cache kind, walks the optimized HLO from every while loop's body through the computations it
calls, and counts `copy` instructions (plain, or a fusion wrapping one) there by result shape.
A copy of a cache-sized array inside the loop is paid on every decoding step: this is how the
whole-cache copies described in the README's QuantSpec section were found and checked gone.
Entry-computation copies (once per call) are reported apart.

    python -m experiments.count_hlo_copies [--model tiny] [--mode w4a16]
        [--kv-cache hier] [--capacity 1024] [--prompt 300]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import sys

HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(")
CALLS = re.compile(r"(?:body|condition|calls|to_apply|branch_computations)=\{?%?([\w.\-, %]+)\}?")
COPY = re.compile(r"= (\S+) (?:copy\(|fusion\(.*calls=%?wrapped_copy)")


def loop_copies(hlo: str) -> tuple[collections.Counter, collections.Counter]:
    """(copies reachable from while bodies, copies in the entry computation), by shape."""
    comps, entry, cur = {}, None, None
    for line in hlo.splitlines():
        m = HEADER.match(line)
        if m:
            cur = m.group(2)
            comps[cur] = []
            entry = cur if m.group(1) else entry
        elif cur is not None and line.startswith(" "):
            comps[cur].append(line)

    def callees(name):
        for line in comps.get(name, []):
            for m in CALLS.finditer(line):
                yield from (c.strip().lstrip("%") for c in m.group(1).split(","))

    bodies = {
        m.group(1) for lines in comps.values() for line in lines
        for m in re.finditer(r"body=%?([\w.\-]+)", line)
    }  # fmt: skip
    seen, todo = set(), list(bodies)
    while todo:
        c = todo.pop()
        if c not in seen and c in comps:
            seen.add(c)
            todo.extend(callees(c))

    def count(names):
        out = collections.Counter()
        for n in names:
            for line in comps[n]:
                m = COPY.search(line)
                if m and not n.startswith("wrapped_copy"):
                    out[m.group(1)] += 1
        return out

    return count(seen), count([entry] if entry else [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny (random weights) or smollm2-135m")
    ap.add_argument("--mode", default="w4a16")
    ap.add_argument("--kv-cache", default="hier", choices=("float", "hier"))
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--capacity", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=300, help="prompt tokens already in the cache")
    args = ap.parse_args(argv)
    if not 1 <= args.prompt < args.capacity:
        print(
            f"error: --prompt must be in [1, {args.capacity}), got {args.prompt}", file=sys.stderr
        )
        return 2

    import jax
    import jax.numpy as jnp

    import qspec_jax
    from qspec_jax.cache import make_cache
    from qspec_jax.decoding import loop

    quant = "gguf" if args.model == "smollm2-135m" else "rtn"
    eng = qspec_jax.load(args.model, quant=quant, group_size=32, progress=False)
    opts = {"gamma": args.gamma, **({"draft": "w4a8"} if args.mode == "qspec" else {})}
    dc = eng.decode_config(eng.method(args.mode, **opts), 16)
    dc = dataclasses.replace(dc, eos_ids=())
    cache = make_cache(
        args.kv_cache, eng.config, 1, args.capacity, residual=128, step_tokens=dc.tokens_per_step
    )
    bucket = 1 << (args.prompt - 1).bit_length()
    toks = jnp.zeros((1, bucket), jnp.int32)
    lens = jnp.asarray([args.prompt], jnp.int32)
    hlo = (
        loop.generate.lower(
            eng.params,
            cache,
            toks,
            lens,
            jax.random.PRNGKey(0),
            cfg=eng.config,
            qcfg=eng.qconfig,
            dc=dc,
        )  # fmt: skip
        .compile()
        .as_text()
    )
    in_loop, in_entry = loop_copies(hlo)
    big = {
        s: n for s, n in in_loop.items() if "[" in s and not s.startswith(("pred", "s32", "u32"))
    }
    print(f"{args.model} {args.mode} kv={args.kv_cache} capacity={args.capacity}")
    arrays = {k: v.shape for k, v in vars(cache).items() if getattr(v, "ndim", 0) == 5}
    print("cache arrays:", ", ".join(f"{k} {tuple(shape)}" for k, shape in arrays.items()))
    print("copies inside the decoding loop (array shapes):", dict(sorted(big.items())) or "none")
    print("copies in the entry computation:", sum(in_entry.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
