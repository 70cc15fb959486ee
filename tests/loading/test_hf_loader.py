"""load_hf_dir: round trips through transformers' save_pretrained, and its error cases."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qspec_jax.config import QuantConfig, RopeScaling  # noqa: E402
from qspec_jax.loading import LoadError, config_from_hf, load_checkpoint, load_hf_dir  # noqa: E402

TINY_KW = dict(
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


def _save(model_cls, cfg, path, dtype=torch.float32, **save_kw):
    torch.manual_seed(0)
    model = model_cls(cfg).to(dtype)
    with torch.no_grad():  # make the norms non-trivial so a mixed-up norm would be caught
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True, **save_kw)
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


def _check_weights(cfg, p, sd):
    q, kv, f = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    a = lambda x: np.asarray(x, np.float32)
    np.testing.assert_array_equal(a(p.embed), sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(a(p.final_norm), sd["model.norm.weight"])
    if cfg.tie_embeddings:
        assert p.lm_head is None
    else:
        np.testing.assert_array_equal(a(p.lm_head), sd["lm_head.weight"].T)
    for i in range(cfg.num_layers):
        h = f"model.layers.{i}."
        wqkv = a(p.layers.wqkv[i])
        np.testing.assert_array_equal(wqkv[:, :q], sd[h + "self_attn.q_proj.weight"].T)
        np.testing.assert_array_equal(wqkv[:, q : q + kv], sd[h + "self_attn.k_proj.weight"].T)
        np.testing.assert_array_equal(wqkv[:, q + kv :], sd[h + "self_attn.v_proj.weight"].T)
        if cfg.qkv_bias:
            b = a(p.layers.bqkv[i])
            np.testing.assert_array_equal(b[:q], sd[h + "self_attn.q_proj.bias"])
            np.testing.assert_array_equal(b[q : q + kv], sd[h + "self_attn.k_proj.bias"])
            np.testing.assert_array_equal(b[q + kv :], sd[h + "self_attn.v_proj.bias"])
        else:
            assert p.layers.bqkv is None
        np.testing.assert_array_equal(a(p.layers.wo[i]), sd[h + "self_attn.o_proj.weight"].T)
        gu = a(p.layers.w_gate_up[i])
        np.testing.assert_array_equal(gu[:, :f], sd[h + "mlp.gate_proj.weight"].T)
        np.testing.assert_array_equal(gu[:, f:], sd[h + "mlp.up_proj.weight"].T)
        np.testing.assert_array_equal(a(p.layers.w_down[i]), sd[h + "mlp.down_proj.weight"].T)
        np.testing.assert_array_equal(a(p.layers.attn_norm[i]), sd[h + "input_layernorm.weight"])
        np.testing.assert_array_equal(
            a(p.layers.mlp_norm[i]), sd[h + "post_attention_layernorm.weight"]
        )


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random untied Llama-3-style model saved by transformers (safetensors)."""
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    hf_cfg = HFLlamaConfig(
        **TINY_KW,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        ),
    )
    sd = _save(LlamaForCausalLM, hf_cfg, path)
    return path, sd


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_llama_round_trip(llama_dir):
    path, sd = llama_dir
    cfg, p, quant = load_hf_dir(path)
    assert quant == QuantConfig(method="none")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        256,
        128,
        256,
        2,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 32)
    assert cfg.rope_theta == 500000.0 and cfg.rms_norm_eps == 1e-5
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 256)
    assert not cfg.tie_embeddings and not cfg.qkv_bias
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, (2,), 0)
    assert cfg.name == "tiny-llama" and cfg.max_position_embeddings == 512
    _check_weights(cfg, p, sd)
    # load_checkpoint dispatches a directory here.
    cfg2, p2, _ = load_checkpoint(path)
    assert cfg2 == cfg
    np.testing.assert_array_equal(np.asarray(p2.layers.wqkv), np.asarray(p.layers.wqkv))


