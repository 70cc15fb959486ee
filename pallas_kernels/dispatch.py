"""The one entry point the model calls for int4 matmuls, activation quantization, Hadamard, the
LM head and attention over both KV caches; the ops and their fallback chains are registered here
with `pallas_kernels.registry`, which alone decides which implementation computes a call.

Every function takes ``impl``:

* ``None`` (auto): the op's chain in `pallas_kernels.registry` (see `describe()` and
  docs/kernels.md): the compiled Pallas kernel on a GPU backend (after its self-check there),
  the CPU kernel (`pallas_kernels.cpu_kernels`, `pallas_kernels.cpu_attention`: AVX2 code over
  the packed bytes, XLA FFI custom calls) on a CPU backend where it builds, else XLA; a kernel
  that raises NotImplementedError for a shape hands the call to the next one (tokamax style);
* ``"xla"``: the plain-jnp path (fast on CPU: dequantize + ``jnp.dot`` for W4A16, an int8
  ``dot_general`` with int32 accumulation for W4AX, the factorised fast Hadamard transform);
* ``"pallas"``: the Pallas kernel, compiled for the GPU (NotImplementedError propagates);
* ``"pallas_interpret"``: the Pallas kernel in interpret mode (CPU tests; errors propagate);
* ``"cpu"``: the op's CPU kernel; ops without one run their XLA path. The decoding loop's
  prefill asks `prefill_impl`, which keeps XLA's dequantize + GEMM for the prompt's many rows.

The GPU backend family used by ``"pallas"`` is module state, set with `set_gpu_backend`:
``"triton"`` (the default and the only one implemented: every kernel passes
``pallas.triton.CompilerParams``) or ``"mosaic"`` (Mosaic GPU: a TODO, raises
NotImplementedError, so auto falls back to XLA).

The matmuls and the quantizers take x [..., K] and flatten leading dimensions to rows.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import act_quant, hadamard, registry
from pallas_kernels import hier_attention as _hattn
from pallas_kernels import w4a16_matmul as _w4a16
from pallas_kernels import w4ax_matmul as _w4ax
from pallas_kernels.registry import Call, Implementation, Op, SelfCheck

Impl = Literal["xla", "pallas", "pallas_interpret", "cpu"] | None
IMPLS = registry.IMPLS
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
    """The backend's preferred kernel family, what the chains' predicates ask: "pallas" on a GPU
    backend; "cpu" on a CPU backend where the CPU kernels build; else "xla"."""
    backend = jax.default_backend()
    if backend in registry.GPU_BACKENDS:
        return "pallas"
    if backend == "cpu":
        from pallas_kernels import cpu_kernels  # noqa: PLC0415 (builds the library once)

        if cpu_kernels.available():
            return "cpu"
    return "xla"


DECODE_QUERY_ROWS = 32
"""Queries per sequence up to which `attention` auto-selects the CPU kernel: every decode-time
forward (one row per step, gamma + 1 <= 17 in verification) is under it, a prompt prefill
(hundreds of rows, where XLA's matrix products are faster) usually is not. Both sides of an
exactness comparison (verification and autoregressive decoding) fall on the same side."""


# ----------------------------------------------------------------------------- predicates


def _on_gpu(call: Call) -> str | None:
    del call
    return None if default_impl() == "pallas" else "not a GPU backend"


def _on_cpu_kernels(call: Call) -> str | None:
    del call
    return None if default_impl() == "cpu" else "the CPU kernels are not this backend's choice"


def _never(call: Call) -> str | None:
    del call
    return "interpret mode is for tests: only a forced impl runs it"


_CPU_FLOATS = (jnp.float32, jnp.bfloat16)  # what the CPU attention kernels take (float32 inside)


def _decode_rows_one_device(call: Call) -> str | None:
    """The float-cache attention kernel: decode-time calls on one device only, float32 or
    bfloat16 queries and cache."""
    if _on_cpu_kernels(call):
        return _on_cpu_kernels(call)
    q, k = call.args[0], call.args[1]
    if jnp.dtype(q.dtype) not in _CPU_FLOATS or jnp.dtype(k.dtype) not in _CPU_FLOATS:
        return f"the CPU kernel takes float32 or bfloat16 ({q.dtype} queries, {k.dtype} cache)"
    t = q.shape[1]
    if t > DECODE_QUERY_ROWS:
        return f"{t} query rows per sequence > DECODE_QUERY_ROWS ({DECODE_QUERY_ROWS}): XLA's GEMMs"
    if jax.device_count() > 1:
        # Several devices: under the sharding tests (8 host devices) the kernel's calls stalled
        # XLA's cross-device rendezvous past its 40 s limit; multi-device runs keep XLA's path.
        return "several devices: XLA's path (the kernel's calls stalled the rendezvous)"
    return None


def _hier_cpu_covers(call: Call) -> str | None:
    """What the hierarchical-cache CPU kernel covers (float32 or bfloat16 queries, head_dim % 32,
    <= 256; the buffers' dtype is checked by the kernel, which raises NotImplementedError)."""
    if _on_cpu_kernels(call):
        return _on_cpu_kernels(call)
    q = call.args[_hier_q_index(call)]
    hd = q.shape[-1]
    if jnp.dtype(q.dtype) not in _CPU_FLOATS or hd % 32 or hd > 256:
        return (
            "the CPU kernel takes float32 or bfloat16 queries with head_dim % 32 == 0, <= 256 "
            f"({q.dtype}, {hd})"
        )
    return None


def _bf16_head_on_cpu_kernels(call: Call) -> str | None:
    """The float head kernel under auto: bfloat16 heads only. There it is row independent and
    several times faster than XLA's bfloat16 dot; in float32 it was measured slower than XLA's
    dot (docs/kernels.md, "bfloat16"), so float32 keeps XLA's (impl "cpu" forces the kernel)."""
    if _on_cpu_kernels(call):
        return _on_cpu_kernels(call)
    w = call.args[1]
    if jnp.dtype(w.dtype) != jnp.bfloat16:
        return f"a {w.dtype} head: XLA's dot (the kernel is auto-picked for bfloat16 heads)"
    return None


def _float_linear_shapes(call: Call) -> str | None:
    """What the float linear CPU kernel covers: float32 / bfloat16, N a multiple of 16, and the
    kernels built (a forced "cpu" outside it runs XLA's dot, the op's reference)."""
    x, w = call.args[0], call.args[1]
    if jnp.dtype(x.dtype) not in _CPU_FLOATS or jnp.dtype(w.dtype) not in _CPU_FLOATS:
        return f"the CPU kernel takes float32 or bfloat16 ({x.dtype} x, {w.dtype} w)"
    if w.ndim != 2 or w.shape[1] % 16:
        return f"the CPU kernel needs w [K, N] with N a multiple of 16 ({w.shape})"
    from pallas_kernels import cpu_kernels  # noqa: PLC0415

    if not cpu_kernels.available():
        return f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}"
    return None


def _float_linear_on_cpu_kernels(call: Call) -> str | None:
    """The float linear kernel under auto: decode-time calls (at most DECODE_QUERY_ROWS rows per
    sequence, so a step's one row and verification's gamma + 1 rows both take it) on one device,
    float32 or bfloat16. A prompt's prefill keeps XLA's GEMM (faster for hundreds of rows)."""
    if _on_cpu_kernels(call):
        return _on_cpu_kernels(call)
    x = call.args[0]
    t = x.shape[-2] if x.ndim >= 2 else 1
    if t > DECODE_QUERY_ROWS:
        return f"{t} rows per sequence > DECODE_QUERY_ROWS ({DECODE_QUERY_ROWS}): XLA's GEMM"
    if jax.device_count() > 1:
        return "several devices: XLA's path (as the attention kernels)"
    return None


def _hier_q_index(call: Call) -> int:
    return 1 if call.op == "hier_cache_attention" else 0


def _pallas(kernel: Callable) -> Callable:
    """The compiled GPU kernel (Triton family; Mosaic raises NotImplementedError: a TODO)."""

    @functools.wraps(kernel)
    def fn(*args, **kwargs):
        if _gpu_backend == "mosaic":
            raise NotImplementedError(
                "Mosaic GPU kernels are not written yet (TODO); use set_gpu_backend('triton')"
            )
        return kernel(*args, interpret=False, **kwargs)

    return fn


def _interpret(kernel: Callable) -> Callable:
    return functools.wraps(kernel)(functools.partial(kernel, interpret=True))


def _cpu(name: str, module: str = "cpu_kernels") -> Callable:
    """A CPU kernel entry, imported on first call (building the library is lazy too)."""

    def fn(*args, **kwargs):
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(f"pallas_kernels.{module}"), name)(*args, **kwargs)

    fn.__name__ = name
    return fn


