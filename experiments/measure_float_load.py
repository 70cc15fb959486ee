"""Loading the embedded model's float weights: from the GGUF, from the cached checkpoint, cache off.

One process, a fresh `QSPEC_JAX_CACHE_DIR` (a temporary directory, deleted at the end), the
compilation cache off: the first load reads and dequantizes the GGUF, converts its tokenizer and
writes both caches; the next two read the cached checkpoint and tokenizer; the last runs with
`quant_cache=False` (GGUF read, dequantization and tokenizer conversion every time).

    python -m experiments.measure_float_load
"""

import os
import shutil
import tempfile
import time


def main() -> int:
    os.environ["QSPEC_JAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="qspec-floatload-")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import qspec_jax

    try:
        for label in ("first (GGUF read + dequantize, caches written)", "second (cached)",
                      "third (cached)"):  # fmt: skip
            t = time.perf_counter()
            e = qspec_jax.load("smollm2-135m", compile_cache=False)
            print(f"{label}: {time.perf_counter() - t:.1f} s, "
                  f"quant_cache={e.load_info['quant_cache']}", flush=True)  # fmt: skip
        t = time.perf_counter()
        qspec_jax.load("smollm2-135m", compile_cache=False, quant_cache=False)
        print(f"caches off: {time.perf_counter() - t:.1f} s", flush=True)
    finally:
        shutil.rmtree(os.environ["QSPEC_JAX_CACHE_DIR"], ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
