"""The one entry point the model calls for int4 matmuls, activation quantization, Hadamard and
attention over the hierarchical (QuantSpec) KV cache.

Every function takes ``impl``:

* ``None`` (auto): ``"pallas"`` when ``jax.default_backend()`` is ``"gpu"`` or ``"cuda"``, else
  ``"xla"``; if the Pallas kernel raises NotImplementedError for a shape, the XLA path is used
  instead (tokamax style);
* ``"xla"``: the plain-jnp path (fast on CPU: dequantize + ``jnp.dot`` for W4A16, an int8
  ``dot_general`` with int32 accumulation for W4AX, the factorised fast Hadamard transform);
* ``"pallas"``: the Pallas kernel, compiled for the GPU (NotImplementedError propagates);
* ``"pallas_interpret"``: the Pallas kernel in interpret mode (CPU tests; errors propagate);
* ``"cpu"``: the int4 matmuls' and the hierarchical-cache attention's CPU kernels
  (`pallas_kernels.cpu_kernels`, `pallas_kernels.cpu_attention`: AVX2 code over the packed bytes,
  XLA FFI custom calls); auto picks it on a CPU backend when it is available (the
  decoding loop's prefill asks `prefill_impl`, which keeps XLA's dequantize + GEMM for the
  prompt's many rows). Functions without a CPU kernel run their XLA path.

The GPU backend family used by ``"pallas"`` is module state, set with `set_gpu_backend`:
``"triton"`` (the default and the only one implemented: every kernel passes
``pallas.triton.CompilerParams``) or ``"mosaic"`` (Mosaic GPU: a TODO, raises
NotImplementedError, so auto falls back to XLA).

The matmuls and the quantizers take x [..., K] and flatten leading dimensions to rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import act_quant, hadamard
from pallas_kernels import hier_attention as _hattn
from pallas_kernels import w4a16_matmul as _w4a16
from pallas_kernels import w4ax_matmul as _w4ax

Impl = Literal["xla", "pallas", "pallas_interpret", "cpu"] | None
IMPLS = ("xla", "pallas", "pallas_interpret", "cpu")
GPU_BACKENDS = ("triton", "mosaic")

_gpu_backend = "triton"


def set_gpu_backend(family: str) -> None:
    """Selects the Pallas GPU backend family ("triton" or "mosaic") for impl "pallas"."""
    global _gpu_backend
    if family not in GPU_BACKENDS:
        raise ValueError(f"unknown GPU backend family {family!r}; expected one of {GPU_BACKENDS}")
    _gpu_backend = family


def get_gpu_backend() -> str:
    """The Pallas GPU backend family in use ("triton" or "mosaic")."""
    return _gpu_backend


def default_impl() -> str:
    """ "pallas" on a GPU backend; "cpu" on a CPU backend where the CPU kernels build; else "xla"."""
    backend = jax.default_backend()
    if backend in ("gpu", "cuda"):
        return "pallas"
    if backend == "cpu":
        from pallas_kernels import cpu_kernels  # noqa: PLC0415 (builds the library once)

        if cpu_kernels.available():
            return "cpu"
    return "xla"


def _dispatch(
    impl: Impl,
    pallas_fn: Callable,
    xla_fn: Callable,
    *args,
    cpu_fn: Callable | None = None,
    **kwargs,
):
    """Runs ``pallas_fn(*args, interpret=..., **kwargs)``, ``cpu_fn(*args, **kwargs)`` or
    ``xla_fn(*args, **kwargs)``."""
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected None or one of {IMPLS}")
    auto = impl is None
    chosen = default_impl() if auto else impl
    if chosen == "cpu":
        if cpu_fn is None:
            return xla_fn(*args, **kwargs)
        try:
            return cpu_fn(*args, **kwargs)
        except NotImplementedError:
            if auto:
                return xla_fn(*args, **kwargs)
            raise
    if chosen == "xla":
        return xla_fn(*args, **kwargs)
    try:
        if chosen == "pallas" and _gpu_backend == "mosaic":
            raise NotImplementedError(
                "Mosaic GPU kernels are not written yet (TODO); use set_gpu_backend('triton')"
            )
        return pallas_fn(*args, interpret=chosen == "pallas_interpret", **kwargs)
    except NotImplementedError:
        if auto:
            return xla_fn(*args, **kwargs)
        raise


def _cpu_fn(name: str) -> Callable:
    from pallas_kernels import cpu_kernels  # noqa: PLC0415

    return getattr(cpu_kernels, name)


def _cpu_attention_fn() -> Callable:
    from pallas_kernels import cpu_attention  # noqa: PLC0415

    return cpu_attention.hier_attention_cpu


def prefill_impl(impl: Impl) -> Impl:
    """The impl for a prompt prefill: XLA's dequantize + GEMM where auto would pick the CPU
    kernels (they re-read the weight for every 4 rows, so many-row calls are XLA's strength).

    Decode-time forwards (autoregressive steps, drafts, verification, trees) all keep `impl`
    whatever their row count: QSpec's verification must run the same kernel as autoregressive
    decoding for its output to equal it bit for bit.
    """
    if impl is None and default_impl() == "cpu":
        return "xla"
    return impl


def _rows(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """Flattens x [..., K] to [rows, K]; returns it and the leading shape."""
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def w4a16_matmul(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    mins: jax.Array | None = None,
    *,
    impl: Impl = None,
) -> jax.Array:
    """``x @ dequant(W)`` with float32 accumulation (see `pallas_kernels.w4a16_matmul`).

    Args:
      x: float activations [..., K].
      packed: uint8 packed int4 codes [K/2, N].
      scales: weight scales [K/G, N].
      mins: weight mins [K/G, N] (asymmetric, unsigned codes) or None (symmetric, signed).
      impl: None (auto), "xla", "pallas" or "pallas_interpret".

    Returns:
      [..., N] array of x.dtype.
    """
    x2, lead = _rows(x)  # [M, K]
    out = _dispatch(
        impl,
        _w4a16.w4a16_matmul,
        _w4a16.w4a16_matmul_xla,
        x2,
        packed,
        scales,
        mins,
        cpu_fn=_cpu_fn("w4a16_matmul_cpu"),
    )
    return out.reshape(*lead, out.shape[-1])


def w4ax_matmul(
    a_codes: jax.Array,
    a_scales: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    mins: jax.Array | None = None,
    *,
    out_dtype=jnp.float32,
    impl: Impl = None,
) -> jax.Array:
    """W4A4 / W4A8 matmul of pre-quantized activations (see `pallas_kernels.w4ax_matmul`).

    Args:
      a_codes: int8 activation codes [..., K].
      a_scales: float32 activation scales [..., K/Ga] ([..., 1] per token).
      packed: uint8 packed int4 weight codes [K/2, N].
      scales: weight scales [K/G, N].
      mins: weight mins [K/G, N] or None (symmetric).
      out_dtype: output dtype.
      impl: None (auto), "xla", "pallas" or "pallas_interpret".

    Returns:
      [..., N] array of out_dtype.
    """
    a2, lead = _rows(a_codes)  # [M, K]
    s2, _ = _rows(a_scales)  # [M, K/Ga]
    out = _dispatch(
        impl,
        _w4ax.w4ax_matmul,
        _w4ax.w4ax_matmul_xla,
        a2,
        s2,
        packed,
        scales,
        mins,
        out_dtype=out_dtype,
        cpu_fn=_cpu_fn("w4ax_matmul_cpu"),
    )
    return out.reshape(*lead, out.shape[-1])


def quantize_w4ax_matmul(
    x: jax.Array,
    packed: jax.Array,
    scales: jax.Array,
    mins: jax.Array | None = None,
    *,
    bits: int,
    group_size: int = 0,
    clip_ratio: float = 1.0,
    out_dtype=jnp.float32,
    impl: Impl = None,
) -> jax.Array:
    """Quantizes x's activations, then the W4A4 / W4A8 matmul: what a low-bit linear computes.

    On the CPU kernels both run in one custom call (`cpu_kernels.quantize_w4ax_matmul_cpu`,
    bit-identical to the two steps); elsewhere it is `quantize_activations` then `w4ax_matmul`
    with the same impl.

    Args:
      x: float activations [..., K].
      packed, scales, mins: the int4 weight (see `w4ax_matmul`).
      bits: 4 or 8; group_size: activation group size Ga (0 = per token); clip_ratio: r.
      out_dtype: output dtype.
      impl: None (auto), "xla", "pallas", "pallas_interpret" or "cpu".

    Returns:
      [..., N] array of out_dtype.
    """
    x2, lead = _rows(x)  # [M, K]

    def two_steps(x2, packed, scales, mins, interpret=None, **quant):
        # XLA's path (no interpret argument) or the Pallas kernels: quantize, then the matmul
        use = "xla" if interpret is None else ("pallas_interpret" if interpret else "pallas")
        codes, a_scales = quantize_activations(x2, **quant, impl=use)
        return w4ax_matmul(codes, a_scales, packed, scales, mins, out_dtype=out_dtype, impl=use)

    def fused(x2, packed, scales, mins, **quant):
        return _cpu_fn("quantize_w4ax_matmul_cpu")(
            x2, packed, scales, mins, **quant, out_dtype=out_dtype
        )

    out = _dispatch(
        impl, two_steps, two_steps, x2, packed, scales, mins, cpu_fn=fused,
        bits=bits, group_size=group_size, clip_ratio=clip_ratio,
    )  # fmt: skip
    return out.reshape(*lead, out.shape[-1])


def quantize_activations(
    x: jax.Array,
    *,
    bits: int,
    group_size: int = 0,
    clip_ratio: float = 1.0,
    impl: Impl = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-token / per-group symmetric activation quantization (see `pallas_kernels.act_quant`).

    Args:
      x: float activations [..., K].
      bits: 4 or 8.
      group_size: activation group size Ga (0 = per token).
      clip_ratio: scale multiplier.
      impl: None (auto), "xla", "pallas" or "pallas_interpret".

    Returns:
      (codes int8 [..., K], scales float32 [..., K/Ga]).
    """
    x2, lead = _rows(x)  # [M, K]
    codes, scales = _dispatch(
        impl,
        act_quant.quantize_activations,
        act_quant.quantize_activations_xla,
        x2,
        bits=bits,
        group_size=group_size,
        clip_ratio=clip_ratio,
    )
    return codes.reshape(*lead, -1), scales.reshape(*lead, -1)


def rmsnorm_quantize(
    x: jax.Array,
    norm_weight: jax.Array,
    eps: float,
    *,
    bits: int,
    group_size: int = 0,
    clip_ratio: float = 1.0,
    impl: Impl = None,
) -> tuple[jax.Array, jax.Array]:
    """Fused RMSNorm (float32) then activation quantization (see `pallas_kernels.act_quant`).

    Args:
      x: float activations [..., K].
      norm_weight: RMSNorm weight [K].
      eps: RMSNorm epsilon (a Python float).
      bits: 4 or 8.
      group_size: activation group size Ga (0 = per token).
      clip_ratio: scale multiplier.
      impl: None (auto), "xla", "pallas" or "pallas_interpret".

    Returns:
      (codes int8 [..., K], scales float32 [..., K/Ga]).
    """
    x2, lead = _rows(x)  # [M, K]
    codes, scales = _dispatch(
        impl,
        act_quant.rmsnorm_quantize,
        act_quant.rmsnorm_quantize_xla,
        x2,
        norm_weight,
        float(eps),
        bits=bits,
        group_size=group_size,
        clip_ratio=clip_ratio,
    )
    return codes.reshape(*lead, -1), scales.reshape(*lead, -1)


def hadamard_transform(x: jax.Array, *, impl: Impl = None) -> jax.Array:
    """``x @ hadamard_matrix(n)`` along the last axis (see `pallas_kernels.hadamard`).

    Args:
      x: float array [..., n].
      impl: None (auto), "xla", "pallas" or "pallas_interpret".

    Returns:
      Array [..., n] of x.dtype.
    """
    return _dispatch(impl, hadamard.hadamard_transform_pallas, hadamard.hadamard_transform_xla, x)


def q8_matmul_xla(x: jax.Array, codes: jax.Array, scales: jax.Array) -> jax.Array:
    """Reference for `q8_matmul`: dequantize the int8 codes, then one float32 dot."""
    v, d = codes.shape
    w = codes.astype(jnp.float32) * jnp.repeat(scales.astype(jnp.float32), d // scales.shape[1], 1)
    return jnp.einsum("md,vd->mv", x.astype(jnp.float32), w)  # [M, V]


def _q8_no_pallas(*args, interpret=False):
    raise NotImplementedError("no Pallas kernel for the int8 (Q8_0) head yet; use impl='xla'")


def q8_matmul(x: jax.Array, codes: jax.Array, scales: jax.Array, *, impl: Impl = None):
    """``x @ (codes * scales).T`` for an int8 matrix in Q8_0 layout (the LM head), float32 out.

    Args:
      x: float activations [..., D].
      codes: int8 [V, D]; scales: float32 [V, D / 32].
      impl: None (auto: the CPU kernel on CPU, else XLA), "xla" or "cpu". There is no Pallas
        kernel: "pallas" raises NotImplementedError and auto uses XLA on a GPU.

    Returns:
      float32 [..., V].
    """
    x2, lead = _rows(x)  # [M, D]
    out = _dispatch(
        impl, _q8_no_pallas, q8_matmul_xla, x2, codes, scales, cpu_fn=_cpu_fn("q8_matmul_cpu")
    )
    return out.reshape(*lead, out.shape[-1])


DECODE_QUERY_ROWS = 32
"""Queries per sequence up to which `attention` auto-selects the CPU kernel: every decode-time
forward (one row per step, gamma + 1 <= 17 in verification) is under it, a prompt prefill
(hundreds of rows, where XLA's matrix products are faster) usually is not. Both sides of an
exactness comparison (verification and autoregressive decoding) fall on the same side."""


def _attention_no_pallas(*args, interpret=False):
    raise NotImplementedError("no Pallas kernel for the float-cache attention; use impl='xla'")


def attention(q, k, v, q_positions, xla_fn: Callable, *, impl: Impl = None):
    """Decode-time causal attention over a float cache layer (`pallas_kernels.cpu_kernels`).

    Args:
      q: [B, T, H, D]; k, v: [B, S, KVH, D]; q_positions: int32 [B, T].
      xla_fn: the XLA path, called as ``xla_fn(q, k, v, q_positions)`` (the model's dense
        attention, `qspec_jax.model.attention.attention`).
      impl: None (auto: the CPU kernel on a one-device CPU backend for T <= DECODE_QUERY_ROWS,
        else XLA), "xla"
        or "cpu". No Pallas kernel: "pallas" raises NotImplementedError, auto uses XLA.

    Returns:
      [B, T, H * D] of q.dtype.
    """
    if impl is None and (q.shape[1] > DECODE_QUERY_ROWS or jax.device_count() > 1):
        # Several devices: under the sharding tests (8 host devices) the kernel's calls stalled
        # XLA's cross-device rendezvous past its 40 s limit; multi-device runs keep XLA's path.
        impl = "xla"
    out = _dispatch(
        impl, _attention_no_pallas, xla_fn, q, k, v, q_positions, cpu_fn=_cpu_fn("attention_cpu")
    )
    return out.astype(q.dtype)


def hier_attention(
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
    impl: Impl = None,
) -> jax.Array:
    """Decode attention over one hierarchical-cache layer (see `pallas_kernels.hier_attention`).

    Args:
      q: queries [B, t, h, hd]; q_positions: int32 [B, t].
      k_hi, k_lo, v_hi, v_lo: uint8 [B, Q, kvh, hd/2] packed upper / lower (+8) halves (the
        lower ones may be None for view "draft").
      k_scale, k_min: float32 [B, Q/G, kvh, hd]; v_scale, v_min: float32 [B, Q, kvh].
      k_buf, v_buf: [B, NB, kvh, hd] float ring buffer; buf_start: int32 [B].
      residual: R; view: "target" (int8) or "draft" (upper int4 halves).
      impl: None (auto), "xla", "pallas", "pallas_interpret" or "cpu" (the AVX2 kernel of
        `pallas_kernels.cpu_attention`; float32 queries, head_dim a multiple of 32).

    Returns:
      [B, t, h * hd] array of q.dtype.
    """
    return _dispatch(
        impl,
        _hattn.hier_attention,
        _hattn.hier_attention_xla,
        q, q_positions, k_hi, k_lo, k_scale, k_min, v_hi, v_lo, v_scale, v_min, k_buf, v_buf,
        buf_start, residual=residual, view=view, cpu_fn=_cpu_attention_fn(),
    )  # fmt: skip
