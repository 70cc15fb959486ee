"""Layer-by-layer loading + quantizing computes what quantize_model computes on the whole model."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402

from qspec_jax.loading import load_hf_dir  # noqa: E402
from qspec_jax.loading.hf_loader import HFCheckpoint  # noqa: E402
from qspec_jax.model.params import stack_layers  # noqa: E402
from qspec_jax.quant import quantize_checkpoint, quantize_model  # noqa: E402

TINY = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """An untied Llama (float32 on disk) and a tied Qwen2 with biases (bfloat16, sharded)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("stream")
    out = {}
    for name, cfg_cls, model_cls, kw, dtype, save_kw in (
        (
            "llama",
            tf.LlamaConfig,
            tf.LlamaForCausalLM,
            dict(tie_word_embeddings=False),
            "float32",
            {},
        ),
        (
            "qwen2",
            tf.Qwen2Config,
            tf.Qwen2ForCausalLM,
            dict(tie_word_embeddings=True),
            "bfloat16",
            dict(max_shard_size="100KB"),
        ),
    ):
        torch.manual_seed(1)
        model = model_cls(cfg_cls(**TINY, **kw))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n or n.endswith(".bias"):
                    p.add_(0.1 * torch.randn_like(p))
        out[name] = root / name
        model.to(getattr(torch, dtype)).save_pretrained(out[name], **save_kw)
    return out


def _assert_same(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize(
    "name,method",
    [
        ("llama", "rtn"),
        ("llama", "quarot-rtn"),
        ("qwen2", "quarot-gptq"),
        ("qwen2", "rtn"),
    ],
)
def test_streaming_equals_whole_model(hf_dirs, name, method):
    path = hf_dirs[name]
    calib = np.random.default_rng(0).integers(0, 256, size=(2, 32))
    kw = dict(calib_tokens=calib, progress=False) if method.endswith("gptq") else {}
    cfg, params, _ = load_hf_dir(path)
    want, want_q = quantize_model(params, cfg, method, 64, **dict(kw, progress=False))
    cfg2, got, got_q = quantize_checkpoint(HFCheckpoint(path), method, 64, stack=False, **kw)
    assert cfg2 == cfg and got_q == want_q
    assert isinstance(got.layers, tuple) and len(got.layers) == cfg.num_layers
    # Every int4 code, scale, norm, bias, embedding and head bit-identical.
    _assert_same(stack_layers(got), want)


def test_load_streams_an_hf_directory_and_caches_it(hf_dirs, tmp_path, monkeypatch):
    import qspec_jax

    monkeypatch.setenv("QSPEC_JAX_CACHE_DIR", str(tmp_path / "cache"))
    kw = dict(quant="rtn", group_size=64, dtype="float32", progress=False, compile_cache=False)
    first = qspec_jax.load(str(hf_dirs["llama"]), **kw)
    # No tokenizer files in the directory: token-id prompts only, and the cache entry says so.
    assert first.tokenizer is None and first.load_info["streamed"]
    assert first.load_info["quant_cache"] == "written"
    again = qspec_jax.load(str(hf_dirs["llama"]), **kw)
    assert again.load_info["quant_cache"] == "hit" and again.tokenizer is None
    ids = np.arange(3, 19, dtype=np.int32)[None]  # [1, 16]
    np.testing.assert_array_equal(first.logits(ids, "w4a16"), again.logits(ids, "w4a16"))
