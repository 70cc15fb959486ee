"""Quantized orbax checkpoints: bit-identical round trip, validation errors, atomic saves."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import qspec_jax
import qspec_jax.checkpoint as ckpt
from qspec_jax.checkpoint import META_FILE, load_quantized, save_quantized
from qspec_jax.loading.errors import LoadError
from qspec_jax.quant import quantize_model

IDS = np.arange(3, 3 + 2 * 12, dtype=np.int32).reshape(2, 12) % 250


@pytest.fixture(scope="module")
def tiny_q(tiny_cfg, tiny_params):
    return quantize_model(tiny_params, tiny_cfg, "rtn", 32, progress=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_cfg, tiny_q):
    """One pristine checkpoint; tests that damage a checkpoint copy it first."""
    params, qcfg = tiny_q
    path = str(tmp_path_factory.mktemp("ck") / "tiny-rtn")
    save_quantized(path, tiny_cfg, params, qcfg, "smollm2-135m",
                   {"method": "rtn", "group_size": 32, "clip_search": False})
    return path


def _copy(saved, tmp_path) -> str:
    import shutil

    dst = str(tmp_path / "copy")
    shutil.copytree(saved, dst)
    return dst


def _edit_meta(path, fn):
    f = os.path.join(path, META_FILE)
    with open(f) as fh:
        meta = json.load(fh)
    fn(meta)
    with open(f, "w") as fh:
        json.dump(meta, fh)


def _data_files(path):
    out = []
    for root, _, files in os.walk(os.path.join(path, "arrays")):
        out += [os.path.join(root, f) for f in files if os.sep + "d" + os.sep in root + os.sep]
    return sorted(out, key=os.path.getsize)


# ----------------------------------------------------------------------------- round trip
def test_round_trip_bit_identical_logits(saved, tiny_cfg, tiny_q):
    params, qcfg = tiny_q
    cfg2, params2, qcfg2, tok = load_quantized(saved)
    assert cfg2 == tiny_cfg and qcfg2 == qcfg and tok == "smollm2-135m"
    assert jax.tree_util.tree_structure(params2) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(params2), jax.tree_util.tree_leaves(params)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert params2.lm_head is not None and params2.layers.bqkv is None
    assert params2.layers.wqkv.mins is None
    before = qspec_jax.Engine(tiny_cfg, params, qcfg)
    after = qspec_jax.Engine(cfg2, params2, qcfg2)
    for prec in ("w4a16", "w4a4"):
        assert np.array_equal(after.logits(IDS, prec), before.logits(IDS, prec)), prec


def test_metadata_contents(saved, tiny_cfg):
    with open(os.path.join(saved, META_FILE)) as fh:
        meta = json.load(fh)
    assert meta["format_version"] == 1
    assert meta["llama_config"]["hidden_size"] == tiny_cfg.hidden_size
    assert meta["quant_config"]["method"] == "rtn"
    assert meta["extra"] == {"method": "rtn", "group_size": 32, "clip_search": False}
    assert meta["tree"]["fields"]["layers"]["fields"]["bqkv"] is None
    assert meta["arrays"]["layers.wqkv.packed"]["dtype"] == "uint8"
    assert meta["arrays"]["layers.wqkv.packed"]["shape"] == [2, 64, 256]
    # nothing but JSON and orbax's own files: no pickles
    for root, _, files in os.walk(saved):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert not fh.read(2).startswith(b"\x80"), f  # pickle protocol 2+ magic


def test_float_model_and_asymmetric_round_trip(tmp_path, tiny_cfg, tiny_params):
    """Float params (qcfg 'none', untied head) and asymmetric int4 with mins, rope scaling, bias."""
    from qspec_jax.config import RopeScaling
    from qspec_jax.model.params import init_params

    cfg = tiny_cfg.replace(rope_scaling=RopeScaling(factor=4.0), qkv_bias=True, tie_embeddings=True,
                           eos_token_ids=(2, 5))
    p = init_params(cfg, jax.random.PRNGKey(1))
    qp, qcfg = quantize_model(p, cfg, "rtn", 64, symmetric=False, progress=False)
    for name, params, q in (("float", tiny_params, qspec_jax.QuantConfig()), ("asym", qp, qcfg)):
        c = tiny_cfg if name == "float" else cfg
        save_quantized(tmp_path / name, c, params, q, None)
        c2, p2, q2, tok = load_quantized(tmp_path / name)
        assert (c2, q2, tok) == (c, q, None)
        assert jax.tree_util.tree_structure(p2) == jax.tree_util.tree_structure(params)
        for a, b in zip(jax.tree_util.tree_leaves(p2), jax.tree_util.tree_leaves(params)):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    assert c2.rope_scaling == RopeScaling(factor=4.0) and c2.eos_token_ids == (2, 5)
    assert p2.layers.wqkv.mins is not None and p2.layers.bqkv is not None


def test_engine_params_unstacked_layout_saved_stacked(tmp_path, tiny_cfg, tiny_q):
    """Engine keeps per-layer arrays on CPU (`unstack_layers`); saving stores the stacked layout."""
    from qspec_jax.model.params import unstack_layers

    params, qcfg = tiny_q
    unstacked = unstack_layers(params)
    assert isinstance(unstacked.layers, tuple)
    save_quantized(tmp_path / "u", tiny_cfg, unstacked, qcfg, None)
    _, p2, _, _ = load_quantized(tmp_path / "u")
    assert not isinstance(p2.layers, tuple)
    for a, b in zip(jax.tree_util.tree_leaves(p2), jax.tree_util.tree_leaves(params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_load_through_qspec_jax_load(saved, tiny_q, monkeypatch):
    import qspec_jax.engine as engine

    seen = []
    monkeypatch.setattr(engine, "_maybe_tokenizer", lambda src: seen.append(src) or None)
    eng = qspec_jax.load(saved)
    assert seen == ["smollm2-135m"]
    assert eng.qconfig == tiny_q[1] and eng.modes == ("w4a16", "w4a4", "w4a8", "qspec", "quantspec", "hspec")
    ref = qspec_jax.Engine(eng.config, tiny_q[0], tiny_q[1])
    assert np.array_equal(eng.logits(IDS, "w4a16"), ref.logits(IDS, "w4a16"))
    with pytest.raises(qspec_jax.UsageError, match="already quantized"):
        qspec_jax.load(saved, quant="rtn")


# ----------------------------------------------------------------------------- validation
def test_wrong_format_version(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _edit_meta(path, lambda m: m.update(format_version=2))
    with pytest.raises(LoadError) as e:
        load_quantized(path)
    msg = str(e.value)
    assert META_FILE in msg and "format_version is 2" in msg and "format_version 1" in msg
    assert msg.count("\n") == 0


def test_tampered_config_shape_mismatch(saved, tmp_path):
    path = _copy(saved, tmp_path)
    _edit_meta(path, lambda m: m["llama_config"].update(hidden_size=192))
    with pytest.raises(LoadError, match=r"array embed has shape \[256, 128\] but the config implies \[256, 192\]"):
        load_quantized(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        # an unknown key (sliding_window became a real LlamaConfig field in 2026-12; any unknown one will do)
            (lambda m: m["llama_config"].update(attention_sink=4), "unknown LlamaConfig key 'attention_sink'"),
        (lambda m: m["llama_config"].pop("num_kv_heads"), "missing LlamaConfig key 'num_kv_heads'"),
        (lambda m: m["quant_config"].pop("symmetric"), "missing QuantConfig key 'symmetric'"),
        (lambda m: m["llama_config"].update(num_layers="2"), "config key 'num_layers' has the invalid value"),
        (lambda m: m["llama_config"].update(rope_scaling={"factor": 2.0}),
         "missing RopeScaling key 'rope_scaling.low_freq_factor'"),
        (lambda m: m["arrays"]["layers.wo.scales"].update(dtype="float16"), "layers.wo.scales is stored as"),
        (lambda m: m["arrays"]["layers.wo.packed"].update(shape=[2, 32, 128]),
         r"array layers.wo.packed has shape \[2, 32, 128\] but the config implies \[2, 64, 128\]"),
        (lambda m: m["tree"]["fields"]["layers"]["fields"]["wo"].update(type="os.system"),
         "has type 'os.system'"),
        (lambda m: m["quant_config"].update(symmetric=False), "mins is missing"),
    ],
)
def test_bad_metadata(saved, tmp_path, edit, match):
    path = _copy(saved, tmp_path)
    _edit_meta(path, edit)
    with pytest.raises(LoadError, match=match):
        load_quantized(path)


def test_truncated_array_file(saved, tmp_path):
    path = _copy(saved, tmp_path)
    big = _data_files(path)[-1]
    with open(big, "r+b") as fh:
        fh.truncate(os.path.getsize(big) // 2)
    with pytest.raises(LoadError, match="truncated or corrupted"):
        load_quantized(path)


@pytest.mark.parametrize("which, match", [("largest", "does not match its recorded sha256"),
                                           ("all", "corrupted")])
def test_corrupted_array_bytes(saved, tmp_path, which, match):
    """Flipped bytes in the array data (uncompressed: only the recorded sha256 sees them), or in
    every orbax data file (its metadata no longer decodes)."""
    path = _copy(saved, tmp_path)
    files = _data_files(path)
    for f in files[-1:] if which == "largest" else files:
        with open(f, "r+b") as fh:
            data = bytearray(fh.read())
            for i in range(len(data) // 2, len(data) // 2 + 8):
                data[i] ^= 0x5A
            fh.seek(0)
            fh.write(data)
    with pytest.raises(LoadError, match=match):
        load_quantized(path)


def test_missing_meta_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match=f"has no {META_FILE}"):
        load_quantized(tmp_path / "empty")


# ----------------------------------------------------------------------------- atomic save
def test_interrupted_save_leaves_nothing_loadable(tmp_path, tiny_cfg, tiny_q, monkeypatch):
    params, qcfg = tiny_q
    target = tmp_path / "ck"
    real_write_json = ckpt._write_json

    def crash(file, meta):  # the arrays are on disk by now
        assert os.path.isdir(os.path.join(os.path.dirname(file), "arrays"))
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(ckpt, "_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(target, tiny_cfg, params, qcfg, None)
    assert not target.exists() and os.listdir(tmp_path) == []  # temporary directory removed

    # a hard kill (no cleanup): the half-written temporary sibling is left but never loads
    monkeypatch.setattr(ckpt, "_cleanup", lambda p: None)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(target, tiny_cfg, params, qcfg, None)
    assert not target.exists()
    (left,) = os.listdir(tmp_path)
    assert left.startswith(".ck.tmp-")
    with pytest.raises(LoadError, match=f"has no {META_FILE}"):
        load_quantized(tmp_path / left)

    # a crash after the JSON too, before the rename: still nothing at the target
    monkeypatch.setattr(ckpt, "_write_json", real_write_json)
    monkeypatch.setattr(ckpt, "_commit", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_quantized(target, tiny_cfg, params, qcfg, None)
    assert not target.exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_rules(tmp_path, tiny_cfg, tiny_params, tiny_q, monkeypatch, exchange):
    params, qcfg = tiny_q
    if not exchange:
        monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    other = tmp_path / "not-a-checkpoint"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not a qspec checkpoint"):
        save_quantized(other, tiny_cfg, params, qcfg, None, overwrite=True)
    assert (other / "keep.txt").read_text() == "x"

    target = tmp_path / "ck"
    save_quantized(target, tiny_cfg, params, qcfg, None, {"n": 1})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_quantized(target, tiny_cfg, params, qcfg, None, {"n": 2})
    save_quantized(target, tiny_cfg, tiny_params, qspec_jax.QuantConfig(), None, {"n": 2},
                   overwrite=True)
    _, p2, q2, _ = load_quantized(target)
    assert q2.method == "none" and np.array_equal(np.asarray(p2.embed), np.asarray(tiny_params.embed))
    assert sorted(os.listdir(tmp_path)) == ["ck", "not-a-checkpoint"]  # no temporary leftovers


def test_save_rejects_inconsistent_config(tmp_path, tiny_cfg, tiny_q):
    params, qcfg = tiny_q
    with pytest.raises(LoadError, match="array embed has shape"):
        save_quantized(tmp_path / "x", tiny_cfg.replace(hidden_size=64), params, qcfg, None)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_quantized(tmp_path / "x", tiny_cfg, params, qcfg, None, {"f": object()})
    assert not (tmp_path / "x").exists()
