"""Where a warm process's first `generate` goes: cProfile of loading and the first call.

In one process, with the caches under `QSPEC_JAX_CACHE_DIR` (or the user's cache home) warmed by
a first `qspec_jax.load` + `generate` in a child process, it profiles:

* reading the GGUF file itself (`qspec_jax.loading.load_checkpoint`, int4 codes kept): the time
  inside gguf's `GGUFReader` (which parses every metadata field eagerly);
* `qspec_jax.load("smollm2-135m", quant="gguf")` from the warm caches: the checkpoint restore and
  the cached tokenizer read;
* the first `generate(mode=...)`: tracing, lowering and the persistent compilation cache read.

Prints cumulative seconds of those functions (cProfile adds overhead; read shares, not totals).

    python -m experiments.profile_first_call [--mode qspec]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WATCH = {
    "gguf_reader.py:132(__init__)": "GGUFReader (parse every field)",
    "load_quantized": "checkpoint restore",
    "load_cached_tokenizer": "cached tokenizer read",
    "trace_to_jaxpr": "tracing",
    "lower_jaxpr_to_module": "lowering",
    "_cache_read": "persistent cache read",
}


def profiled(fn):
    """(result, wall seconds, {label: cumulative seconds}) of fn() under cProfile."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    out = prof.runcall(fn)
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    found = {}
    for (file, line, name), (_, _, _, ct, _) in stats.items():
        key = f"{os.path.basename(file)}:{line}({name})"
        for pat, label in WATCH.items():
            if pat == name or pat == key:
                found[label] = max(found.get(label, 0.0), ct)  # outermost call's cumulative time
    return out, wall, found


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="qspec")
    ap.add_argument("--prompt", default="Write a haiku about the sea.")
    args = ap.parse_args(argv)
    warm = (
        "import qspec_jax; e = qspec_jax.load('smollm2-135m', quant='gguf', progress=False); "
        f"e.generate(e.encode([{args.prompt!r}], chat=True), mode={args.mode!r}, "
        "max_new_tokens=16)"
    )
    subprocess.run([sys.executable, "-c", warm], check=True, capture_output=True)

    import qspec_jax
    from qspec_jax.loading import load_checkpoint

    rows = []
    _, wall, f = profiled(lambda: load_checkpoint("smollm2-135m", keep_int4=True))
    rows.append(("read the GGUF file (int4 codes)", wall, f))
    eng, wall, f = profiled(lambda: qspec_jax.load("smollm2-135m", quant="gguf", progress=False))
    rows.append((f"load from the warm caches ({eng.load_info.get('quant_cache')})", wall, f))
    ids = eng.encode([args.prompt], chat=True)
    res, wall, f = profiled(lambda: eng.generate(ids, mode=args.mode, max_new_tokens=16))
    src = res.stats["compile_source"]
    rows.append((f"first generate (compile_s {res.stats['compile_s']:.1f}, {src})", wall, f))
    for what, wall, f in rows:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in f.items()) or "-"
        print(f"{what}: {wall:.2f} s; of which {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
