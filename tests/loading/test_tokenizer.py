"""Tokenizer loading and prompt encoding."""

from __future__ import annotations

import json

import pytest

from qspec_jax.loading import LoadError, decode, encode_prompts, load_tokenizer
from qspec_jax.loading import tokenizer as tokenizer_mod

PROMPTS = ["hi", "What is 12 * 7? Answer briefly.", "Écris une phrase en français."]


@pytest.mark.real
def test_chat_encoding_matches_transformers(smollm_tokenizer):
    tok = smollm_tokenizer
    got = encode_prompts(tok, PROMPTS, chat=True)
    for prompt, ids in zip(PROMPTS, got):
        want = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert ids == list(want)
        text = decode(tok, ids, skip_special_tokens=False)
        assert text.startswith("<|im_start|>system\n")
        assert text.endswith(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    assert got[0][0] == 1  # <|im_start|> (also the BOS id of this model)


@pytest.mark.real
def test_plain_encoding_and_decode(smollm_tokenizer):
    tok = smollm_tokenizer
    ids = encode_prompts(tok, ["Hello world, 123!"], chat=False)[0]
    assert ids == tok("Hello world, 123!")["input_ids"]
    assert 1 not in ids  # this GGUF does not add a BOS token
    assert decode(tok, ids) == "Hello world, 123!"
    with pytest.raises(TypeError):
        encode_prompts(tok, "a single string", chat=False)


@pytest.mark.real
def test_hf_directory_tokenizer(smollm_tokenizer, tmp_path):
    smollm_tokenizer.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert encode_prompts(tok, PROMPTS, chat=True) == encode_prompts(
        smollm_tokenizer, PROMPTS, chat=True
    )


def test_source_dispatch(monkeypatch, tmp_path, gguf_path):
    """The embedded name and .gguf paths load from the file's directory with gguf_file=."""
    import os

    from transformers import AutoTokenizer

    calls = []
    monkeypatch.setattr(
        AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append((a, k)) or "tok"
    )
    assert load_tokenizer("smollm2-135m") == "tok"
    (a, k) = calls[-1]
    assert a == (os.path.dirname(gguf_path),)
    assert k == dict(gguf_file=os.path.basename(gguf_path), local_files_only=True)
    assert load_tokenizer(tmp_path) == "tok"
    assert calls[-1] == ((str(tmp_path),), dict(local_files_only=True))


def test_errors(tmp_path):
    with pytest.raises(LoadError, match=r"missing\.gguf: no such GGUF file"):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(LoadError, match=r"nothing-here: is neither"):
        load_tokenizer(tmp_path / "nothing-here")
    d = tmp_path / "no-tokenizer"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LoadError, match=r"no-tokenizer: has no tokenizer"):
        load_tokenizer(d)


def test_chat_needs_template():
    class NoTemplate:
        chat_template = None
        name_or_path = "plain-tok"

    with pytest.raises(LoadError, match="plain-tok: the tokenizer has no chat template"):
        encode_prompts(NoTemplate(), ["x"], chat=True)
    assert tokenizer_mod.__all__ == ["decode", "encode_prompts", "load_tokenizer"]
