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
