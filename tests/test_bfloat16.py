"""bfloat16 end to end on the tiny preset: qspec, hspec and quantspec equal W4A16 greedy.

The exactness guarantee does not depend on the dtype: the verifier's argmax decides every token
and the draft only proposes, provided a verification row's logits equal the autoregressive row's
bit for bit. On CPU that needs every decode-time op to be row independent in bfloat16 too: the
int4 matmul, attention (both caches) and LM head CPU kernels (docs/kernels.md, "bfloat16"; before
they took bfloat16, XLA's path made qspec, hspec and quantspec differ from W4A16 from the 2nd or
10th token). These tests run it with bfloat16 float weights, activations, KV cache (both formats)
and LM head, at batch 1 and in a mixed (ragged) batch.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import qspec_jax

PROMPTS = [[30], [5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22]]
KW = dict(max_new_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def bf16_engine():
    return qspec_jax.load("tiny", quant="rtn", group_size=32, dtype="bfloat16", progress=False)


def test_bfloat16_everywhere(bf16_engine):
    eng = bf16_engine
    assert eng.config.dtype == "bfloat16"
    layer = eng.params.layers[0] if isinstance(eng.params.layers, tuple) else eng.params.layers
    assert eng.params.embed.dtype == jnp.bfloat16 and layer.attn_norm.dtype == jnp.bfloat16
    assert eng.params.lm_head is None or eng.params.lm_head.dtype == jnp.bfloat16


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "mixed"])
def test_greedy_speculative_modes_equal_w4a16_in_bfloat16(bf16_engine, prompts):
    eng = bf16_engine
    ref = eng.generate(prompts, mode="w4a16", **KW)
    for draft in ("w4a8", "w4a4"):
        got = eng.generate(prompts, mode="qspec", gamma=3, draft=draft, **KW)
        assert got.tokens == ref.tokens, draft
    hs = eng.generate(prompts, mode="hspec", tree="3,1", levels="w4a4,w4a8,w4a16", **KW)
    assert hs.tokens == ref.tokens
    # The hierarchical (QuantSpec) cache: exact against W4A16 on that same cache format.
    ref_h = eng.generate(prompts, mode="w4a16", kv_cache="hier", kv_residual=4, **KW)
    qs = eng.generate(prompts, mode="quantspec", gamma=3, kv_residual=4, **KW)
    assert qs.stats["kv_cache"] == "hier" and qs.tokens == ref_h.tokens


def test_kv_bytes_per_token_halve_in_bfloat16(bf16_engine):
    res = bf16_engine.generate(PROMPTS[:1], mode="w4a16", **KW)
    cfg = bf16_engine.config
    float32_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # K and V, 4 B
    # tests/test_quantspec.py asserts the float32 engine's figure (512 B/token for tiny).
    assert res.stats["kv_bytes_per_token"] == float32_bytes // 2


@pytest.fixture(scope="module")
def bf16_q8_engine(bf16_engine):
    """`bf16_engine` with its head replaced by one on the Q8_0 grid, as a GGUF's is: the int8
    codes and float32 scales (`Params.head_q8`, what the CPU head kernel reads) and the
    bfloat16 float head their rounding, as `load_gguf(..., dtype="bfloat16")` builds them."""
    import jax
    import numpy as np

    from qspec_jax.engine import Engine
    from qspec_jax.quant.format import Q8_GROUP, Q8Head

    p = bf16_engine.params
    v, d = p.embed.shape
    w = np.asarray(jax.random.normal(jax.random.key(11), (v, d // Q8_GROUP, Q8_GROUP)))
    scales = (np.abs(w).max(-1) / 127).astype(np.float16).astype(np.float32)  # GGUF: fp16
    codes = np.clip(np.rint(w / scales[..., None]), -127, 127).astype(np.int8).reshape(v, d)
    head = Q8Head(codes=jnp.asarray(codes), scales=jnp.asarray(scales))  # [V, D], [V, D/32]
    w16 = head.dequantize(jnp.bfloat16)  # [V, D]
    params = p.replace(embed=w16, lm_head=None if p.lm_head is None else w16.T, head_q8=head)
    return Engine(bf16_engine.config, params, bf16_engine.qconfig, prepared=True)


def test_q8_head_in_bfloat16_keeps_qspec_equal_to_w4a16(bf16_q8_engine):
    """The Q8_0 head kernel in bfloat16 (the embedded GGUF's head): QSpec == W4A16 greedy."""
    import jax

    from pallas_kernels import cpu_kernels
    from qspec_jax.model.llama import lm_head

    eng = bf16_q8_engine
    if cpu_kernels.available():  # the head runs on the Q8_0 kernel, not the float head's
        x = jnp.zeros((1, eng.config.hidden_size), jnp.bfloat16)
        assert "qspec_q8_head" in jax.jit(lm_head).lower(eng.params, x).as_text()
    ref = eng.generate(PROMPTS, mode="w4a16", **KW)
    got = eng.generate(PROMPTS, mode="qspec", gamma=3, draft="w4a8", **KW)
    assert got.tokens == ref.tokens


@pytest.mark.real
def test_real_model_in_bfloat16_keeps_the_q8_0_head():
    """SmolLM2-135M with the GGUF's int4 codes in bfloat16 keeps the file's Q8_0 head (before,
    a bfloat16 load lost the codes and its head ran 7x slower on the float head kernel), the
    bfloat16 float head is the rounding of exactly those values, and the LM head lowers to the
    Q8_0 kernel. (QSpec == W4A16 with that head in bfloat16: the test above, on the tiny
    preset; on this model: experiments/bench_bf16.py.)"""
    import jax
    import numpy as np

    from pallas_kernels import cpu_kernels
    from qspec_jax.model.llama import lm_head
    from qspec_jax.model.params import float_head

    eng = qspec_jax.load("smollm2-135m", quant="gguf", dtype="bfloat16", progress=False)
    head = eng.params.head_q8
    assert head is not None and head.codes.shape == (49152, 576)
    np.testing.assert_array_equal(
        np.asarray(head.dequantize(jnp.bfloat16)), np.asarray(float_head(eng.params).T)
    )
    if cpu_kernels.available():
        x = jnp.zeros((1, 576), jnp.bfloat16)
        hlo = jax.jit(lambda p, x: lm_head(p, x)).lower(eng.params, x).as_text()
        assert "qspec_q8_head" in hlo
