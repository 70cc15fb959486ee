"""Quantize once: `load(..., quant=...)` reuses the checkpoint its first quantization wrote.

All on the tiny preset (random weights, quantized in a fraction of a second) with the cache root
in a temporary directory; one real-model test checks the SmolLM2 entry the suite's own fixture
leaves in the cache.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import qspec_jax
from qspec_jax import disk_cache
from qspec_jax.checkpoint import META_FILE

IDS = [[5, 6, 7, 8], [9, 10]]


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv(disk_cache.ENV_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(disk_cache.ENV_QUANT, raising=False)
    return tmp_path / "cache"


def _load(**kw):
    kw = dict(quant="rtn", group_size=32, progress=False, clip_search=False) | kw
    return qspec_jax.load("tiny", **kw)


def _leaves(engine):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(engine.params)]


def _same_params(a, b):
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb)
    )


def test_second_load_reuses_the_checkpoint(root):
    first = _load()
    assert first.load_info["quant_cache"] == "written"
    path = first.load_info["quant_cache_path"]
    assert path.startswith(str(root / "quantized")) and os.path.isfile(
        os.path.join(path, META_FILE)
    )
    second = _load()
    assert second.load_info == dict(second.load_info, quant_cache="hit", quant_cache_path=path)
    assert "quantize_s" not in second.load_info
    assert _same_params(first, second) and second.qconfig == first.qconfig
    assert (
        second.generate(IDS, mode="qspec", max_new_tokens=12).tokens
        == first.generate(IDS, mode="w4a16", max_new_tokens=12).tokens
    )


@pytest.mark.parametrize(
    "change",
    [
        dict(group_size=64),
        dict(quant="quarot-rtn"),
        dict(seed=1),
        dict(clip_search=True),
        dict(symmetric=False),
        dict(act_group_size=0),
        dict(calib_tokens=np.arange(64, dtype=np.int32).reshape(2, 32)),
    ],
)
def test_any_setting_change_is_a_different_entry(root, change):
    base = _load()
    other = _load(**change)
    assert other.load_info["quant_cache"] == "written"
    assert other.load_info["quant_cache_path"] != base.load_info["quant_cache_path"]


def test_corrupt_checkpoint_is_requantized_not_used(root):
    first = _load()
    path = first.load_info["quant_cache_path"]
    files = []
    for r, _, fs in os.walk(os.path.join(path, "arrays")):
        files += [os.path.join(r, f) for f in fs if os.sep + "d" + os.sep in r + os.sep]
    big = max(files, key=os.path.getsize)
    with open(big, "r+b") as fh:  # flip bytes in the middle of the largest array file
        data = bytearray(fh.read())
        for i in range(len(data) // 2, len(data) // 2 + 8):
            data[i] ^= 0x5A
        fh.seek(0)
        fh.write(data)
    with pytest.warns(UserWarning, match="quantizing again"):
        again = _load()
    assert again.load_info["quant_cache"] == "invalid"
    assert "sha256" in again.load_info["quant_cache_error"]
    assert _same_params(first, again)
    healed = _load()  # the corrupt entry was replaced by a fresh one
    assert healed.load_info["quant_cache"] == "hit" and _same_params(first, healed)


def test_entry_recording_other_settings_is_not_used(root):
    first = _load()
    path = first.load_info["quant_cache_path"]
    meta_file = os.path.join(path, META_FILE)
    with open(meta_file) as f:
        meta = json.load(f)
    meta["extra"]["quant_cache"]["settings"]["group_size"] = 31  # arrays intact, record not
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    with pytest.warns(UserWarning, match="other quantization settings"):
        again = _load()
    assert again.load_info["quant_cache"] == "invalid" and _same_params(first, again)


def test_switched_off_writes_nothing(root, monkeypatch):
    eng = _load(quant_cache=False)
    assert eng.load_info["quant_cache"] == "off"
    monkeypatch.setenv(disk_cache.ENV_QUANT, "0")
    assert _load().load_info["quant_cache"] == "off"
    assert not (root / "quantized").exists()


def test_model_file_identity_follows_size_and_mtime(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x" * 100)
    a = disk_cache.model_identity(str(f))
    os.utime(f, ns=(1, 1_000_000_000))
    b = disk_cache.model_identity(str(f))
    f.write_bytes(b"x" * 101)
    os.utime(f, ns=(1, 1_000_000_000))
    c = disk_cache.model_identity(str(f))
    assert len({disk_cache.canonical(x) for x in (a, b, c)}) == 3
    assert disk_cache.model_identity(str(tmp_path / "missing.gguf")) is None
    settings = dict(method="rtn", group_size=32)
    assert disk_cache.quant_cache_key(a, settings)[0] != disk_cache.quant_cache_key(b, settings)[0]


def test_cache_root_lives_in_the_user_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv(disk_cache.ENV_DIR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert disk_cache.cache_root() == str(tmp_path / "xdg" / "qspec-jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert disk_cache.cache_root() == os.path.join(os.path.expanduser("~"), ".cache", "qspec-jax")


def _tiny_tokenizer(source):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    _tiny_tokenizer.calls += 1
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")


def test_tokenizer_converted_once_and_corrupt_entry_rebuilt(root, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights")
    _tiny_tokenizer.calls = 0
    first = disk_cache.load_cached_tokenizer(str(model), _tiny_tokenizer)
    second = disk_cache.load_cached_tokenizer(str(model), _tiny_tokenizer)
    assert _tiny_tokenizer.calls == 1
    assert second("a b c")["input_ids"] == first("a b c")["input_ids"] == [1, 2, 0]
    (entry,) = (root / "tokenizers").iterdir()
    tj = entry / "tokenizer.json"
    tj.write_text(tj.read_text().replace('"b": 2', '"b": 1'))  # a silently wrong vocabulary
    third = disk_cache.load_cached_tokenizer(str(model), _tiny_tokenizer)
    assert _tiny_tokenizer.calls == 2 and third("a b c")["input_ids"] == [1, 2, 0]
    fourth = disk_cache.load_cached_tokenizer(str(model), _tiny_tokenizer)
    assert _tiny_tokenizer.calls == 2 and fourth("a b")["input_ids"] == [1, 2]


@pytest.mark.real
def test_real_tokenizer_from_the_cache_encodes_like_the_gguf_one(root):
    """The converted GGUF tokenizer, saved and read back, gives the same ids (chat template on
    and off, special tokens, non-ASCII text) and the same decoded text."""
    from qspec_jax.loading.tokenizer import encode_prompts, load_tokenizer

    direct = disk_cache.load_cached_tokenizer("smollm2-135m", load_tokenizer)  # converts, saves
    cached = disk_cache.load_cached_tokenizer("smollm2-135m", lambda s: pytest.fail("converted"))
    prompts = ["What is 17 * 23?", "Ünïcödé, emoji \U0001f680 and   spaces\n", "<|im_start|> x"]
    for chat in (True, False):
        assert encode_prompts(cached, prompts, chat=chat) == encode_prompts(
            direct, prompts, chat=chat
        )
    ids = list(range(0, 49152, 97))
    assert cached.decode(ids) == direct.decode(ids)
    assert (cached.eos_token_id, cached.bos_token_id, len(cached)) == (
        direct.eos_token_id,
        direct.bos_token_id,
        len(direct),
    )


@pytest.mark.real
def test_real_model_second_load_comes_from_the_cache(smollm2_int4):
    """The suite's quarot-rtn SmolLM2 fixture wrote (or hit) the cache; loading again hits it."""
    if smollm2_int4.load_info["quant_cache"] == "off":
        pytest.skip("the quantized-weights cache is switched off in this environment")
    again = qspec_jax.load("smollm2-135m", quant="quarot-rtn", group_size=64, progress=False)
    assert again.load_info["quant_cache"] == "hit"
    assert again.load_info["quant_cache_path"] == smollm2_int4.load_info["quant_cache_path"]
    assert _same_params(again, smollm2_int4)
