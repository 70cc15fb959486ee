"""The embedded SmolLM2-135M Q4_1 GGUF against transformers' own GGUF loader.

Tolerance of the float comparison: zero (bit-identical). Both sides decode the same bytes with the
same float32 numpy routine (`gguf.quants.dequantize`: f16 scale/min widened to float32, then
``d * q + m``); the q/k un-permutation, transposition and fusing only move values. A copy in
float32 cannot round, so any difference would be a wrong tensor, a wrong permutation or a wrong
layout, never rounding.

Tolerance of ``QuantizedWeight.dequantize()`` against the float weights: zero as well. ``d`` is an
f16 value (11 significant bits) and ``q`` an integer below 16 (4 bits), so ``d * q`` needs at most
15 significant bits and is exact in float32; the only rounding is the single float32 addition of
``m``, which both sides perform on identical operands (and a fused multiply-add would round the
same exact product the same way), so the results are bit-identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax.config import PRESETS, QuantConfig
from qspec_jax.loading import qk_unpermute_index
from qspec_jax.quant.format import QuantizedWeight

pytestmark = pytest.mark.real

LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")


def _np(x):
    return np.asarray(x)


def test_config_matches_transformers(gguf_float, hf_reference):
    cfg, _, quant = gguf_float
    hc = hf_reference.config
    assert quant == QuantConfig(method="none")
    assert cfg.vocab_size == hc.vocab_size
    assert cfg.hidden_size == hc.hidden_size
    assert cfg.intermediate_size == hc.intermediate_size
    assert cfg.num_layers == hc.num_hidden_layers
    assert cfg.num_heads == hc.num_attention_heads
    assert cfg.num_kv_heads == hc.num_key_value_heads
    assert cfg.head_dim == hc.head_dim
    assert cfg.max_position_embeddings == hc.max_position_embeddings
    assert cfg.tie_embeddings == hc.tie_word_embeddings
    assert cfg.qkv_bias == bool(getattr(hc, "attention_bias", False))
    assert cfg.bos_token_id == hc.bos_token_id
    assert cfg.eos_token_ids == (hc.eos_token_id,)
    assert cfg.pad_token_id == hc.pad_token_id
    rope = getattr(hc, "rope_parameters", None) or {}
    assert np.float32(cfg.rope_theta) == np.float32(
        rope.get("rope_theta", getattr(hc, "rope_theta", None))
    )
    assert rope.get("rope_type", "default") == "default" and cfg.rope_scaling is None
    # GGUF stores eps as float32; transformers widens it (9.999999747e-06), we keep the shortest
    # decimal of the same float32 (1e-05). Same float32 value:
    assert np.float32(cfg.rms_norm_eps) == np.float32(hc.rms_norm_eps)


def test_config_equals_preset(gguf_float):
    cfg = gguf_float[0]
    assert cfg.replace(name="smollm2-135m") == PRESETS["smollm2-135m"]


def test_float_weights_match_transformers(gguf_float, hf_state):
    cfg, p, _ = gguf_float
    q, kv, f = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    assert p.lm_head is None and cfg.tie_embeddings
    np.testing.assert_array_equal(_np(p.embed), hf_state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(_np(p.final_norm), hf_state["model.norm.weight"])
    assert p.layers.bqkv is None
    L = p.layers
    wqkv, wo, wgu, wd = _np(L.wqkv), _np(L.wo), _np(L.w_gate_up), _np(L.w_down)
    an, mn = _np(L.attn_norm), _np(L.mlp_norm)
    for i in range(cfg.num_layers):
        h = f"model.layers.{i}."
        np.testing.assert_array_equal(wqkv[i][:, :q], hf_state[h + "self_attn.q_proj.weight"].T)
        np.testing.assert_array_equal(
            wqkv[i][:, q : q + kv], hf_state[h + "self_attn.k_proj.weight"].T
        )
        np.testing.assert_array_equal(
            wqkv[i][:, q + kv :], hf_state[h + "self_attn.v_proj.weight"].T
        )
        np.testing.assert_array_equal(wo[i], hf_state[h + "self_attn.o_proj.weight"].T)
        np.testing.assert_array_equal(wgu[i][:, :f], hf_state[h + "mlp.gate_proj.weight"].T)
        np.testing.assert_array_equal(wgu[i][:, f:], hf_state[h + "mlp.up_proj.weight"].T)
        np.testing.assert_array_equal(wd[i], hf_state[h + "mlp.down_proj.weight"].T)
        np.testing.assert_array_equal(an[i], hf_state[h + "input_layernorm.weight"])
        np.testing.assert_array_equal(mn[i], hf_state[h + "post_attention_layernorm.weight"])


def test_projection_outputs_match_transformers(gguf_float, hf_reference):
    """x @ wqkv equals transformers' q/k/v projections of the same input (layer 0 and the last)."""
    import torch

    cfg, p, _ = gguf_float
    q, kv = cfg.q_size, cfg.kv_size
    x = np.random.default_rng(0).normal(size=(3, cfg.hidden_size)).astype(np.float32)
    for i in (0, cfg.num_layers - 1):
        attn = hf_reference.model.layers[i].self_attn
        with torch.no_grad():
            ref = [m(torch.from_numpy(x)).numpy() for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        got = x @ _np(p.layers.wqkv[i])
        # Same weights, different float32 summation order over 576 products (outputs up to ~20):
        # a few float32 ulps of the largest partial sums, far below the size of any permutation error.
        for g, r in zip((got[:, :q], got[:, q : q + kv], got[:, q + kv :]), ref):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


@jax.jit
def _count_mismatches(qw, w):
    return jnp.sum(qw.dequantize(w.dtype) != w)


def test_int4_is_exact(gguf_int4, gguf_float):
    cfg, p4, quant = gguf_int4
    cfg_f, pf, _ = gguf_float
    assert cfg == cfg_f
    assert quant == QuantConfig(method="gguf", group_size=32, symmetric=False, act_group_size=32)
    for name in LINEARS:
        qw = getattr(p4.layers, name)
        assert isinstance(qw, QuantizedWeight)
        assert qw.group_size == 32 and not qw.symmetric
        assert qw.shape == getattr(pf.layers, name).shape
        assert (
            qw.packed.dtype == np.uint8
            and qw.scales.dtype == np.float32
            and qw.mins.dtype == np.float32
        )
        # One fused jitted comparison (materializing 95M dequantized floats costs seconds).
        n_diff = int(_count_mismatches(qw, getattr(pf.layers, name)))
        assert n_diff == 0, f"{name}: {n_diff} dequantized int4 weights differ from the float load"
    # The float parts are the same arrays in both modes.
    np.testing.assert_array_equal(_np(p4.embed), _np(pf.embed))
    np.testing.assert_array_equal(_np(p4.layers.attn_norm), _np(pf.layers.attn_norm))


def test_int4_matches_raw_q4_1_bytes(gguf_reader, gguf_int4):
    """Decode one attn_q block by hand from the file bytes (independent of gguf.dequantize)."""
    cfg, p4, _ = gguf_int4
    t = next(t for t in gguf_reader.tensors if t.name == "blk.0.attn_q.weight")
    assert t.tensor_type.name == "Q4_1"
    raw = np.asarray(t.data).reshape(cfg.q_size, cfg.hidden_size // 32, 20)
    perm = qk_unpermute_index(cfg.q_size, cfg.num_heads)
    from pallas_kernels.int4 import unpack_int4

    codes = _np(unpack_int4(p4.layers.wqkv.packed[0], signed=False))  # [D, qkv]
    scales = _np(p4.layers.wqkv.scales[0])
    mins = _np(p4.layers.wqkv.mins[0])
    for hf_row in (0, 1, 31, 32, 63, 64, 100, cfg.q_size - 1):
        row = perm[hf_row]  # the GGUF row holding this HF output row
        for blk in (0, 5, cfg.hidden_size // 32 - 1):
            b = raw[row, blk]
            d = b[0:2].view(np.float16)[0]
            m = b[2:4].view(np.float16)[0]
            qs = b[4:]
            want = np.concatenate([qs & 15, qs >> 4])  # elements 0..15 low nibbles, 16..31 high
            np.testing.assert_array_equal(codes[blk * 32 : (blk + 1) * 32, hf_row], want)
            assert scales[blk, hf_row] == np.float32(d) and mins[blk, hf_row] == np.float32(m)


def test_file_tensor_types(gguf_reader):
    """The embedded file: every linear Q4_1, token embedding Q8_0, norms F32, no output.weight."""
    from collections import Counter

    tensors = gguf_reader.tensors
    types = {t.name: t.tensor_type.name for t in tensors}
    assert Counter(types.values()) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types
