"""Checkpoint loading: GGUF files, Hugging Face directories, tokenizers.

`load_checkpoint` is the entry point: it accepts "smollm2-135m" (the embedded
SmolLM2-135M-Instruct Q4_1 GGUF), a path to a .gguf file, or a Hugging Face model directory, and
returns ``(LlamaConfig, Params, QuantConfig)``. Every failure is a `LoadError` (a ValueError)
whose message names the file, what is wrong and what to do.
"""

from __future__ import annotations

import os

from qspec_jax.config import LlamaConfig, QuantConfig
from qspec_jax.loading.embedded import EMBEDDED_NAME, INSTALL_COMMAND, embedded_gguf_path
from qspec_jax.loading.errors import LoadError
from qspec_jax.loading.gguf_loader import load_gguf, qk_unpermute_index, read_gguf_config
from qspec_jax.loading.hf_loader import config_from_hf, load_hf_dir
from qspec_jax.loading.tokenizer import decode, encode_prompts, load_tokenizer
from qspec_jax.model.params import Params

__all__ = [
    "EMBEDDED_NAME",
    "INSTALL_COMMAND",
    "LoadError",
    "config_from_hf",
    "decode",
    "embedded_gguf_path",
    "encode_prompts",
    "load_checkpoint",
    "load_gguf",
    "load_hf_dir",
    "load_tokenizer",
    "qk_unpermute_index",
    "read_gguf_config",
]


def load_checkpoint(
    source: str | os.PathLike, dtype: str = "float32", keep_int4: bool = False
) -> tuple[LlamaConfig, Params, QuantConfig]:
    """Loads a model checkpoint.

    Args:
        source: "smollm2-135m" (the embedded GGUF; the config is then named "smollm2-135m" and
            equals ``PRESETS["smollm2-135m"]`` up to dtype), a .gguf file, or a Hugging Face
            model directory (config.json + safetensors).
        dtype: float dtype of the float arrays.
        keep_int4: GGUF only: keep Q4_1 linears as exact group-32 asymmetric int4.

    Raises:
        LoadError: unknown source, or any problem the loaders report.
    """
    src = os.fspath(source)
    if src == EMBEDDED_NAME:
        cfg, params, quant = load_gguf(embedded_gguf_path(), dtype=dtype, keep_int4=keep_int4)
        return cfg.replace(name=EMBEDDED_NAME), params, quant
    if src.lower().endswith(".gguf"):
        return load_gguf(src, dtype=dtype, keep_int4=keep_int4)
    if os.path.isdir(src):
        if keep_int4:
            raise LoadError(
                f"{src}: a Hugging Face directory holds float weights, so there are no int4 codes to keep; "
                "load it with keep_int4=False and quantize it with qspec_jax.quant."
            )
        return load_hf_dir(src, dtype=dtype)
    if os.path.exists(src):
        raise LoadError(
            f"{src}: is neither a .gguf file nor a Hugging Face model directory; "
            f"pass '{EMBEDDED_NAME}', a .gguf path or a directory with config.json."
        )
    raise LoadError(
        f"{src}: no such file or directory, and not a known model name; "
        f"pass '{EMBEDDED_NAME}', a .gguf path or a Hugging Face model directory."
    )
