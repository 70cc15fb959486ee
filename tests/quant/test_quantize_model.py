"""quantize_model: every method gives int4 linears of the right shapes and a usable model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax.cache.kv_cache import KVCache
from qspec_jax.config import NO_QUANT
from qspec_jax.model.llama import forward
from qspec_jax.quant import LINEARS, QUANT_METHODS, QuantizedWeight, quantize_model
from qspec_jax.quant.calibration import (
    CALIBRATION_CHATS,
    CALIBRATION_DOCUMENTS,
    as_token_batch,
    chunk_tokens,
)

CALIB = np.random.default_rng(0).integers(3, 256, size=(4, 64))


@pytest.fixture(scope="module")
def tiny_tokens(tiny_cfg):
    return jax.random.randint(jax.random.PRNGKey(7), (2, 32), 0, tiny_cfg.vocab_size)


def _logits(params, cfg, qcfg, tokens, precision):
    cache = KVCache.init(cfg, tokens.shape[0], tokens.shape[1])
    return np.asarray(forward(params, tokens, cache, cfg, qcfg, precision)[0])


_QUANTIZED: dict = {}


def _quantized(method, cfg, params):
    """Each method's tiny model (group 64, calibrated on CALIB), quantized once per session."""
    if method not in _QUANTIZED:
        _QUANTIZED[method] = quantize_model(
            params, cfg, method, 64, calib_tokens=CALIB, progress=False
        )
    return _QUANTIZED[method]


@pytest.mark.parametrize("method", QUANT_METHODS)
def test_methods_shapes_and_w4a16_close_to_fp(method, tiny_cfg, tiny_params, tiny_tokens):
    qp, qcfg = _quantized(method, tiny_cfg, tiny_params)
    assert qcfg.method == method and qcfg.group_size == 64 and qcfg.symmetric
    assert qcfg.rotated == method.startswith("quarot")
    n_layers = tiny_cfg.num_layers
    for name in LINEARS:
        fw, qw = getattr(tiny_params.layers, name), getattr(qp.layers, name)
        assert isinstance(qw, QuantizedWeight) and qw.mins is None
        k, n = fw.shape[-2:]
        assert qw.packed.shape == (n_layers, k // 2, n) and qw.packed.dtype == jnp.uint8
        assert qw.scales.shape == (n_layers, k // 64, n) and qw.group_size == 64
    assert not isinstance(qp.embed, QuantizedWeight)
    if qcfg.rotated:  # QuaRot always holds an explicit (folded, rotated) float LM head
        assert qp.lm_head.shape == (tiny_cfg.hidden_size, tiny_cfg.vocab_size)
    else:
        assert (qp.lm_head is None) == (tiny_params.lm_head is None)
    ref = _logits(tiny_params, tiny_cfg, NO_QUANT, tiny_tokens, "fp")
    got = _logits(qp, tiny_cfg, qcfg, tiny_tokens, "w4a16")
    # int4 weights with group 64 on a random model: measured relative error ~0.1
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.3


@pytest.mark.parametrize("base", ["rtn", "quarot-rtn"])
def test_gptq_beats_rtn_on_calibration_logits(base, tiny_cfg, tiny_params):
    """Sequential GPTQ lowers the W4A16-vs-fp logit error on its own calibration tokens."""
    tokens = jnp.asarray(CALIB)
    ref = _logits(tiny_params, tiny_cfg, NO_QUANT, tokens, "fp")
    errs = {}
    for method in (base, base.replace("rtn", "gptq")):
        qp, qcfg = _quantized(method, tiny_cfg, tiny_params)
        got = _logits(qp, tiny_cfg, qcfg, tokens, "w4a16")
        errs[method] = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    rtn, gptq = errs.values()
    assert gptq < 0.9 * rtn, errs


@pytest.mark.parametrize("group_size,symmetric", [(0, True), (32, False), (128, True)])
def test_group_sizes_and_asymmetric(group_size, symmetric, tiny_cfg, tiny_params):
    qp, qcfg = quantize_model(tiny_params, tiny_cfg, "rtn", group_size, symmetric=symmetric)
    assert qcfg.group_size == group_size and qcfg.symmetric == symmetric
    for name in LINEARS:
        qw = getattr(qp.layers, name)
        k = qw.in_features
        assert qw.group_size == (group_size or k)
        assert (qw.mins is None) == symmetric
        if not symmetric:
            assert qw.mins.shape == qw.scales.shape


def test_activation_settings_and_errors(tiny_cfg, tiny_params):
    _, qcfg = quantize_model(
        tiny_params, tiny_cfg, "quarot-rtn", 32, act_group_size=64, act_clip_ratio=0.9
    )
    assert (qcfg.act_group_size, qcfg.act_clip_ratio, qcfg.rotated) == (64, 0.9, True)
    _, qcfg = quantize_model(tiny_params, tiny_cfg, "rtn", 32)
    assert (qcfg.act_group_size, qcfg.act_clip_ratio) == (32, 1.0)  # the measured defaults
    with pytest.raises(ValueError, match="rtn, gptq, quarot-rtn, quarot-gptq"):
        quantize_model(tiny_params, tiny_cfg, "awq")
    with pytest.raises(ValueError, match="activation group size"):
        quantize_model(tiny_params, tiny_cfg, "rtn", act_group_size=48)
    qp, _ = quantize_model(tiny_params, tiny_cfg, "rtn", 32)
    with pytest.raises(ValueError, match="already int4"):
        quantize_model(qp, tiny_cfg, "rtn")
    with pytest.raises(ValueError, match="calibration token ids"):
        quantize_model(tiny_params, tiny_cfg, "gptq", calib_tokens=np.full((1, 16), 999))


def test_calibration_inputs():
    assert len(CALIBRATION_DOCUMENTS) >= 10 and len(CALIBRATION_CHATS) >= 5
    text = " ".join(CALIBRATION_DOCUMENTS)
    assert "def " in text and "Answer:" in text and len(text.split()) > 2000
    assert chunk_tokens(np.arange(10), 4).shape == (2, 4)
    assert chunk_tokens(np.arange(3), 4).shape == (1, 3)
    assert as_token_batch(np.arange(12).reshape(3, 4)).shape == (3, 4)
    assert as_token_batch([[1, 2, 3], [4, 5]], seq_len=2).shape == (2, 2)
    assert as_token_batch([[1, 2], [4, 5]]).shape == (2, 2)


@pytest.mark.real
def test_calibration_tokens_smollm2():
    from qspec_jax.loading import load_tokenizer
    from qspec_jax.quant.calibration import calibration_tokens

    tok = load_tokenizer("smollm2-135m")
    toks = calibration_tokens(tok)
    assert toks.shape[1] == 512 and toks.shape[0] * 512 >= 4000
    assert toks.max() < 49152 and toks.min() >= 0
