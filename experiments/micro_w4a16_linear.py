"""Micro-benchmark: the W4A16 CPU kernel alone on SmolLM2 linear shapes, 30 weights per call.

    python -m experiments.micro_w4a16_linear

Prints median ms of 15 calls of 30 chained matmuls (different weights, so L2 cannot hold them)
and the GB/s of packed bytes + float32 scales and mins read. Not a test.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_kernels as ck
from qspec_jax.bench.common import median_wall


def main() -> None:
    """Runs the micro-benchmark and prints one line per shape and row count."""
    rng = np.random.default_rng(0)
    L = 30
    for K, N in ((576, 3072), (1536, 576), (576, 960)):
        ws = [
            (
                jnp.asarray(rng.integers(0, 256, (K // 2, N), dtype=np.uint8)),
                jnp.asarray(rng.random((K // 32, N), dtype=np.float32)),
                jnp.asarray(rng.random((K // 32, N), dtype=np.float32)),
            )
            for _ in range(L)
        ]
        for M in (1, 4):
            x = jnp.asarray(rng.standard_normal((M, K)).astype(np.float32))

            @jax.jit
            def f(x, ws):
                acc = jnp.zeros((x.shape[0], ws[0][0].shape[1]), jnp.float32)  # [M, N]
                for p, s, m in ws:
                    acc = acc + ck.w4a16_matmul_cpu(x, p, s, m)
                return acc

            f(x, ws).block_until_ready()
            med = median_wall(lambda f=f, x=x, ws=ws: f(x, ws).block_until_ready(), 15)
            byt = L * (K // 2 * N + 2 * K // 32 * N * 4)
            print(
                f"K={K} N={N} M={M}: {1e3 * med:.2f} ms for {L} calls, {1e6 * med / L:.0f} us/call, {byt / med / 1e9:.1f} GB/s"
            )


if __name__ == "__main__":
    main()
