"""Every Pallas kernel lowers for CUDA through Triton, checked on CPU with `jax.export`.

The Triton lowering runs at export time (an unsupported primitive, a non-power-of-two load or a
slice of a loaded value fails here), and the exported module must contain the Triton custom call.
Shapes: Llama-2-7B and Llama-3-8B projections, decode (M = 1) and a small batch (M = 16); the
hierarchical-cache attention at Llama-3-8B (GQA 32/8), Llama-2-7B (MHA) and SmolLM2-135M (9/3,
head_dim 64) sizes, decode (t = 1) and verification (t = 4, 8) rows.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels import act_quant, hadamard, hier_attention, w4a16_matmul, w4ax_matmul

TRITON = "__gpu$xla.gpu.triton"
KN = [(4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096), (4096, 4096)]
MS = [1, 16]


def _export(f, *args):
    exp = export.export(
        jax.jit(f),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)],
    )(*args)
    return exp.mlir_module()


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", KN)
@pytest.mark.parametrize("g,asym", [(128, False), (0, True)])
def test_w4a16_lowers(m, k, n, g, asym):
    g = g or k
    args = [
        _sds((m, k), jnp.bfloat16),
        _sds((k // 2, n), jnp.uint8),
        _sds((k // g, n), jnp.bfloat16),
    ]
    if asym:
        args.append(_sds((k // g, n), jnp.bfloat16))
    mlir = _export(w4a16_matmul.w4a16_matmul, *args)
    assert TRITON in mlir and "w4a16_matmul" in mlir


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", KN)
@pytest.mark.parametrize("g,ga,asym", [(128, 0, False), (0, 128, True), (32, 0, False)])
def test_w4ax_lowers(m, k, n, g, ga, asym):
    g, ga = g or k, ga or k
    args = [
        _sds((m, k), jnp.int8),
        _sds((m, k // ga), jnp.float32),
        _sds((k // 2, n), jnp.uint8),
        _sds((k // g, n), jnp.bfloat16),
    ]
    if asym:
        args.append(_sds((k // g, n), jnp.bfloat16))
    mlir = _export(w4ax_matmul.w4ax_matmul, *args)
    assert TRITON in mlir and "w4ax_matmul" in mlir


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", [4096, 11008, 14336])
@pytest.mark.parametrize("bits,ga", [(4, 0), (4, 128), (8, 32)])
def test_act_quant_lowers(m, k, bits, ga):
    f = functools.partial(act_quant.quantize_activations, bits=bits, group_size=ga)
    mlir = _export(f, _sds((m, k), jnp.bfloat16))
    assert TRITON in mlir and "quantize_activations" in mlir
    g = functools.partial(act_quant.rmsnorm_quantize, eps=1e-5, bits=bits, group_size=ga)
    mlir = _export(g, _sds((m, k), jnp.bfloat16), _sds((k,), jnp.bfloat16))
    assert TRITON in mlir and "rmsnorm_quantize" in mlir


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n", [4096, 11008, 14336, 576, 1536])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_hadamard_lowers(m, n, dtype):
    mlir = _export(hadamard.hadamard_transform_pallas, _sds((m, n), dtype))
    assert TRITON in mlir and "hadamard_transform" in mlir


# (b, t, heads, kv_heads, head_dim, capacity Q, key group G, buffer NB, residual R)
HIER_SHAPES = [
    (1, 1, 32, 8, 128, 4096, 128, 384, 128),  # Llama-3-8B decode, 4k tokens
    (4, 8, 32, 32, 128, 2048, 128, 384, 128),  # Llama-2-7B (MHA) verification, gamma = 7
    (2, 4, 9, 3, 64, 8192, 64, 256, 64),  # SmolLM2-135M, G = R = 64, 16 splits
]


@pytest.mark.parametrize("shape", HIER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("view", ["target", "draft"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_hier_attention_lowers(shape, view, dtype):
    b, t, h, kvh, hd, q_cap, group, nbuf, residual = shape
    codes = _sds((b, q_cap, kvh, hd // 2), jnp.uint8)
    lo = codes if view == "target" else None
    kgrp = _sds((b, q_cap // group, kvh, hd), jnp.float32)
    vtok = _sds((b, q_cap, kvh), jnp.float32)
    buf = _sds((b, nbuf, kvh, hd), dtype)
    f = functools.partial(hier_attention.hier_attention, residual=residual, view=view)
    mlir = _export(
        f,
        _sds((b, t, h, hd), dtype),
        _sds((b, t), jnp.int32),
        codes, lo, kgrp, kgrp, codes, lo, vtok, vtok, buf, buf,
        _sds((b,), jnp.int32),
    )  # fmt: skip
    assert TRITON in mlir and "hier_attention" in mlir
