"""Hierarchical-cache (QuantSpec) decode attention on the CPU kernel: the ``"cpu"`` impl.

`csrc/hier_attention_cpu.cc` computes the function of
`pallas_kernels.hier_attention.hier_attention_reference` (see that module for the cache layout
and the exact math) over one layer of the hierarchical KV cache, for the "target" view (int8
codes = upper + lower int4 halves) and the "draft" view (upper halves only), plus the float ring
buffer. It reads the packed codes and converts them to floats next to the FMAs, with the key scales folded into the query and the value scales into the softmax weights (no dequantized key or value is formed)
(AVX2 + FMA, float32 online softmax), on the calling thread and XLA's intra-op pool; no float
copy of the cache is made. A query row's result is computed by the same operation sequence
whatever the number of rows in the call and the batch (block and split boundaries are absolute
positions, reductions have a fixed order), so a verification row equals the autoregressive row
at the same position bit for bit.

Two entry points:

* `hier_attention_cpu`: the signature of `pallas_kernels.dispatch.hier_attention` (one layer's
  arrays), used by dispatch for ``impl="cpu"``;
* `hier_attention_cpu_stacked`: the whole cache's ``[layers, ...]`` arrays plus a (traced) layer
  index, used by `qspec_jax.cache.hierarchical.HierKVCache.attend`: the kernel indexes the layer
  itself, so XLA passes the cache buffers as they are instead of copying a layer slice into a
  custom-call operand every step.

Covered: float32 or bfloat16 queries and float32 or bfloat16 buffers, head_dim a multiple of 32
up to 256, any GQA group, any t (decode, verification; prefill is not what it is for but is
computed correctly). Anything else raises NotImplementedError, so dispatch's auto mode and the
cache fall back to XLA.

bfloat16: the kernel computes in float32. bfloat16 queries are converted here (exactly) and
the float32 output is rounded by the caller (`HierKVCache.attend` casts to q.dtype); a bfloat16
ring buffer is read as it is and its rows converted exactly inside the kernel (a conversion here
would copy every layer's buffer on each call). So the result is the float32 kernel's on the
converted inputs. It differs from `hier_attention_reference` in bfloat16, which rounds the
dequantized keys to bfloat16 before the dot: the kernel keeps them in float32 (more accurate).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_kernels
from pallas_kernels import hier_attention as _hattn

TARGET = "qspec_hier_attention"
MAX_HEAD_DIM = 256
FLOATS = (jnp.float32, jnp.bfloat16)  # query and buffer dtypes the kernel takes


def _layer_view(x):
    """Shape/dtype stand-in of one layer of a stacked [layers, ...] array (None stays None)."""
    return None if x is None else types.SimpleNamespace(shape=x.shape[1:], dtype=x.dtype)


def hier_attention_cpu_stacked(
    layer,
    q: jax.Array,
    q_positions: jax.Array,
    k_hi: jax.Array,
    k_lo: jax.Array | None,
    k_scale: jax.Array,
    k_min: jax.Array,
    v_hi: jax.Array,
    v_lo: jax.Array | None,
    v_scale: jax.Array,
    v_min: jax.Array,
    k_buf: jax.Array,
    v_buf: jax.Array,
    buf_start: jax.Array,
    *,
    residual: int,
    view: str = "target",
) -> jax.Array:
    """Attention of q over layer `layer` of a stacked hierarchical cache, on the CPU kernel.

    Args:
      layer: int32 scalar (may be traced): which layer of the stacked arrays.
      q: float32 or bfloat16 queries [B, t, h, hd] (computed in float32).
      q_positions: int32 [B, t] absolute positions of the query rows.
      k_hi, k_lo: uint8 [L, B, Q, kvh, hd/2] packed upper / lower (+8) key halves (k_lo may be
        None for view "draft": it is never read).
      k_scale, k_min: float32 [L, B, Q/G, kvh, hd] per-channel key group scales and minima.
      v_hi, v_lo: uint8 [L, B, Q, kvh, hd/2] value halves (v_lo may be None for "draft").
      v_scale, v_min: float32 [L, B, Q, kvh] per-token value scales and minima.
      k_buf, v_buf: float32 or bfloat16 (both the same) [L, B, NB, kvh, hd] float ring buffer
        (position p at index p mod NB).
      buf_start: int32 [B] first position held by the buffer (a multiple of R).
      residual: R (static).
      view: "target" (int8 codes) or "draft" (upper int4 halves) (static).

    Returns:
      [B, t, h * hd] float32 (whatever q's dtype: the caller rounds it).

    Raises:
      NotImplementedError: the kernels are unavailable here, or shapes / dtypes it does not
        cover (queries or buffers neither float32 nor bfloat16, head_dim not a multiple of 32 or
        above 256).
      ValueError: inconsistent arrays (via `pallas_kernels.hier_attention`'s shape check).
    """
    if not cpu_kernels.available():
        raise NotImplementedError(f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
    target = view == "target"
    s = _hattn._check_shapes(
        q, q_positions, *map(_layer_view, (k_hi, k_lo if target else None, k_scale, k_min,
        v_hi, v_lo if target else None, v_scale, v_min, k_buf, v_buf)), buf_start, residual, view,
    )  # fmt: skip
    nl = k_hi.shape[0]
    for name, x in (("k_scale", k_scale), ("k_min", k_min), ("v_hi", v_hi), ("v_scale", v_scale),
                    ("v_min", v_min), ("k_buf", k_buf), ("v_buf", v_buf)):  # fmt: skip
        if x.shape[0] != nl:
            raise ValueError(f"{name} has {x.shape[0]} layers, k_hi {nl}")
    if q.dtype not in FLOATS:
        raise NotImplementedError(
            f"hier attention cpu kernel: float32 or bfloat16 queries, got {q.dtype}"
        )
    if k_buf.dtype not in FLOATS or v_buf.dtype != k_buf.dtype:
        raise NotImplementedError(
            f"hier attention cpu kernel: k_buf / v_buf must both be float32 or both bfloat16, got "
            f"{k_buf.dtype} / {v_buf.dtype}"
        )
    if s.hd % 32 or s.hd > MAX_HEAD_DIM:
        raise NotImplementedError(
            f"hier attention cpu kernel: head_dim {s.hd} must be a multiple of 32, <= 256"
        )
    dummy = jnp.zeros((1,), jnp.uint8)
    if k_buf.dtype == jnp.bfloat16:
        # bfloat16 buffers go in as their uint16 bits (the kernel reads them as bfloat16): then
        # every use of the layer-stacked buffer inside the model's layer loop (this read, and
        # `kv_cache.write_layer`'s uint16 write) is a uint16 view, and XLA:CPU keeps it so
        # across the loop instead of a bitcast fusion copying the whole buffer at every
        # layer's write (60 copies per token, half of a bfloat16 decode token at 1k).
        k_buf = jax.lax.bitcast_convert_type(k_buf, jnp.uint16)  # [L, B, NB, kvh, hd]
        v_buf = jax.lax.bitcast_convert_type(v_buf, jnp.uint16)
    out = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((s.b, s.t, s.h * s.hd), jnp.float32))(
        jnp.asarray(layer, jnp.int32).reshape(()),
        q.astype(jnp.float32),
        q_positions.astype(jnp.int32),
        k_hi,
        k_lo if target else dummy,
        k_scale.astype(jnp.float32),
        k_min.astype(jnp.float32),
        v_hi,
        v_lo if target else dummy,
        v_scale.astype(jnp.float32),
        v_min.astype(jnp.float32),
        k_buf,
        v_buf,
        buf_start.astype(jnp.int32),
        residual=int(residual),
        target=int(target),
    )  # [B, t, h * hd]
    return out


def hier_attention_cpu(
    q: jax.Array,
    q_positions: jax.Array,
    k_hi: jax.Array,
    k_lo: jax.Array | None,
    k_scale: jax.Array,
    k_min: jax.Array,
    v_hi: jax.Array,
    v_lo: jax.Array | None,
    v_scale: jax.Array,
    v_min: jax.Array,
    k_buf: jax.Array,
    v_buf: jax.Array,
    buf_start: jax.Array,
    *,
    residual: int,
    view: str = "target",
) -> jax.Array:
    """One layer's arrays (the signature of `pallas_kernels.dispatch.hier_attention`).

    Args: as `hier_attention_cpu_stacked` without the leading layer axis (codes uint8
      [B, Q, kvh, hd/2], key scales [B, Q/G, kvh, hd], value scales [B, Q, kvh], buffers
      [B, NB, kvh, hd]).

    Returns:
      [B, t, h * hd] float32.

    Raises:
      NotImplementedError / ValueError: as `hier_attention_cpu_stacked`.
    """
    target = view == "target"

    def stack(x):  # [1, ...]: a free reshape
        return None if x is None else x[None]

    return hier_attention_cpu_stacked(
        0, q, q_positions, stack(k_hi), stack(k_lo if target else None), stack(k_scale),
        stack(k_min), stack(v_hi), stack(v_lo if target else None), stack(v_scale),
        stack(v_min), stack(k_buf), stack(v_buf), buf_start, residual=residual, view=view,
    )  # fmt: skip
