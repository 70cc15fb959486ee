"""Loads a Hugging Face model directory (Llama, Mistral, Qwen2) into float `Params`.

Only ``config.json`` and safetensors weights are read (single ``*.safetensors`` files or shards
listed in ``model.safetensors.index.json``), through the safetensors numpy API; pickled
``pytorch_model.bin`` files are refused and no remote code is ever run. Hugging Face linears
are ``[out, in]``; `Params` stores ``[in, out]`` (``x @ w``), so every linear is transposed, and
q/k/v and gate/up are fused in that column order. Hugging Face checkpoints already use the
rotate-half RoPE convention of the model code, so no row permutation is needed.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from qspec_jax.config import LlamaConfig, QuantConfig, RopeScaling
from qspec_jax.loading.errors import load_error
from qspec_jax.loading.gguf_loader import _float_dtype
from qspec_jax.model.params import LayerParams, Params

__all__ = ["config_from_hf", "load_hf_dir"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise load_error(
            path,
            f"cannot be read as JSON ({type(e).__name__}: {e})",
            "restore or re-download the file",
        ) from e
    if not isinstance(data, dict):
        raise load_error(path, "does not hold a JSON object", "restore or re-download the file")
    return data


def _rope(cfg_path: str, hf: dict) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from either transformers-5 ``rope_parameters`` or v4 keys."""
    params = hf.get("rope_parameters")
    if (
        isinstance(params, dict)
        and "full_attention" in params
        and isinstance(params["full_attention"], dict)
    ):
        params = params["full_attention"]
    if not isinstance(params, dict):
        params = dict(hf.get("rope_scaling") or {})
        if "rope_theta" in hf:
            params.setdefault("rope_theta", hf["rope_theta"])
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "llama3":
        try:
            return theta, RopeScaling(
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise load_error(
                cfg_path, f"has a llama3 rope scaling without {e.args[0]!r}", "fix config.json"
            ) from None
    raise load_error(
        cfg_path,
        f"uses RoPE type {rope_type!r}, which is not supported (only default and 'llama3' are)",
        "use a model with default or Llama-3 RoPE",
    )


def _token_ids(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return [int(v)]


def config_from_hf(path: str | os.PathLike, dtype: str = "float32") -> LlamaConfig:
    """Builds a `LlamaConfig` from a Hugging Face directory's config.json (and generation_config.json)."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise load_error(
            path, "is not a directory", "pass a Hugging Face model directory holding config.json"
        )
    if not os.path.isfile(cfg_path):
        raise load_error(
            cfg_path, "does not exist", "pass a Hugging Face model directory holding config.json"
        )
    hf = _read_json(cfg_path)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise load_error(
            cfg_path,
            f"has model_type {model_type!r}, but only {', '.join(SUPPORTED_MODEL_TYPES)} are supported",
            "load a Llama-family model",
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise load_error(
            cfg_path,
            f"uses activation {act!r}, but the model code implements SwiGLU with silu",
            "load a standard Llama-family model",
        )
    if hf.get("mlp_bias"):
        raise load_error(
            cfg_path,
            "has MLP biases (mlp_bias=true), which are not supported",
            "load a model without MLP biases",
        )
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise load_error(
            cfg_path,
            "has attention biases including o_proj (attention_bias=true), which are not supported",
            "load a model without them",
        )
    if hf.get("quantization_config"):
        raise load_error(
            cfg_path,
            "describes a pre-quantized checkpoint, which this float loader cannot read",
            "load the float checkpoint and quantize it with qspec_jax.quant",
        )

    try:
        d = int(hf["hidden_size"])
        f = int(hf["intermediate_size"])
        n_layers = int(hf["num_hidden_layers"])
        n_heads = int(hf["num_attention_heads"])
        vocab = int(hf["vocab_size"])
    except KeyError as e:
        raise load_error(
            cfg_path, f"lacks the key {e.args[0]!r}", "restore the model's original config.json"
        ) from None
    n_kv = int(hf.get("num_key_value_heads") or n_heads)
    head_dim = int(hf.get("head_dim") or d // n_heads)
    if n_heads % n_kv:
        raise load_error(
            cfg_path, f"has {n_heads} heads, not a multiple of {n_kv} KV heads", "fix config.json"
        )
    theta, scaling = _rope(cfg_path, hf)

    max_pos = int(hf.get("max_position_embeddings", 4096))
    # Sliding-window attention equals full attention up to the window, so cap the context there.
    window = hf.get("sliding_window")
    if window and (model_type == "mistral" or hf.get("use_sliding_window")):
        max_pos = min(max_pos, int(window))

    eos = _token_ids(hf.get("eos_token_id"))
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        for t in _token_ids(_read_json(gen_path).get("eos_token_id")):
            if t not in eos:
                eos.append(t)
    bos = hf.get("bos_token_id")
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    pad = hf.get("pad_token_id")
    if isinstance(pad, list):
        pad = pad[0] if pad else None
    if pad is None:
        pad = eos[0] if eos else 0

    return LlamaConfig(
        name=os.path.basename(os.path.normpath(path)),
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=f,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        max_position_embeddings=max_pos,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos),
        pad_token_id=int(pad),
        dtype=str(_float_dtype(dtype)),
    )


class _SafetensorsDir:
    """Tensor name -> file lookup over a directory's safetensors files."""

    def __init__(self, path: str):
        self.path = path
        self._handles: dict[str, Any] = {}
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise load_error(
                    index, "has no 'weight_map' object", "restore or re-download the index file"
                )
            self.where = {k: os.path.join(path, v) for k, v in weight_map.items()}
            for file in sorted(set(self.where.values())):
                if not os.path.isfile(file):
                    raise load_error(
                        file,
                        "is listed in model.safetensors.index.json but does not exist",
                        "download the missing shard",
                    )
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                pickles = [
                    os.path.basename(p)
                    for pat in ("*.bin", "*.pt", "*.pth", "*.ckpt")
                    for p in glob.glob(os.path.join(path, pat))
                ]
                if pickles:
                    raise load_error(
                        os.path.join(path, pickles[0]),
                        "is a pickled PyTorch checkpoint and the directory has no .safetensors weights, but safetensors are required (pickles can run arbitrary code)",
                        "convert it once with `transformers` (model.save_pretrained(dir, safe_serialization=True)) in a trusted environment",
                    )
                raise load_error(
                    path,
                    "holds no .safetensors weight files",
                    "download the model's safetensors weights",
                )
            self.where = {}
            for file in files:
                for name in self._keys(file):
                    self.where[name] = file

    def _open(self, file: str, framework: str = "np"):
        from safetensors import safe_open

        key = f"{framework}:{file}"
        if key not in self._handles:
            try:
                self._handles[key] = safe_open(file, framework=framework)
            except Exception as e:
                raise load_error(
                    file,
                    f"is not a readable safetensors file, it is truncated or corrupt ({e})",
                    "re-download the file",
                ) from e
        return self._handles[key]

    def _keys(self, file: str) -> list[str]:
        return list(self._open(file).keys())

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor as float32 numpy in its Hugging Face layout, shape-checked."""
        file = self.where.get(name)
        if file is None:
            raise load_error(
                self.path,
                f"has no tensor {name!r} in its safetensors files",
                "the checkpoint is incomplete or not a Llama-family model",
            )
        h = self._open(file)
        if name not in h.keys():
            raise load_error(
                file,
                f"does not hold the tensor {name!r} that the index points to",
                "re-download the shard",
            )
        try:
            sl = h.get_slice(name)
            got = tuple(int(s) for s in sl.get_shape())
            dtype = sl.get_dtype()
        except Exception as e:
            raise load_error(
                file, f"has an unreadable header entry for {name!r} ({e})", "re-download the file"
            ) from e
        if got != tuple(shape):
            raise load_error(
                file,
                f"tensor {name!r} has shape {list(got)} but config.json implies {list(shape)}",
                "check that config.json belongs to these weights",
            )
        try:
            if dtype == "BF16":  # numpy has no bfloat16; the flax reader returns an ml_dtypes array
                arr = np.asarray(self._open(file, "flax").get_tensor(name))
            else:
                arr = h.get_tensor(name)
        except Exception as e:
            raise load_error(
                file,
                f"cannot read tensor {name!r} ({type(e).__name__}: {e})",
                "re-download the file",
            ) from e
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
            raise load_error(
                file, f"tensor {name!r} has non-float dtype {arr.dtype}", "load a float checkpoint"
            )
        return np.asarray(arr, dtype=np.float32)


def _name_resolver(st: _SafetensorsDir):
    """Checkpoints saved from LlamaForCausalLM use 'model.' prefixes; a bare LlamaModel has none."""
    prefix = (
        "model." if st.has("model.embed_tokens.weight") or not st.has("embed_tokens.weight") else ""
    )
    return lambda name: name if name == "lm_head.weight" else prefix + name


def load_hf_dir(
    path: str | os.PathLike, dtype: str = "float32"
) -> tuple[LlamaConfig, Params, QuantConfig]:
    """Loads a Hugging Face Llama / Mistral / Qwen2 directory as float `Params`.

    Args:
        path: directory with config.json and safetensors weights.
        dtype: float dtype of the returned arrays (also ``cfg.dtype``).

    Returns:
        ``(cfg, params, QuantConfig(method="none"))``.

    Raises:
        LoadError: missing or unreadable config.json, unsupported model type, only pickled
            weights, missing or corrupt safetensors files, missing tensors, or a tensor whose
            shape disagrees with config.json.
    """
    path = os.fspath(path)
    np_dtype = _float_dtype(dtype)
    cfg = config_from_hf(path, dtype)
    st = _SafetensorsDir(path)
    nm = _name_resolver(st)

    n_layers, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    q, kv, v = cfg.q_size, cfg.kv_size, cfg.vocab_size
    attn_norm = np.empty((n_layers, d), np_dtype)
    mlp_norm = np.empty((n_layers, d), np_dtype)
    wqkv = np.empty((n_layers, d, q + 2 * kv), np_dtype)
    bqkv = np.empty((n_layers, q + 2 * kv), np_dtype) if cfg.qkv_bias else None
    wo = np.empty((n_layers, q, d), np_dtype)
    w_gate_up = np.empty((n_layers, d, 2 * f), np_dtype)
    w_down = np.empty((n_layers, f, d), np_dtype)
    for i in range(n_layers):
        b = f"layers.{i}."
        attn_norm[i] = st.get(nm(b + "input_layernorm.weight"), (d,))
        mlp_norm[i] = st.get(nm(b + "post_attention_layernorm.weight"), (d,))
        wqkv[i, :, :q] = st.get(nm(b + "self_attn.q_proj.weight"), (q, d)).T
        wqkv[i, :, q : q + kv] = st.get(nm(b + "self_attn.k_proj.weight"), (kv, d)).T
        wqkv[i, :, q + kv :] = st.get(nm(b + "self_attn.v_proj.weight"), (kv, d)).T
        if bqkv is not None:
            bqkv[i, :q] = st.get(nm(b + "self_attn.q_proj.bias"), (q,))
            bqkv[i, q : q + kv] = st.get(nm(b + "self_attn.k_proj.bias"), (kv,))
            bqkv[i, q + kv :] = st.get(nm(b + "self_attn.v_proj.bias"), (kv,))
        wo[i] = st.get(nm(b + "self_attn.o_proj.weight"), (d, q)).T
        w_gate_up[i, :, :f] = st.get(nm(b + "mlp.gate_proj.weight"), (f, d)).T
        w_gate_up[i, :, f:] = st.get(nm(b + "mlp.up_proj.weight"), (f, d)).T
        w_down[i] = st.get(nm(b + "mlp.down_proj.weight"), (d, f)).T

    embed = st.get(nm("embed_tokens.weight"), (v, d)).astype(np_dtype)
    final_norm = st.get(nm("norm.weight"), (d,)).astype(np_dtype)
    lm_head = None
    if not cfg.tie_embeddings:
        lm_head = st.get("lm_head.weight", (v, d)).T.astype(np_dtype)

    def arr(x):
        return jnp.asarray(x, dtype=np_dtype)

    params = Params(
        embed=arr(embed),
        layers=LayerParams(
            attn_norm=arr(attn_norm),
            wqkv=arr(wqkv),
            bqkv=None if bqkv is None else arr(bqkv),
            wo=arr(wo),
            mlp_norm=arr(mlp_norm),
            w_gate_up=arr(w_gate_up),
            w_down=arr(w_down),
        ),
        final_norm=arr(final_norm),
        lm_head=None if lm_head is None else arr(lm_head),
    )
    return cfg, params, QuantConfig(method="none")
