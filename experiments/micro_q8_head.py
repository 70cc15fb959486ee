"""Micro-benchmark: the Q8_0 head kernel vs XLA float32 dot, [49152, 576] random codes, M = 1 and 4.

    python -m experiments.micro_q8_head

Prints max relative error vs float64, row independence, and the 11th fastest of 20 calls in ms
(the upper median). Not a test.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_kernels as ck


def main() -> None:
    """Runs the micro-benchmark and prints its lines."""
    print(ck.unavailable_reason())
    rng = np.random.default_rng(0)
    V, D = 49152, 576
    codes = rng.integers(-127, 128, (V, D), dtype=np.int8)
    sc = (rng.random((V, D // 32)) * 0.01).astype(np.float32)
    w = codes.astype(np.float32) * np.repeat(sc, 32, 1)
    for m in (1, 4):
        x = rng.standard_normal((m, D)).astype(np.float32)
        f = jax.jit(ck.q8_matmul_cpu)
        o = np.asarray(f(x, codes, sc))
        ref = x.astype(np.float64) @ w.T.astype(np.float64)
        print(m, np.abs(o - ref).max() / np.abs(ref).max())
        if m == 4:
            o1 = np.stack([np.asarray(f(x[i : i + 1], codes, sc))[0] for i in range(4)])
            print("row indep", np.array_equal(o1, o))
        cj = jnp.asarray(codes)
        sj = jnp.asarray(sc)
        xj = jnp.asarray(x)
        wj = jnp.asarray(w.T)
        g = jax.jit(lambda x, w: x @ w)
        for name, fn, args in (("q8", f, (xj, cj, sj)), ("f32", g, (xj, wj))):
            fn(*args).block_until_ready()
            ts = []
            for _ in range(20):
                t = time.perf_counter()
                fn(*args).block_until_ready()
                ts.append(time.perf_counter() - t)
            print(m, name, "%.2f ms" % (1e3 * sorted(ts)[10]))


if __name__ == "__main__":
    main()
