"""The one matmul entry point: layer code calls `linear` and never sees quantization.

A weight is either a float array (the unquantized model, precision "fp") or a `QuantizedWeight`
(one packed int4 copy). The static `precision` picks how the quantized copy is read:

* "w4a16": weights dequantized inside the kernel, activations stay in float (the verifier);
* "w4a4" / "w4a8": activations quantized to int4 / int8 (per token or per group), integer dot
  with int32 accumulation, scales applied in the epilogue (the drafter).

`pallas_kernels.dispatch` picks the Pallas kernel on GPU, the CPU kernel on CPU and the XLA
reference elsewhere; float weights go through its "float_linear" op (a row-independent CPU
kernel for decode-time rows, XLA's dot otherwise).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qspec_jax.config import QuantConfig
from qspec_jax.quant.format import QuantizedWeight, Weight

ACT_BITS = {"w4a4": 4, "w4a8": 8}


def linear(
    x: jnp.ndarray, w: Weight, precision: str, qcfg: QuantConfig, impl: str | None = None
) -> jnp.ndarray:
    """Computes x @ W in the given precision.

    Args:
        x: activations [..., K].
        w: float [K, N] or QuantizedWeight of logical shape [K, N].
        precision: "fp", "w4a16", "w4a4" or "w4a8" (static).
        qcfg: activation-quantization settings for the low-bit modes.
        impl: kernel implementation override passed to `pallas_kernels.dispatch`.

    Returns:
        [..., N] in x.dtype.
    """
    lead = x.shape[:-1]
    if not isinstance(w, QuantizedWeight):
        if precision != "fp":
            raise NotImplementedError(
                f"precision {precision!r} needs int4 weights, but this model holds float weights; "
                "load it with quant=... to quantize"
            )
        from pallas_kernels import dispatch  # noqa: PLC0415 (kernels import lazily)

        # The registry's "float_linear": on CPU a row-independent kernel that reads the weights
        # once for up to 4 rows (decode and verification steps), else XLA's dot.
        return dispatch.float_linear(x, w, impl=impl)  # [..., N] in x.dtype

    from pallas_kernels import dispatch  # noqa: PLC0415 (kernels import lazily: keeps import light)

    x2 = x.reshape(-1, x.shape[-1])  # [m, k]
    if precision == "w4a16":
        y = dispatch.w4a16_matmul(x2, w.packed, w.scales, w.mins, impl=impl)
    elif precision in ACT_BITS:
        y = dispatch.quantize_w4ax_matmul(
            x2,
            w.packed,
            w.scales,
            w.mins,
            bits=ACT_BITS[precision],
            group_size=qcfg.act_group_size,
            clip_ratio=qcfg.act_clip_ratio,
            out_dtype=x.dtype,
            impl=impl,
        )
    elif precision == "fp":
        raise NotImplementedError(
            "precision 'fp' needs the float weights, but this model holds only int4 weights "
            "(one copy); load the model without quant= for fp"
        )
    else:
        raise ValueError(f"unknown precision {precision!r}; expected fp, w4a16, w4a4 or w4a8")
    return y.astype(x.dtype).reshape(*lead, y.shape[-1])


def online_hadamard(x: jnp.ndarray, qcfg: QuantConfig, impl: str | None = None) -> jnp.ndarray:
    """QuaRot's online Hadamard on the inputs of o_proj and down_proj (identity if not rotated)."""
    if not qcfg.rotated:
        return x
    from pallas_kernels import dispatch  # noqa: PLC0415

    with jax.named_scope("online_hadamard"):
        return dispatch.hadamard_transform(x, impl=impl)