def test_tied_sharded_bfloat16(tmp_path):
    import jax.numpy as jnp
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    path = tmp_path / "sharded"
    hf_cfg = HFLlamaConfig(**TINY_KW, tie_word_embeddings=True)
    sd = _save(LlamaForCausalLM, hf_cfg, path, dtype=torch.bfloat16, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 2
    cfg, p, _ = load_hf_dir(path)  # bf16 -> float32 is exact
    assert cfg.tie_embeddings and p.lm_head is None
    _check_weights(cfg, p, sd)
    cfg_b, pb, _ = load_hf_dir(path, dtype="bfloat16")
    assert cfg_b.dtype == "bfloat16" and pb.layers.wqkv.dtype == jnp.bfloat16
    _check_weights(cfg_b, pb, sd)


def test_qwen2_biases(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path / "qwen"
    hf_cfg = Qwen2Config(**TINY_KW, tie_word_embeddings=True, rope_theta=1e6)
    sd = _save(Qwen2ForCausalLM, hf_cfg, path)
    assert "model.layers.0.self_attn.q_proj.bias" in sd
    cfg, p, _ = load_hf_dir(path)
    assert cfg.qkv_bias and cfg.rope_theta == 1e6
    _check_weights(cfg, p, sd)


def test_mistral_sliding_window_is_recorded_not_capped(tmp_path):
    # The window used to cap max_position_embeddings silently (issue 20); it is now recorded and
    # LlamaConfig.check_context refuses sequences past it.
    from transformers import MistralConfig, MistralForCausalLM

    path = tmp_path / "mistral"
    hf_cfg = MistralConfig(**{**TINY_KW, "max_position_embeddings": 1024}, sliding_window=128)
    sd = _save(MistralForCausalLM, hf_cfg, path)
    cfg, p, _ = load_hf_dir(path)
    assert cfg.max_position_embeddings == 1024 and cfg.sliding_window == 128
    cfg.check_context(128, "generate")
    with pytest.raises(ValueError, match="129 tokens passes .* window of 128 tokens"):
        cfg.check_context(129, "generate")
    _check_weights(cfg, p, sd)


def test_generation_config_eos_ids_are_added(llama_dir, tmp_path):
    path = _copy(llama_dir[0], tmp_path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert config_from_hf(path).eos_token_ids == (2, 7)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(LoadError, match="nowhere"):
        load_hf_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match=r"empty/config\.json: does not exist"):
        load_hf_dir(tmp_path / "empty")


def test_non_llama_model_type(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(LoadError, match=r"gpt2/config\.json: has model_type 'gpt2'"):
        load_hf_dir(d)


def test_corrupt_config_json(llama_dir, tmp_path):
    path = _copy(llama_dir[0], tmp_path)
    (path / "config.json").write_text("{ not json")
    with pytest.raises(LoadError, match=r"config\.json: cannot be read as JSON"):
        load_hf_dir(path)


def test_unsupported_rope_type(llama_dir, tmp_path):
    path = _copy(llama_dir[0], tmp_path)
    hf = json.loads((path / "config.json").read_text())
    hf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(LoadError, match=r"config\.json: uses RoPE type 'yarn'"):
        load_hf_dir(path)


def test_pickle_only_directory_is_refused(llama_dir, tmp_path):
    path = _copy(llama_dir[0], tmp_path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    # The loader must refuse before opening it, so the content does not matter.
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(
        LoadError, match=r"pytorch_model\.bin: is a pickled .*safetensors are required"
    ):
        load_hf_dir(path)


def test_no_weights_at_all(llama_dir, tmp_path):
    path = _copy(llama_dir[0], tmp_path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(LoadError, match=r"copy: holds no \.safetensors weight files"):
        load_hf_dir(path)


def test_shape_mismatch(llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _copy(llama_dir[0], tmp_path)
    st = path / "model.safetensors"
    tensors = load_file(st)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][
        :-64
    ]
    save_file(tensors, st, metadata={"format": "pt"})
    with pytest.raises(
        LoadError,
        match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.up_proj\.weight' has shape \[192, 128\] but config\.json implies \[256, 128\]",
    ):
        load_hf_dir(path)


def test_missing_tensor(llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _copy(llama_dir[0], tmp_path)
    st = path / "model.safetensors"
    tensors = load_file(st)
    del tensors["lm_head.weight"]
    save_file(tensors, st, metadata={"format": "pt"})
    with pytest.raises(LoadError, match=r"copy: has no tensor 'lm_head\.weight'"):
        load_hf_dir(path)


def test_truncated_safetensors(llama_dir, tmp_path):
    path = _copy(llama_dir[0], tmp_path)
    st = path / "model.safetensors"
    data = st.read_bytes()
    for n in (4, 100, len(data) // 2, len(data) - 1):
        st.write_bytes(data[:n])
        with pytest.raises(
            LoadError, match=r"model\.safetensors: is not a readable safetensors file"
        ):
            load_hf_dir(path)


def test_missing_shard(tmp_path):
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    path = tmp_path / "sharded"
    _save(LlamaForCausalLM, HFLlamaConfig(**TINY_KW), path, max_shard_size="100KB")
    victim = sorted(path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(
        LoadError,
        match=f"{victim.name}: is listed in model.safetensors.index.json but does not exist",
    ):
        load_hf_dir(path)
