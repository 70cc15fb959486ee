"""load_gguf on tiny GGUF files written like llama.cpp writes them, and its error cases."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest

from qspec_jax.config import QuantConfig, RopeScaling
from qspec_jax.loading import LoadError, load_gguf, qk_unpermute_index, read_gguf_config
from qspec_jax.loading.gguf_loader import _llama3_rope_factors
from qspec_jax.quant.format import QuantizedWeight


def _q4_1_roundtrip(w):
    """What a Q4_1 file stores for `w` (HF layout [out, in]), dequantized to float32."""
    q = gguf.GGMLQuantizationType.Q4_1
    return gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w, np.float32), q), q)


def _q8_0_roundtrip(w):
    q = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(w, np.float32), q), q)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_gguf):
    w = tiny_gguf.weights(seed=1)
    path = tiny_gguf.write(tmp_path_factory.mktemp("gguf") / "tiny.gguf", w)
    return path, w


def test_qk_unpermute_index_matches_transformers(tiny_gguf):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    proc = LlamaTensorProcessor()
    for n_heads, n_kv, hd in [(9, 3, 64), (4, 2, 32), (32, 8, 128)]:
        for heads in (n_heads, n_kv):
            w = rng.normal(size=(heads * hd, 8)).astype(np.float32)
            want = proc._reverse_permute_weights(w, n_heads, heads)
            np.testing.assert_array_equal(w[qk_unpermute_index(heads * hd, heads)], want)
            # ... and it inverts llama.cpp's forward permutation.
            np.testing.assert_array_equal(
                tiny_gguf.permute(w, n_heads, heads)[qk_unpermute_index(heads * hd, heads)], w
            )


def test_tiny_float_weights(tiny_file, tiny_gguf):
    path, w = tiny_file
    t = tiny_gguf.cfg
    cfg, p, quant = load_gguf(path)
    assert quant == QuantConfig(method="none")
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (t["layers"], t["d"], t["f"])
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (
        t["heads"],
        t["kv_heads"],
        t["head_dim"],
        t["vocab"],
    )
    assert cfg.tie_embeddings and not cfg.qkv_bias and cfg.rope_scaling is None
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (1, (2,), 0)
    assert (
        cfg.rms_norm_eps == 1e-5
        and cfg.rope_theta == 10000.0
        and cfg.max_position_embeddings == 512
    )
    assert cfg.name == "tiny" and cfg.dtype == "float32"
    assert read_gguf_config(path) == cfg

    q, kv, f = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    np.testing.assert_array_equal(np.asarray(p.embed), _q8_0_roundtrip(w["token_embd.weight"]))
    np.testing.assert_array_equal(np.asarray(p.final_norm), w["output_norm.weight"])
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        wqkv = np.asarray(p.layers.wqkv[i])
        np.testing.assert_array_equal(wqkv[:, :q], _q4_1_roundtrip(w[b + "attn_q.weight"]).T)
        np.testing.assert_array_equal(
            wqkv[:, q : q + kv], _q4_1_roundtrip(w[b + "attn_k.weight"]).T
        )
        np.testing.assert_array_equal(wqkv[:, q + kv :], _q4_1_roundtrip(w[b + "attn_v.weight"]).T)
        np.testing.assert_array_equal(
            np.asarray(p.layers.wo[i]), _q4_1_roundtrip(w[b + "attn_output.weight"]).T
        )
        gu = np.asarray(p.layers.w_gate_up[i])
        np.testing.assert_array_equal(gu[:, :f], _q4_1_roundtrip(w[b + "ffn_gate.weight"]).T)
        np.testing.assert_array_equal(gu[:, f:], _q4_1_roundtrip(w[b + "ffn_up.weight"]).T)
        np.testing.assert_array_equal(
            np.asarray(p.layers.w_down[i]), _q4_1_roundtrip(w[b + "ffn_down.weight"]).T
        )
        np.testing.assert_array_equal(np.asarray(p.layers.attn_norm[i]), w[b + "attn_norm.weight"])
        np.testing.assert_array_equal(np.asarray(p.layers.mlp_norm[i]), w[b + "ffn_norm.weight"])
        # The weights are close to the originals too (Q4_1 error), i.e. rows are in HF order.
        np.testing.assert_allclose(wqkv[:, :q], w[b + "attn_q.weight"].T, atol=0.05)


def test_tiny_int4_exact(tiny_file):
    path, _ = tiny_file
    _, pf, _ = load_gguf(path)
    cfg, p4, quant = load_gguf(path, keep_int4=True)
    assert quant == QuantConfig(method="gguf", group_size=32, symmetric=False, act_group_size=32)
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        qw = getattr(p4.layers, name)
        assert isinstance(qw, QuantizedWeight) and qw.group_size == 32 and qw.mins is not None
        np.testing.assert_array_equal(
            np.asarray(qw.dequantize()), np.asarray(getattr(pf.layers, name))
        )


def test_tiny_bfloat16(tiny_file):
    import jax.numpy as jnp

    path, _ = tiny_file
    _, pf, _ = load_gguf(path)
    cfg, pb, _ = load_gguf(path, dtype="bfloat16", keep_int4=True)
    assert cfg.dtype == "bfloat16" and pb.embed.dtype == jnp.bfloat16
    assert pb.layers.attn_norm.dtype == jnp.bfloat16
    assert pb.layers.wqkv.scales.dtype == jnp.float32  # int4 parts stay exact
    np.testing.assert_array_equal(
        np.asarray(pb.embed, np.float32), np.asarray(pf.embed.astype(jnp.bfloat16), np.float32)
    )


def test_tiny_untied_with_bias(tmp_path, tiny_gguf):
    w = tiny_gguf.weights(seed=2, qkv_bias=True, tie=False)
    path = tiny_gguf.write(tmp_path / "biased.gguf", w)
    cfg, p, _ = load_gguf(path)
    q, kv = cfg.q_size, cfg.kv_size
    assert not cfg.tie_embeddings and cfg.qkv_bias
    np.testing.assert_array_equal(np.asarray(p.lm_head), _q8_0_roundtrip(w["output.weight"]).T)
    for i in range(cfg.num_layers):
        b = np.asarray(p.layers.bqkv[i])
        np.testing.assert_array_equal(b[:q], w[f"blk.{i}.attn_q.bias"])
        np.testing.assert_array_equal(b[q : q + kv], w[f"blk.{i}.attn_k.bias"])
        np.testing.assert_array_equal(b[q + kv :], w[f"blk.{i}.attn_v.bias"])


def test_rope_freqs_become_llama3_scaling(tmp_path, tiny_gguf):
    t = tiny_gguf.cfg
    w = tiny_gguf.weights(seed=3)
    rs = RopeScaling()
    factors = _llama3_rope_factors(t["head_dim"], t["theta"], rs).astype(np.float32)
    assert 1.0 < factors.max() and factors.min() == 1.0  # the tiny config exercises all three bands
    path = tiny_gguf.write(tmp_path / "l3.gguf", w, extra={"rope_freqs.weight": factors})
    assert read_gguf_config(path).rope_scaling == rs

    path = tiny_gguf.write(tmp_path / "odd.gguf", w, extra={"rope_freqs.weight": factors * 1.5})
    with pytest.raises(LoadError, match="odd.gguf.*rope_freqs"):
        read_gguf_config(path)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(LoadError, match="nope.gguf") as e:
        load_gguf(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(LoadError, match="not a regular file"):
        load_gguf(tmp_path)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "text.gguf"
    bad.write_bytes(b"this is not a GGUF file at all" * 10)
    with pytest.raises(LoadError, match="text.gguf.*truncated or corrupt"):
        load_gguf(bad)


def test_non_llama_architecture(tmp_path, tiny_gguf):
    path = tiny_gguf.write(tmp_path / "gpt2.gguf", tiny_gguf.weights(), arch="gpt2")
    with pytest.raises(LoadError, match=r"gpt2\.gguf.*architecture 'gpt2'.*only 'llama'"):
        load_gguf(path)


def test_keep_int4_needs_q4_1(tmp_path, tiny_gguf):
    path = tiny_gguf.write(tmp_path / "q8.gguf", tiny_gguf.weights(), linear_type="Q8_0")
    with pytest.raises(
        LoadError,
        match=r"q8\.gguf.*'blk\.0\.attn_q\.weight' is stored as Q8_0, not Q4_1.*keep_int4=False",
    ):
        load_gguf(path, keep_int4=True)
    cfg, p, _ = load_gguf(path)  # float loading still works
    assert p.layers.wqkv.shape == (cfg.num_layers, cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size)


def test_missing_tensor(tmp_path, tiny_gguf):
    path = tiny_gguf.write(
        tmp_path / "holes.gguf", tiny_gguf.weights(), drop=("blk.1.ffn_up.weight",)
    )
    for keep in (False, True):
        with pytest.raises(
            LoadError, match=r"holes\.gguf.*missing the tensor 'blk\.1\.ffn_up\.weight'"
        ):
            load_gguf(path, keep_int4=keep)


def test_shape_mismatch(tmp_path, tiny_gguf):
    t = tiny_gguf.cfg
    w = tiny_gguf.weights()
    w["blk.0.attn_v.weight"] = np.zeros((t["kv_heads"] * t["head_dim"] + 32, t["d"]), np.float32)
    path = tiny_gguf.write(tmp_path / "shape.gguf", w)
    with pytest.raises(
        LoadError, match=r"shape\.gguf.*'blk\.0\.attn_v\.weight' has shape \[96, 128\].*\[64, 128\]"
    ):
        load_gguf(path)


def test_unknown_tensor(tmp_path, tiny_gguf):
    extra = {"blk.0.attn_output.bias": np.zeros(tiny_gguf.cfg["d"], np.float32)}
    path = tiny_gguf.write(tmp_path / "extra.gguf", tiny_gguf.weights(), extra=extra)
    with pytest.raises(LoadError, match=r"extra\.gguf.*blk\.0\.attn_output\.bias"):
        load_gguf(path)


def test_truncated_tiny_file_every_region(tmp_path, tiny_file):
    """Cutting the file anywhere (header, metadata, tensor infos, data) gives a LoadError."""
    path, _ = tiny_file
    data = open(path, "rb").read()
    cuts = sorted({*range(0, 400, 7), *np.linspace(400, len(data) - 1, 40).astype(int).tolist()})
    for n in cuts:
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(LoadError, match=f"cut{n}.gguf"):
            load_gguf(cut)
        cut.unlink()


@pytest.mark.real
@pytest.mark.parametrize("frac", [0.00001, 0.01, 0.5, 0.999999])
def test_truncated_embedded_file(tmp_path, gguf_path, frac):
    size = os.path.getsize(gguf_path)
    n = int(size * frac)
    cut = tmp_path / "truncated.gguf"
    with open(gguf_path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(n))  # the first n bytes
    with pytest.raises(LoadError, match=r"truncated\.gguf.*(truncated|corrupt)"):
        load_gguf(cut)


def test_gguf_weights_are_cached_like_quantized_ones(tmp_path, monkeypatch, tiny_file):
    """quant="gguf": the first load reads the file and writes the checkpoint, the second reads
    the checkpoint (the file is not opened), with the same arrays and the same greedy tokens."""
    import jax

    import qspec_jax
    import qspec_jax.engine
    import qspec_jax.loading
    from qspec_jax import disk_cache

    monkeypatch.setenv(disk_cache.ENV_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(disk_cache.ENV_QUANT, raising=False)
    # the tiny file holds no tokenizer (load() refuses such a file); ids are passed directly
    monkeypatch.setattr(qspec_jax.engine, "_tokenizer", lambda source, use_cache: None)
    path, _ = tiny_file
    first = qspec_jax.load(path, quant="gguf", progress=False)
    assert first.load_info["quant_cache"] == "written"

    def no_read(*a, **k):
        raise AssertionError("the GGUF file was read despite a cached checkpoint")

    monkeypatch.setattr(qspec_jax.loading, "load_checkpoint", no_read)
    second = qspec_jax.load(path, quant="gguf", progress=False)
    assert second.load_info["quant_cache"] == "hit"
    assert second.load_info["quant_cache_path"] == first.load_info["quant_cache_path"]
    assert second.qconfig == first.qconfig
    la, lb = (jax.tree_util.tree_leaves(e.params) for e in (first, second))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ids = [[5, 6, 7, 8]]
    assert (
        second.generate(ids, mode="w4a16", max_new_tokens=6).tokens
        == first.generate(ids, mode="w4a16", max_new_tokens=6).tokens
    )


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_bfloat16_keeps_the_q8_0_head(tmp_path, tiny_gguf, tie):
    """The file's Q8_0 head survives a bfloat16 load and a checkpoint round trip.

    The loader finds the int8 codes on the file's float32 values before casting (a bfloat16
    head is off the grid), so both dtypes hold the same codes; in float32 they are the float
    head exactly, in bfloat16 the float head is their bfloat16 rounding.
    """
    import jax.numpy as jnp

    from qspec_jax.checkpoint import load_quantized, save_quantized
    from qspec_jax.model.params import float_head

    path = tiny_gguf.write(tmp_path / "t.gguf", tiny_gguf.weights(seed=3, tie=tie))
    _, pf, _ = load_gguf(path)
    cfg, pb, quant = load_gguf(path, dtype="bfloat16", keep_int4=True)
    assert cfg.tie_embeddings == tie and pf.head_q8 is not None and pb.head_q8 is not None
    for name in ("codes", "scales"):
        np.testing.assert_array_equal(
            np.asarray(getattr(pb.head_q8, name)), np.asarray(getattr(pf.head_q8, name))
        )
    np.testing.assert_array_equal(np.asarray(pf.head_q8.dequantize()), np.asarray(float_head(pf).T))
    head16 = np.asarray(float_head(pb).T)  # [V, D] bfloat16
    np.testing.assert_array_equal(np.asarray(pb.head_q8.dequantize(jnp.bfloat16)), head16)
    # saved, not recomputed (a bfloat16 head could not give it back)
    ck = save_quantized(tmp_path / "ck", cfg, pb, quant, None)
    _, back, _, _ = load_quantized(ck)
    assert back.head_q8 is not None
    for name in ("codes", "scales"):
        got, want = getattr(back.head_q8, name), getattr(pb.head_q8, name)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_checkpoint_without_head_q8_still_loads(tmp_path, tiny_file):
    """A checkpoint written before `Params.head_q8` was saved (no such field) loads, head None."""
    import json

    from qspec_jax.checkpoint import META_FILE, load_quantized, save_quantized

    path, _ = tiny_file
    cfg, p, quant = load_gguf(path, keep_int4=True)
    ck = save_quantized(tmp_path / "ck", cfg, p.replace(head_q8=None), quant, None)
    meta_path = os.path.join(ck, META_FILE)
    with open(meta_path) as f:
        meta = json.load(f)
    assert meta["tree"]["fields"].pop("head_q8") is None  # the older writer's tree
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    _, back, _, _ = load_quantized(ck)
    assert back.head_q8 is None