def _kernel_chain(pallas_kernel: Callable, cpu_fn: Callable | None, xla_fn: Callable):
    """pallas (GPU, self-checked) -> pallas_interpret (forced only) -> cpu -> xla."""
    chain = [
        Implementation("pallas", _pallas(pallas_kernel), prefer=_on_gpu, self_check=True),
        Implementation("pallas_interpret", _interpret(pallas_kernel), prefer=_never),
    ]
    if cpu_fn is not None:
        chain.append(Implementation("cpu", cpu_fn, prefer=_on_cpu_kernels))
    chain.append(Implementation("xla", xla_fn))
    return chain


# ----------------------------------------------------------------------------- self-check cases
# Each builds a small case from fixed-seed random data with the call's static configuration
# (dtypes, group sizes, bits, ...); the key names that configuration and the GPU family.


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(parts).encode()))


def _small_k(*groups: int) -> int:
    """A small K (>= 256) that every group size in `groups` (0: per row) and 64 divide."""
    k = math.lcm(64, *(g for g in groups if g))
    while k < 256:
        k *= 2
    return k


def _weight_case(rng, k, n, g, asym, scale_dtype):
    from pallas_kernels.int4 import pack_int4  # noqa: PLC0415

    g = g or k
    codes = rng.integers(0, 16, (k, n)) if asym else rng.integers(-8, 8, (k, n))  # [K, N]
    scales = rng.uniform(0.005, 0.02, (k // g, n)).astype(scale_dtype)  # [K/G, N]
    mins = (0.05 * rng.standard_normal((k // g, n))).astype(scale_dtype) if asym else None
    return np.asarray(pack_int4(jnp.asarray(codes))), scales, mins


def _group(k_total: int, n_groups: int) -> int:
    """A call's group size (0 when one group spans the whole row)."""
    return 0 if n_groups <= 1 else k_total // n_groups


def _w4a16_case(call: Call):
    if call.args:
        x, packed, scales, mins = call.args
        xd, g, asym, sd = (
            x.dtype,
            _group(x.shape[-1], scales.shape[0]),
            mins is not None,
            scales.dtype,
        )
    else:
        xd, g, asym, sd = jnp.float32, 64, True, jnp.float32
    key = (str(jnp.dtype(xd)), g, asym, str(jnp.dtype(sd)), _gpu_backend)

    def make():
        rng = _rng("w4a16", key)
        k = _small_k(g)
        packed, scales, mins = _weight_case(rng, k, 256, g, asym, sd)
        x = rng.standard_normal((4, k)).astype(xd)  # [4, K]
        return (x, packed, scales, mins), {}

    return key, make


def _w4ax_case(call: Call):
    if call.args:
        a, sa, packed, scales, mins = call.args
        k_ = a.shape[-1]
        ga, g = _group(k_, sa.shape[-1]), _group(k_, scales.shape[0])
        asym, sd, od = mins is not None, scales.dtype, call.kwargs.get("out_dtype", jnp.float32)
    else:
        ga, g, asym, sd, od = 0, 64, True, jnp.float32, jnp.float32
    key = (ga, g, asym, str(jnp.dtype(sd)), str(jnp.dtype(od)), _gpu_backend)

    def make():
        rng = _rng("w4ax", key)
        k = _small_k(g, ga)
        packed, scales, mins = _weight_case(rng, k, 256, g, asym, sd)
        codes = rng.integers(-8, 8, (4, k)).astype(np.int8)  # [4, K]: int4 range, A8 too
        a_scales = rng.uniform(0.01, 0.1, (4, k // (ga or k))).astype(np.float32)  # [4, K/Ga]
        return (codes, a_scales, packed, scales, mins), {"out_dtype": od}

    return key, make


def _quant_kwargs(call: Call) -> dict:
    kw = call.kwargs
    return {
        "bits": kw.get("bits", 4),
        "group_size": kw.get("group_size", 0),
        "clip_ratio": kw.get("clip_ratio", 1.0),
    }


def _fused_case(call: Call):
    quant = _quant_kwargs(call)
    if call.args:
        x, packed, scales, mins = call.args
        xd, g, asym, sd = (
            x.dtype,
            _group(x.shape[-1], scales.shape[0]),
            mins is not None,
            scales.dtype,
        )
        od = call.kwargs.get("out_dtype", jnp.float32)
    else:
        xd, g, asym, sd, od = jnp.float32, 64, True, jnp.float32, jnp.float32
    key = (str(jnp.dtype(xd)), g, asym, str(jnp.dtype(sd)), str(jnp.dtype(od)),
           tuple(sorted(quant.items())), _gpu_backend)  # fmt: skip

    def make():
        rng = _rng("fused", key)
        k = _small_k(g, quant["group_size"])
        packed, scales, mins = _weight_case(rng, k, 256, g, asym, sd)
        x = rng.standard_normal((4, k)).astype(xd)  # [4, K]
        return (x, packed, scales, mins), {**quant, "out_dtype": od}

    return key, make


def _act_case(call: Call, with_norm: bool):
    quant = _quant_kwargs(call)
    xd = call.args[0].dtype if call.args else jnp.float32
    wd = call.args[1].dtype if with_norm and call.args else jnp.float32
    eps = float(call.args[2]) if with_norm and call.args else 1e-5
    key = (str(jnp.dtype(xd)), tuple(sorted(quant.items())), with_norm, str(jnp.dtype(wd)), eps,
           _gpu_backend)  # fmt: skip

    def make():
        rng = _rng("act", key)
        ga = quant["group_size"]
        k = ga * max(1, 256 // ga) if ga else 256
        x = rng.standard_normal((4, k)).astype(xd)  # [4, K]
        if not with_norm:
            return (x,), quant
        w = rng.uniform(0.5, 1.5, (k,)).astype(wd)  # [K]
        return (x, w, eps), quant

    return key, make


def _hadamard_case(call: Call):
    x = call.args[0] if call.args else jax.ShapeDtypeStruct((1, 576), jnp.float32)
    n, xd = x.shape[-1], x.dtype
    key = (n, str(jnp.dtype(xd)), _gpu_backend)
    return key, lambda: ((_rng("hadamard", key).standard_normal((4, n)).astype(xd),), {})


def _hier_case(call: Call):
    """A one-sequence, two-row case at the end of a 4 * lcm(G, R) token quantized part."""
    stacked = call.op == "hier_cache_attention"
    if call.args:
        a = call.args[1:] if stacked else call.args
        q, k_hi, k_scale, k_buf = a[0], a[2], a[4], a[10]
        lead = 1 if stacked else 0
        h, hd = q.shape[2], q.shape[3]
        kvh = k_hi.shape[lead + 2]
        g = k_hi.shape[lead + 1] // k_scale.shape[lead + 1]
        qd, bd = q.dtype, k_buf.dtype
        residual, view = call.kwargs["residual"], call.kwargs.get("view", "target")
    else:
        h, hd, kvh, g, qd, bd, residual, view = 4, 64, 2, 16, jnp.float32, jnp.float32, 16, "target"
    key = (h, hd, kvh, g, residual, view, str(jnp.dtype(qd)), str(jnp.dtype(bd)), _gpu_backend)

    def make():
        rng = _rng("hier", key)
        t = 2
        q_cap = 4 * math.lcm(g, residual)
        nbuf = -(-(2 * residual + t) // residual) * residual
        length = q_cap  # queries at q_cap, q_cap + 1: quantized keys below cut, floats above
        buf_start = residual * max(0, (length - residual - 1) // residual)
        target = view == "target"

        def codes():  # [1, Q, kvh, hd/2]
            return rng.integers(0, 256, (1, q_cap, kvh, hd // 2)).astype(np.uint8)

        arrays = (
            rng.standard_normal((1, t, h, hd)).astype(qd),  # q [1, t, h, hd]
            np.arange(length, length + t, dtype=np.int32)[None],  # q_positions [1, t]
            codes(), codes() if target else None,  # k_hi, k_lo
            rng.uniform(0.01, 0.1, (1, q_cap // g, kvh, hd)).astype(np.float32),  # k_scale
            rng.standard_normal((1, q_cap // g, kvh, hd)).astype(np.float32),  # k_min
            codes(), codes() if target else None,  # v_hi, v_lo
            rng.uniform(0.01, 0.1, (1, q_cap, kvh)).astype(np.float32),  # v_scale [1, Q, kvh]
            rng.standard_normal((1, q_cap, kvh)).astype(np.float32),  # v_min
            rng.standard_normal((1, nbuf, kvh, hd)).astype(bd),  # k_buf [1, NB, kvh, hd]
            rng.standard_normal((1, nbuf, kvh, hd)).astype(bd),  # v_buf
            np.asarray([buf_start], np.int32),  # buf_start [1]
        )  # fmt: skip
        if stacked:  # a one-layer stack of the cache arrays and layer index 0
            layered = tuple(None if x is None else x[None] for x in arrays[2:12])
            arrays = (np.int32(0), arrays[0], arrays[1], *layered, arrays[12])
        return arrays, {"residual": residual, "view": view}

    return key, make


def _hier_reference_stacked(layer, q, q_positions, *arrays, residual, view, **_):
    """The stacked op's self-check reference: `hier_attention_xla` on the layer."""
    *layered, buf_start = arrays
    one = [None if x is None else x[layer] for x in layered]
    return _hattn.hier_attention_xla(q, q_positions, *one, buf_start, residual=residual, view=view)


# The stated bounds (relative Frobenius norm, see tests/kernels/kernel_test_base.py for why):
# float32 outputs differ from the reference by accumulation order only; bfloat16 outputs by one
# rounding of an almost identical float32 value. Attention adds the online softmax's rescaling.
_MATMUL_RTOL = {"float32": 2e-6, "bfloat16": 2.0**-8, "float16": 2.0**-11}
_ATTN_RTOL = {"float32": 1e-5, "bfloat16": 2.0**-7, "float16": 2.0**-10}
_MATMUL_BOUND = "relative Frobenius error <= 2e-6 (float32), 2^-8 (bfloat16)"


def _check(case, rtol=_MATMUL_RTOL, bound=_MATMUL_BOUND, **int_bound) -> SelfCheck:
    return SelfCheck(
        case=case,
        compare=functools.partial(registry.compare_arrays, float_rtol=rtol, **int_bound),
        bound=bound,
    )


# ----------------------------------------------------------------------------- the ops


def _quantize_w4ax_two_steps(use: str):
    """Quantize, then the W4AX matmul, both with impl `use` (XLA's path, or the Pallas kernels)."""

    def fn(x2, packed, scales, mins, *, bits, group_size, clip_ratio, out_dtype):
        codes, a_scales = quantize_activations(
            x2, bits=bits, group_size=group_size, clip_ratio=clip_ratio, impl=use
        )
        return w4ax_matmul(codes, a_scales, packed, scales, mins, out_dtype=out_dtype, impl=use)

    fn.__name__ = f"quantize_w4ax_matmul_{use}"
    return fn


def _attention_cpu(q, k, v, q_positions, *, xla_fn):
    del xla_fn
    return _cpu("attention_cpu")(q, k, v, q_positions)


def _lm_head_cpu(x, codes, scales, *, float_head):
    del float_head
    return q8_matmul(x, codes, scales, impl="cpu")


def _lm_head_xla(x, codes, scales, *, float_head):
    del codes, scales
    return float_head(x)


def _q8_codes_present(call: Call) -> str | None:
    return None if call.args[1] is not None else "the model holds no int8 (Q8_0) head codes"


def _hier_pallas_stacked(interpret: bool):
    def fn(layer, q, q_positions, *arrays, residual, view, xla_fn=None):
        del xla_fn
        *layered, buf_start = arrays
        one = [None if x is None else x[layer] for x in layered]
        kernel = (
            _pallas(_hattn.hier_attention) if not interpret else _interpret(_hattn.hier_attention)
        )
        return kernel(q, q_positions, *one, buf_start, residual=residual, view=view)

    return fn


def _hier_cpu_stacked(*args, residual, view, xla_fn=None):
    del xla_fn
    return _cpu("hier_attention_cpu_stacked", "cpu_attention")(*args, residual=residual, view=view)


def _hier_xla_stacked(*args, residual, view, xla_fn):
    del args, residual, view
    return xla_fn()


def _register_ops() -> None:
    reg = registry.register
    reg(Op(
        "w4a16_matmul",
        _kernel_chain(_w4a16.w4a16_matmul, _cpu("w4a16_matmul_cpu"), _w4a16.w4a16_matmul_xla),
        self_check=_check(_w4a16_case),
        doc="x @ dequant(W), int4 weight, float activations (the verifier's linear)",
    ))  # fmt: skip
    reg(Op(
        "w4ax_matmul",
        _kernel_chain(_w4ax.w4ax_matmul, _cpu("w4ax_matmul_cpu"), _w4ax.w4ax_matmul_xla),
        self_check=_check(_w4ax_case),
        doc="int8 activation codes x int4 weight, int32 blocks, float epilogue",
    ))  # fmt: skip
    fused = [
        Implementation("pallas", _quantize_w4ax_two_steps("pallas"), prefer=_on_gpu,
                       self_check=True),
        Implementation("pallas_interpret", _quantize_w4ax_two_steps("pallas_interpret"),
                       prefer=_never),
        Implementation("cpu", _cpu("quantize_w4ax_matmul_cpu"), prefer=_on_cpu_kernels),
        Implementation("xla", _quantize_w4ax_two_steps("xla")),
    ]  # fmt: skip
    reg(Op(
        "quantize_w4ax_matmul", fused, self_check=_check(_fused_case),
        doc="activation quantization + W4AX matmul (one custom call on the CPU kernels)",
    ))  # fmt: skip
    reg(Op(
        "quantize_activations",
        _kernel_chain(act_quant.quantize_activations, None, act_quant.quantize_activations_xla),
        # Codes are bit-identical (same float32 ops, round half to even); scales too.
        self_check=_check(functools.partial(_act_case, with_norm=False),
                          bound="codes equal, scales relative error <= 2e-6"),
        doc="per-token / per-group symmetric int4 / int8 activation quantization",
    ))  # fmt: skip
    reg(Op(
        "rmsnorm_quantize",
        _kernel_chain(act_quant.rmsnorm_quantize, None, act_quant.rmsnorm_quantize_xla),
        # The sum of squares is added in another order: a code may differ by one where
        # y / scale is within rounding of a .5 boundary (rare; at most 1% of the case's codes).
        self_check=_check(functools.partial(_act_case, with_norm=True), int_max_step=1,
                          int_max_frac=0.01,
                          bound="codes within 1 in <= 1% of entries, scales <= 2e-6"),
        doc="RMSNorm (float32) then activation quantization",
    ))  # fmt: skip
    reg(Op(
        "hadamard_transform",
        _kernel_chain(hadamard.hadamard_transform_pallas, None, hadamard.hadamard_transform_xla),
        self_check=_check(_hadamard_case),
        doc="x @ hadamard_matrix(n) on the last axis (QuaRot's online rotation)",
    ))  # fmt: skip
    reg(Op(
        "q8_matmul",
        [Implementation("cpu", _cpu("q8_matmul_cpu"), prefer=_on_cpu_kernels),
         Implementation("xla", q8_matmul_xla)],
        doc="x @ (codes * scales).T, an int8 matrix in Q8_0 layout (no Pallas kernel)",
    ))  # fmt: skip
    reg(Op(
        "float_matmul",
        [Implementation("cpu", _cpu("float_head_cpu"), prefer=_bf16_head_on_cpu_kernels),
         Implementation("xla", float_matmul_xla)],
        # No Pallas kernel: any forced name without a kernel runs XLA's dot (as lm_head).
        forced_to_reference=frozenset(IMPLS),
        doc="x @ w for a float matrix (the float LM head), float32 out, rows independent on CPU",
    ))  # fmt: skip
    reg(Op(
        "float_linear",
        [Implementation("cpu", _float_linear_cpu, supports=_float_linear_shapes,
                        prefer=_float_linear_on_cpu_kernels),
         Implementation("xla", float_linear_xla)],
        # No Pallas kernel: any forced name without a kernel runs XLA's dot.
        forced_to_reference=frozenset(IMPLS),
        doc="x @ w for a float linear layer (precision fp), x.dtype out, rows independent on CPU",
    ))  # fmt: skip
    reg(Op(
        "lm_head",
        [Implementation("cpu", _lm_head_cpu, supports=_q8_codes_present, prefer=_on_cpu_kernels),
         Implementation("xla", _lm_head_xla)],
        # The head has no Pallas kernel and the float head is the exact weights: any forced
        # name without a head kernel (or without the int8 codes) runs the float head.
        forced_to_reference=frozenset(IMPLS),
        doc="the LM head: the int8 Q8_0 kernel over the head's codes, else the float head",
    ))  # fmt: skip
    reg(Op(
        "attention",
        [Implementation("cpu", _attention_cpu, prefer=_decode_rows_one_device),
         Implementation("xla", _attention_xla)],
        doc="decode-time causal attention over a float cache layer (no Pallas kernel)",
    ))  # fmt: skip
    hier_check = SelfCheck(
        _hier_case,
        functools.partial(registry.compare_arrays, float_rtol=_ATTN_RTOL),
        "relative Frobenius error <= 1e-5 (float32), 2^-7 (bfloat16)",
    )
    reg(Op(
        "hier_attention",
        [Implementation("pallas", _pallas(_hattn.hier_attention), prefer=_on_gpu,
                        self_check=True),
         Implementation("pallas_interpret", _interpret(_hattn.hier_attention), prefer=_never),
         Implementation("cpu", _cpu("hier_attention_cpu", "cpu_attention"),
                        prefer=_hier_cpu_covers),
         Implementation("xla", _hattn.hier_attention_xla)],
        self_check=hier_check,
        doc="attention over one hierarchical (QuantSpec) cache layer",
    ))  # fmt: skip
    reg(Op(
        "hier_cache_attention",
        [Implementation("pallas", _hier_pallas_stacked(False), prefer=_on_gpu, self_check=True),
         Implementation("pallas_interpret", _hier_pallas_stacked(True), prefer=_never),
         Implementation("cpu", _hier_cpu_stacked, prefer=_hier_cpu_covers),
         Implementation("xla", _hier_xla_stacked)],
        self_check=dataclasses.replace(hier_check, reference=_hier_reference_stacked),
        forced_to_reference=frozenset(),
        doc="HierKVCache.attend: the stacked cache and a layer index; xla = the cache's own path",
    ))  # fmt: skip
    reg(Op(
        "prefill",
        [Implementation("xla", lambda: "xla", prefer=_on_cpu_kernels),
         Implementation("auto", lambda: None)],
        reference="auto",
        doc="the impl a prompt prefill runs with: XLA's GEMMs where auto picks the CPU kernels",
    ))  # fmt: skip


def describe() -> dict[str, list[str]]:
    """Every op's chain by name, most preferred first (for the docs and `gpu_check`)."""
    return {name: [i.name for i in op.chain] for name, op in registry.ops().items()}


def prefill_impl(impl: Impl) -> Impl:
    """The impl for a prompt prefill (the registry's "prefill" op): XLA's dequantize + GEMM
    where auto would pick the CPU kernels (they re-read the weight for every 4 rows, so many-row
    calls are XLA's strength); an explicit impl is kept.

    Decode-time forwards (autoregressive steps, drafts, verification, trees) all keep `impl`
    whatever their row count: QSpec's verification must run the same kernel as autoregressive
    decoding for its output to equal it bit for bit.
    """
    if impl is not None:
        return impl
    return registry.run("prefill")


def cache_attention_impl(impl: Impl) -> str | None:
    """The hierarchical cache's ``attention_impl`` for a forward run with `impl`: "xla" when
    `impl` forces XLA everywhere, else None (the registry's choice, `hier_attention_default`)."""
    return "xla" if impl == "xla" else None


def hier_attention_default(head_dim: int, dtype) -> str:
    """The attention a hierarchical cache of this head_dim and dtype gets by default.

    The registry's "hier_cache_attention" chain on a stand-in call: "cpu" when the CPU kernel
    is this backend's choice and covers the shapes, "auto" when the chain starts with a
    self-checked kernel (the Pallas one on a GPU: validated on first use, per call with the
    fallback to XLA), else "xla".
    """
    q = jax.ShapeDtypeStruct((1, 1, 1, head_dim), jnp.dtype(dtype))
    call = Call("hier_cache_attention", (0, q), {})
    for impl in registry.get("hier_cache_attention").chain:
        if impl.why_not(call, auto=True) is None:
            return "auto" if impl.self_check else impl.name
    return "xla"


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
      impl: None (auto), "xla", "pallas", "pallas_interpret" or "cpu".

    Returns:
      [..., N] array of x.dtype.
    """
    x2, lead = _rows(x)  # [M, K]
    out = registry.run("w4a16_matmul", x2, packed, scales, mins, impl=impl)  # [M, N]
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
      impl: None (auto), "xla", "pallas", "pallas_interpret" or "cpu".

    Returns:
      [..., N] array of out_dtype.
    """
    a2, lead = _rows(a_codes)  # [M, K]
    s2, _ = _rows(a_scales)  # [M, K/Ga]
    out = registry.run(
        "w4ax_matmul", a2, s2, packed, scales, mins, out_dtype=out_dtype, impl=impl
    )  # [M, N]
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
    out = registry.run(
        "quantize_w4ax_matmul", x2, packed, scales, mins, bits=bits, group_size=group_size,
        clip_ratio=clip_ratio, out_dtype=out_dtype, impl=impl,
    )  # [M, N]  # fmt: skip
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
      impl: None (auto), "xla", "pallas" or "pallas_interpret" ("cpu": XLA's path).

    Returns:
      (codes int8 [..., K], scales float32 [..., K/Ga]).
    """
    x2, lead = _rows(x)  # [M, K]
    codes, scales = registry.run(
        "quantize_activations", x2, bits=bits, group_size=group_size, clip_ratio=clip_ratio,
        impl=impl,
    )  # fmt: skip
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
      impl: None (auto), "xla", "pallas" or "pallas_interpret" ("cpu": XLA's path).

    Returns:
      (codes int8 [..., K], scales float32 [..., K/Ga]).
    """
    x2, lead = _rows(x)  # [M, K]
    codes, scales = registry.run(
        "rmsnorm_quantize", x2, norm_weight, float(eps), bits=bits, group_size=group_size,
        clip_ratio=clip_ratio, impl=impl,
    )  # fmt: skip
    return codes.reshape(*lead, -1), scales.reshape(*lead, -1)


def hadamard_transform(x: jax.Array, *, impl: Impl = None) -> jax.Array:
    """``x @ hadamard_matrix(n)`` along the last axis (see `pallas_kernels.hadamard`).

    Args:
      x: float array [..., n].
      impl: None (auto), "xla", "pallas" or "pallas_interpret" ("cpu": XLA's path).

    Returns:
      Array [..., n] of x.dtype.
    """
    return registry.run("hadamard_transform", x, impl=impl)


def q8_matmul_xla(x: jax.Array, codes: jax.Array, scales: jax.Array) -> jax.Array:
    """Reference for `q8_matmul`: dequantize the int8 codes, then one float32 dot."""
    v, d = codes.shape
    w = codes.astype(jnp.float32) * jnp.repeat(scales.astype(jnp.float32), d // scales.shape[1], 1)
    return jnp.einsum("md,vd->mv", x.astype(jnp.float32), w)  # [M, V]


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
    out = registry.run("q8_matmul", x2, codes, scales, impl=impl)  # [M, V]
    return out.reshape(*lead, out.shape[-1])


def float_matmul_xla(x: jax.Array, w: jax.Array) -> jax.Array:
    """Reference for `float_matmul`: XLA's dot with float32 accumulation."""
    return jnp.einsum("md,dv->mv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def float_matmul(x: jax.Array, w: jax.Array, *, impl: Impl = None) -> jax.Array:
    """``x @ w`` for a float matrix w [D, V] (the float LM head), float32 out.

    On a CPU backend with the kernels, for a bfloat16 head (auto) or whenever impl is "cpu",
    this is `cpu_kernels.float_head_cpu`, whose rows do not depend on the number of rows in the
    call (XLA's dot's do: a verification block's logits could round differently from an
    autoregressive step's); elsewhere XLA's dot (a float32 head under auto: faster there).

    Args:
      x: float activations [..., D].
      w: float32 or bfloat16 [D, V].
      impl: None (auto), "xla" or "cpu" (no Pallas kernel: "pallas" raises NotImplementedError).

    Returns:
      float32 [..., V].
    """
    x2, lead = _rows(x)  # [M, D]
    out = registry.run("float_matmul", x2, w, impl=impl)  # [M, V]
    return out.reshape(*lead, out.shape[-1])


def float_linear_xla(x: jax.Array, w: jax.Array) -> jax.Array:
    """Reference for `float_linear`: XLA's dot in x's dtype (what precision "fp" always ran)."""
    return jnp.einsum("...k,kn->...n", x, w.astype(x.dtype))  # [..., N]


def _float_linear_cpu(x: jax.Array, w: jax.Array) -> jax.Array:
    from pallas_kernels import cpu_kernels  # noqa: PLC0415

    x2, lead = _rows(x)  # [M, K]
    out = cpu_kernels.float_linear_cpu(x2, w)  # [M, N] float32
    return out.astype(x.dtype).reshape(*lead, out.shape[-1])


def float_linear(x: jax.Array, w: jax.Array, *, impl: Impl = None) -> jax.Array:
    """``x @ w`` for a float (non-quantized) linear weight w [K, N]: precision "fp"'s matmul.

    On a CPU backend with the kernels, for decode-time calls (at most `DECODE_QUERY_ROWS` rows
    per sequence) on one device, or whenever impl is "cpu", this is
    `cpu_kernels.float_linear_cpu`: rows independent of each other (a verification block's rows
    equal autoregressive decoding's one row bit for bit) and the weights read once for up to 4
    rows. Elsewhere (a prompt's prefill, GPU, several devices) XLA's dot, `float_linear_xla`.

    Args:
      x: float activations [..., K] (float32 or bfloat16 for the CPU kernel).
      w: float32 or bfloat16 [K, N].
      impl: None (auto), "xla" or "cpu" (no Pallas kernel: other names run XLA's dot).

    Returns:
      [..., N] in x.dtype (the CPU kernel accumulates in float32 and rounds once).
    """
    return registry.run("float_linear", x, w, impl=impl)


def lm_head(
    x: jax.Array,
    codes: jax.Array | None,
    scales: jax.Array | None,
    float_head: Callable[[jax.Array], jax.Array],
    *,
    impl: Impl = None,
) -> jax.Array:
    """The LM head's logits: the int8 Q8_0 kernel over the head's codes where the registry
    picks it (a CPU backend with the kernels, or impl "cpu", and codes present), else
    ``float_head(x)`` (the model's float head; every other forced impl runs it too).

    Args:
      x: final hidden states [..., D].
      codes, scales: the head as int8 Q8_0 codes [V, D] and scales [V, D / 32], or None.
      float_head: the float head, ``float_head(x) -> float32 [..., V]``.
      impl: None (auto) or a forced name.

    Returns:
      float32 logits [..., V].
    """
    return registry.run("lm_head", x, codes, scales, float_head=float_head, impl=impl)


def _attention_xla(q, k, v, q_positions, *, xla_fn):
    return xla_fn(q, k, v, q_positions)


def attention(q, k, v, q_positions, xla_fn: Callable, *, impl: Impl = None):
    """Decode-time causal attention over a float cache layer (`pallas_kernels.cpu_kernels`).

    Args:
      q: [B, T, H, D]; k, v: [B, S, KVH, D]; q_positions: int32 [B, T].
      xla_fn: the XLA path, called as ``xla_fn(q, k, v, q_positions)`` (the model's dense
        attention, `qspec_jax.model.attention.attention`).
      impl: None (auto: the CPU kernel on a one-device CPU backend for T <= DECODE_QUERY_ROWS,
        else XLA), "xla" or "cpu". No Pallas kernel: "pallas" raises NotImplementedError.

    Returns:
      [B, T, H * D] of q.dtype.
    """
    out = registry.run("attention", q, k, v, q_positions, xla_fn=xla_fn, impl=impl)
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
        `pallas_kernels.cpu_attention`; float32 or bfloat16, head_dim a multiple of 32).

    Returns:
      [B, t, h * hd] array of q.dtype.
    """
    return registry.run(
        "hier_attention",
        q, q_positions, k_hi, k_lo, k_scale, k_min, v_hi, v_lo, v_scale, v_min, k_buf, v_buf,
        buf_start, residual=residual, view=view, impl=impl,
    )  # fmt: skip


def hier_cache_attention(
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
    view: str,
    xla_fn: Callable[[], jax.Array],
    impl: Impl = None,
) -> jax.Array:
    """`HierKVCache.attend`'s kernel choice: attention over layer `layer` of the stacked cache.

    Args:
      layer: int32 scalar (may be traced).
      q, q_positions, ...: as `hier_attention`, the cache arrays with a leading layer axis
        ([L, B, ...]); k_lo / v_lo may be None for view "draft".
      residual, view: as `hier_attention`.
      xla_fn: the cache's own block-wise XLA path for this call, ``xla_fn() -> [B, t, h*hd]``.
      impl: None (auto: the chain; the Pallas kernel on a GPU after its self-check, the CPU
        kernel on a CPU backend where it covers the shapes, else `xla_fn`) or a forced name
        (its NotImplementedError propagates).

    Returns:
      [B, t, h * hd] (the kernel's dtype; the cache casts it to q.dtype).
    """
    return registry.run(
        "hier_cache_attention",
        layer, q, q_positions, k_hi, k_lo, k_scale, k_min, v_hi, v_lo, v_scale, v_min, k_buf,
        v_buf, buf_start, residual=residual, view=view, xla_fn=xla_fn, impl=impl,
    )  # fmt: skip


_register_ops()
