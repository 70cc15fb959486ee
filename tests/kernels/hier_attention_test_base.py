"""Shared cases and checks of `pallas_kernels.hier_attention` (decode attention over one layer of
QuantSpec's hierarchical int4/int8 KV cache), run through `pallas_kernels.dispatch` with the class
attribute ``IMPL`` ("xla", "pallas_interpret" here; "pallas" in test_kernels_pallas_gpu.py).

The caches are real `HierKVCache`s (prefilled, quantized and flushed by qspec_jax), so the kernel is
checked against the layout the cache actually stores, then the new rows' K/V are written into the
float buffer like a decoding step does.

Error bounds (absolute, in units of max|V|: the output is a convex combination of the values a row
sees, so its scale is max|V|), and why:

* float32: the reference dequantizes with the same float32 formula and takes one exact float32
  softmax; the kernel (and `HierKVCache.attend`) run a float32 online softmax over key blocks.
  Each result is within a few tens of float32 ulps of the exact value: exp and the sums round at
  2^-24 relative, each block rescales the running sums once, a row reads <= ~100 keys here in
  <= 12 blocks (tests/test_hier_attention.py bounds the block-wise path at 2e-6 * max|V| from a
  float64 reference). Two such results differ by at most the sum: 4e-6 * max|V| (measured
  <= 7e-7).
* bfloat16 (queries, buffer and output in bfloat16, as on the GPU): both sides round the same
  dequantized keys to bfloat16 and accumulate in float32, then round the output to bfloat16 once;
  an output element whose float32 value straddles a rounding boundary differs by one bfloat16 ulp
  (2^-8 relative to an element <= max|V|), so 2^-8 * max|V| bounds every element.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import dispatch
from pallas_kernels.hier_attention import hier_attention_reference
from qspec_jax.cache import HierKVCache
from qspec_jax.cache.hierarchical import dequantize_layer
from qspec_jax.config import preset

ATOL = {jnp.float32: 4e-6, jnp.bfloat16: 2.0**-8}  # times max|V|, see module docstring
LAYER = 1


@dataclasses.dataclass(frozen=True)
class Case:
    """One hierarchical cache and a step of t query rows on it."""

    name: str
    view: str
    t: int
    heads: int = 4  # query heads (GQA group = heads / kv_heads)
    kv_heads: int = 2
    head_dim: int = 32
    lens: tuple[int, ...] = (79, 37, 5)
    residual: int = 16
    key_group: int | None = None  # None: min(128, residual)
    capacity: int = 96
    dtype: type = jnp.float32
    seed: int = 0


# R = 16, G = 16: length 79 has q_len 64 and its buffer from 48; its rows at 79..82 cross
# float_start (48 for p <= 80, 64 from p = 81), so rows of one step read positions 48..63 from codes
# or from floats. Length 37 ends mid-block (q_len 32, buffer from 16); length 5 has no quantized key.
CASES = (
    Case("target-t4-gqa2", "target", 4),
    Case("draft-t4-gqa2", "draft", 4),
    Case("target-t1-gqa3", "target", 1, heads=6),
    Case("draft-t1-gqa4", "draft", 1, heads=8),
    # Default layout (R = G = 128, Q = 1024: two 512-token splits), gamma = 7 (t = 8), bfloat16
    # as on the GPU.
    Case(
        "target-t8-bf16-r128",
        "target",
        8,
        lens=(300, 700),
        residual=128,
        capacity=640,
        dtype=jnp.bfloat16,
    ),
)


@jax.jit
def _finish_prefill(cache, scratch, lens):
    return cache.finish_prefill(scratch, lens)


@functools.cache
def _prefilled(case: Case, lens: tuple[int, ...]) -> HierKVCache:
    """A cache holding random prompts of `lens` tokens (keys: channels of unequal range)."""
    cfg = preset("tiny").replace(
        num_heads=case.heads, num_kv_heads=case.kv_heads, head_dim=case.head_dim
    )
    cache = HierKVCache.init(
        cfg,
        len(lens),
        case.capacity,
        residual=case.residual,
        key_group=case.key_group,
        step_tokens=case.t,
        dtype=case.dtype,
    )
    bucket = cache.layout.q_capacity  # random K/V at every position any length can hold
    rng = np.random.default_rng(case.seed)
    shape = (cfg.num_layers, len(lens), bucket, case.kv_heads, case.head_dim)
    k = rng.standard_normal(shape) * rng.uniform(0.2, 3.0, shape[-1])
    v = rng.standard_normal(shape) + rng.uniform(-1.0, 1.0, shape[:-1] + (1,))
    scratch = cache.prefill_cache(bucket)
    scratch = scratch.replace(k=jnp.asarray(k, case.dtype), v=jnp.asarray(v, case.dtype))
    return _finish_prefill(cache, scratch, jnp.asarray(lens, jnp.int32))


def step(case: Case, lens: tuple[int, ...] | None = None, seed: int | None = None):
    """(cache, q [b, t, h, hd], positions [b, t]): a cache prefilled to `lens` (default
    case.lens), then t new rows at lens + 0..t-1 with their K/V written to LAYER's buffer."""
    lens = tuple(case.lens if lens is None else lens)
    cache = _prefilled(dataclasses.replace(case, name="", view=""), lens)  # shared by views
    rng = np.random.default_rng(case.seed + 1 if seed is None else seed)
    b, t = len(lens), case.t
    pos = jnp.asarray(np.asarray(lens)[:, None] + np.arange(t)[None], jnp.int32)
    kv = (b, t, case.kv_heads, case.head_dim)
    k_new = jnp.asarray(rng.standard_normal(kv), case.dtype)
    v_new = jnp.asarray(rng.standard_normal(kv), case.dtype)
    cache = cache.write_layer(LAYER, pos, k_new, v_new)
    q = jnp.asarray(2.0 * rng.standard_normal((b, t, case.heads, case.head_dim)), case.dtype)
    return cache, q, pos


