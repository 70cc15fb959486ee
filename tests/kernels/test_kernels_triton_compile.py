"""The Triton IR each Pallas kernel lowers to compiles to a CUDA binary (sm_90, H100), on CPU.

`jax.export` (test_kernels_lowering.py) stops at Triton IR; the GPU-side Triton compiler that
would reject e.g. a bad dot shape or a layout it cannot handle only runs on a GPU. Here the
installed `triton` package (its bundled LLVM and ptxas, no GPU needed) compiles that IR through
TTGIR, LLVM IR and PTX to a cubin. Caveat: XLA embeds its own Triton build, so this is strong
but not identical evidence that the kernels compile on a real GPU.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

from pallas_kernels import (  # noqa: E402
    act_quant,
    hadamard,
    hier_attention,
    w4a16_matmul,
    w4ax_matmul,
)

S = jax.ShapeDtypeStruct
TRITON = "__gpu$xla.gpu.triton"


@pytest.fixture
def ttir(monkeypatch):
    """Captures the Triton IR text of every pallas_call lowered while exporting."""
    from jax._src.pallas.triton import pallas_call_registration as reg

    captured = []
    orig = reg.lowering.lower_jaxpr_to_triton_module

    def spy(*args, **kwargs):
        result = orig(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    monkeypatch.setattr(reg.lowering, "lower_jaxpr_to_triton_module", spy)
    return captured


def _fresh(fn):
    """A new trace of the un-jitted kernel wrapper: an earlier export of the same jitted function
    and shapes (test_kernels_lowering.py) would reuse its lowering and skip the spy."""
    if isinstance(fn, functools.partial):
        raw = fn.func.__wrapped__
        return lambda *args: raw(*args, **fn.keywords)
    return lambda *args: fn.__wrapped__(*args)


def _hier_attention_case(b, t, h, kvh, hd, q_cap, group, nbuf, residual, view, dtype):
    """(fn, args) of `hier_attention` over one layer of a hierarchical cache of these sizes."""
    codes = S((b, q_cap, kvh, hd // 2), jnp.uint8)
    kgrp = S((b, q_cap // group, kvh, hd), jnp.float32)
    vtok = S((b, q_cap, kvh), jnp.float32)
    buf = S((b, nbuf, kvh, hd), dtype)
    lo = codes if view == "target" else None
    args = [S((b, t, h, hd), dtype), S((b, t), jnp.int32), codes, lo, kgrp, kgrp]
    args += [codes, lo, vtok, vtok, buf, buf, S((b,), jnp.int32)]
    fn = functools.partial(hier_attention.hier_attention, residual=residual, view=view)
    return fn, args


def _cases():
    k, n, m = 4096, 11008, 16
    bf = jnp.bfloat16
    core = {
        "w4a16-sym-g128": (
            w4a16_matmul.w4a16_matmul,
            [S((m, k), bf), S((k // 2, n), jnp.uint8), S((k // 128, n), bf)],
        ),
        "w4a16-asym-g32-f32": (
            w4a16_matmul.w4a16_matmul,
            [
                S((1, n), jnp.float32),
                S((n // 2, k), jnp.uint8),
                S((n // 32, k), jnp.float32),
                S((n // 32, k), jnp.float32),
            ],
        ),
        "w4ax-pertoken-g128": (
            w4ax_matmul.w4ax_matmul,
            [
                S((m, k), jnp.int8),
                S((m, 1), jnp.float32),
                S((k // 2, n), jnp.uint8),
                S((k // 128, n), bf),
            ],
        ),
        "w4ax-ga32-asym-perchannel": (
            w4ax_matmul.w4ax_matmul,
            [
                S((m, k), jnp.int8),
                S((m, k // 32), jnp.float32),
                S((k // 2, n), jnp.uint8),
                S((1, n), bf),
                S((1, n), bf),
            ],
        ),
        "quant-a4-pertoken": (
            functools.partial(act_quant.quantize_activations, bits=4),
            [S((m, k), bf)],
        ),
        "rmsnorm-quant-a8-g128": (
            functools.partial(act_quant.rmsnorm_quantize, eps=1e-5, bits=8, group_size=128),
            [S((m, 14336), bf), S((14336,), bf)],
        ),
        "hadamard-11008-bf16": (hadamard.hadamard_transform_pallas, [S((m, 11008), bf)]),
        "hadamard-576-f32": (hadamard.hadamard_transform_pallas, [S((1, 576), jnp.float32)]),
        # Llama-3-8B decode (GQA 32/8, hd 128), R = G = 128, 4k tokens: int8 view, bf16.
        "hier-attn-target-bf16": _hier_attention_case(
            1, 1, 32, 8, 128, 4096, 128, 384, 128, "target", bf
        ),
        # SmolLM2-135M verification (9/3 heads, hd 64), gamma + 1 = 4 rows, int4 view, f32.
        "hier-attn-draft-f32-t4": _hier_attention_case(
            2, 4, 9, 3, 64, 2048, 128, 384, 128, "draft", jnp.float32
        ),
    }
    slow = {
        "w4ax-c96": (
            w4ax_matmul.w4ax_matmul,
            [
                S((m, 576), jnp.int8),
                S((m, 3), jnp.float32),
                S((288, 1536), jnp.uint8),
                S((6, 1536), bf),
            ],
        ),
        "w4a16-prefill-14336": (
            w4a16_matmul.w4a16_matmul,
            [S((256, 14336), bf), S((7168, 4096), jnp.uint8), S((112, 4096), bf)],
        ),
        "hadamard-14336-bf16": (hadamard.hadamard_transform_pallas, [S((m, 14336), bf)]),
    }
    return [pytest.param(name, *v, id=name) for name, v in core.items()] + [
        pytest.param(name, *v, id=name, marks=pytest.mark.slow) for name, v in slow.items()
    ]


@pytest.mark.parametrize("name,fn,args", _cases())
def test_compiles_to_cubin(name, fn, args, ttir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated
    exp = export.export(
        jax.jit(_fresh(fn)),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON)],
    )(*args)
    assert TRITON in exp.mlir_module()
    assert len(ttir) == 1
    src = tmp_path / f"{name}.ttir"
    src.write_text(ttir[0])
    kernel = triton.compile(
        str(src), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3}
    )
    assert kernel.asm["cubin"] and ".entry" in kernel.asm["ptx"]
    assert kernel.metadata.shared <= 227 * 1024  # fits H100 shared memory per block
