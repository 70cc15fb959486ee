"""Tokenizers (transformers, local files only) and prompt encoding."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from qspec_jax.loading.embedded import EMBEDDED_NAME, embedded_gguf_path
from qspec_jax.loading.errors import LoadError, load_error

__all__ = ["decode", "encode_prompts", "load_tokenizer"]


def load_tokenizer(source: str | os.PathLike) -> Any:
    """A transformers tokenizer for a checkpoint, read from local files only.

    Args:
        source: "smollm2-135m" (the embedded GGUF), a .gguf file (the tokenizer and chat template
            stored in its metadata) or a Hugging Face model directory.

    Raises:
        LoadError: the source does not exist or holds no usable tokenizer.
    """
    from transformers import AutoTokenizer

    src = os.fspath(source)
    if src == EMBEDDED_NAME:
        src = embedded_gguf_path()
    if src.lower().endswith(".gguf"):
        if not os.path.isfile(src):
            raise load_error(src, "no such GGUF file", "check the path")
        kwargs = dict(gguf_file=os.path.basename(src))
        directory = os.path.dirname(os.path.abspath(src))
    elif os.path.isdir(src):
        kwargs = {}
        directory = src
    else:
        raise load_error(
            src,
            "is neither a .gguf file nor a model directory",
            "pass 'smollm2-135m', a .gguf path or a Hugging Face directory",
        )
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
    except Exception as e:
        raise load_error(
            src,
            f"has no tokenizer transformers can load ({type(e).__name__}: {e})",
            "add the tokenizer files to the checkpoint",
        ) from e


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt.

    With `chat`, each prompt becomes one user message rendered with the tokenizer's chat template
    (``add_generation_prompt=True``) and tokenized without adding special tokens again (the
    template writes them). Without `chat`, the prompt is tokenized as plain text with the
    tokenizer's usual special tokens (e.g. BOS when the model adds one).
    """
    if isinstance(prompts, str):
        raise TypeError("encode_prompts takes a sequence of prompts, not a single string")
    out: list[list[int]] = []
    for prompt in prompts:
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise LoadError(
                    f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: the tokenizer has no chat template; encode with chat=False."
                )
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        out.append([int(i) for i in ids])
    return out


def decode(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of a token id sequence (special tokens dropped by default)."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