def layer_args(cache: HierKVCache, q, pos, view: str, layer: int = LAYER, lo: bool | None = None):
    """The positional arguments of `hier_attention` for one layer of `cache` (the lower halves
    are None for the draft view unless `lo`)."""
    lo = view == "target" if lo is None else lo
    return (
        q, pos,
        cache.k_hi[layer], cache.k_lo[layer] if lo else None,
        cache.k_scale[layer], cache.k_min[layer],
        cache.v_hi[layer], cache.v_lo[layer] if lo else None,
        cache.v_scale[layer], cache.v_min[layer],
        cache.k_buf[layer], cache.v_buf[layer], cache.buf_start,
    )  # fmt: skip


def vmax(cache: HierKVCache, layer: int = LAYER) -> float:
    """max|V| over the values any row can read (dequantized target view and the float buffer)."""
    _, v = dequantize_layer(cache, layer, "target")
    return max(
        float(jnp.abs(v).max()), float(jnp.abs(cache.v_buf[layer].astype(jnp.float32)).max())
    )


@functools.partial(jax.jit, static_argnames=("residual", "view"))
def reference(*args, residual, view):
    return hier_attention_reference(*args, residual=residual, view=view)


def max_err(y, ref) -> float:
    y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
    return float(np.abs(y - np.asarray(jnp.asarray(ref, jnp.float32), np.float64)).max())


class HierAttentionBase:
    """`dispatch.hier_attention(impl=IMPL)` vs `hier_attention_reference` on real caches."""

    IMPL: str

    def run(self, cache, q, pos, view):
        args = layer_args(cache, q, pos, view)
        return dispatch.hier_attention(
            *args, residual=cache.layout.residual, view=view, impl=self.IMPL
        )

    @pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
    def test_matches_reference(self, case):
        cache, q, pos = step(case)
        y = self.run(cache, q, pos, case.view)
        ref = reference(
            *layer_args(cache, q, pos, case.view), residual=case.residual, view=case.view
        )
        b, t = pos.shape
        assert y.shape == (b, t, case.heads * case.head_dim) and y.dtype == case.dtype
        assert np.isfinite(np.asarray(y, np.float32)).all()
        assert max_err(y, ref) <= ATOL[case.dtype] * vmax(cache)

    def test_views_differ(self):
        """The draft (int4) and target (int8) views give different results (sensitivity check:
        the quantized keys matter far beyond the tolerance)."""
        case = CASES[0]
        cache, q, pos = step(case)
        tgt = self.run(cache, q, pos, "target")
        dft = self.run(cache, q, pos, "draft")
        assert max_err(tgt, dft) > 100 * ATOL[jnp.float32] * vmax(cache)

    def test_rows_are_independent(self):
        """A row gives the same bits alone (t = 1: an autoregressive step) as inside a block of
        t = 8 rows (a verification step; 8 x 4 heads = a 32-row tile instead of 16). That is what
        speculative exactness on this cache needs: block and split boundaries are absolute
        positions, so a row adds the same terms in the same order whatever rows come with it."""
        if self.IMPL == "xla":
            pytest.skip(
                "the XLA path is the dequantize-all reference, whose dots change accumulation "
                "order with the row count; the model's CPU path is HierKVCache.attend, checked "
                "in tests/test_hier_attention.py"
            )
        case = dataclasses.replace(CASES[0], name="target-t8-gqa4", heads=8, t=8)
        cache, q, pos = step(case)
        block = np.asarray(self.run(cache, q, pos, "target"))
        for i in (0, 2, 5, 7):  # sequence 0: float_start 48 up to p = 80, 64 from p = 81
            alone = np.asarray(self.run(cache, q[:, i : i + 1], pos[:, i : i + 1], "target"))
            np.testing.assert_array_equal(alone[:, 0], block[:, i])
