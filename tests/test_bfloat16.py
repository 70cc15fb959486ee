"""bfloat16 end to end on the tiny preset: every speculative mode equals W4A16 greedy.

The exactness guarantee does not depend on the dtype: the verifier's argmax decides every token
and the draft only proposes. These tests run it with bfloat16 float weights, activations, KV
cache (both formats) and LM head, at batch 1 and in a mixed (ragged) batch.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

import qspec_jax

PROMPTS = [[30], [5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22]]
# Not yet true on CPU (2026-12-02): the CPU attention kernel, which runs every query row by the
# same operations whatever the row count (what makes verification equal autoregressive decoding
# bit for bit), refuses bfloat16, so attention falls back to XLA's dense path, whose bfloat16
# results depend on the number of query rows. Measured: qspec (w4a8 and w4a4 drafts) and hspec
# differ from W4A16 for the prompt [30] from the 2nd token, alone or in the batch; quantspec
# differs from W4A16-on-hier for [20, 21, 22]; W4A16 itself is batch-invariant. Strict: the
# test fails as soon as bfloat16 becomes exact, so the mark is removed then.
NOT_EXACT_YET = pytest.mark.xfail(
    strict=True, reason="CPU attention kernels refuse bfloat16; XLA's path is row-count dependent"
)
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


@NOT_EXACT_YET
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
