"""Loads a Hugging Face model directory (Llama, Mistral, Qwen2) into float `Params`.

Only ``config.json`` and safetensors weights are read (single ``*.safetensors`` files or shards
listed in ``model.safetensors.index.json``); pickled ``pytorch_model.bin`` files are refused and
no remote code is ever run. Files are checked with ``safetensors.safe_open`` and each tensor is
read through its own memory map of just its bytes (unmapped once converted), so reading a layer
costs that layer's memory, never the file's: `HFCheckpoint.layer` reads one decoder block, which
is what the layer-by-layer quantizing loader (`qspec_jax.quant.streaming`) builds on. Hugging Face linears
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
import ml_dtypes
import numpy as np

from qspec_jax.config import LlamaConfig, QuantConfig, RopeScaling
from qspec_jax.loading.errors import load_error
from qspec_jax.loading.gguf_loader import _float_dtype
from qspec_jax.model.params import LayerParams, Params

__all__ = ["HFCheckpoint", "config_from_hf", "load_hf_dir"]

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
    # Sliding-window attention equals full attention up to the window; past it the model's
    # logits differ and no attention path here masks by window, so the engine refuses such
    # sequences (`LlamaConfig.check_context`) rather than capping the context silently.
    window = hf.get("sliding_window")
    sliding_window = None
    if window and (model_type == "mistral" or hf.get("use_sliding_window")):
        sliding_window = int(window)

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
        sliding_window=sliding_window,
    )


class _SafetensorsDir:
    """Tensor name -> file lookup over a directory's safetensors files."""

    def __init__(self, path: str):
        self.path = path
        self._handles: dict[str, Any] = {}
        self._headers: dict[str, tuple[int, dict]] = {}
        self._sizes: dict[str, int] = {}
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

    def _header(self, file: str) -> tuple[int, dict]:
        """(byte offset of the data section, the JSON header) of a safetensors file."""
        if file not in self._headers:
            self._open(file)  # safe_open validates the file (truncation, bad header) first
            try:
                with open(file, "rb") as fh:
                    n = int(np.frombuffer(fh.read(8), "<u8")[0])
                    header = json.loads(fh.read(n))
            except (OSError, ValueError, IndexError) as e:
                raise load_error(
                    file,
                    f"is not a readable safetensors file, its header is corrupt ({e})",
                    "re-download the file",
                ) from e
            self._headers[file] = (8 + n, header)
        return self._headers[file]

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """The tensor as `dtype` numpy in its Hugging Face layout, shape-checked.

        Only the tensor's own bytes are memory-mapped, and unmapped once converted.
        """
        file = self.where.get(name)
        if file is None:
            raise load_error(
                self.path,
                f"has no tensor {name!r} in its safetensors files",
                "the checkpoint is incomplete or not a Llama-family model",
            )
        base, header = self._header(file)
        entry = header.get(name)
        if not isinstance(entry, dict):
            raise load_error(
                file,
                f"does not hold the tensor {name!r} that the index points to",
                "re-download the shard",
            )
        try:
            got = tuple(int(x) for x in entry["shape"])
            st_dtype = str(entry["dtype"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise load_error(
                file, f"has an unreadable header entry for {name!r} ({e})", "re-download the file"
            ) from e
        if got != tuple(shape):
            raise load_error(
                file,
                f"tensor {name!r} has shape {list(got)} but config.json implies {list(shape)}",
                "check that config.json belongs to these weights",
            )
        np_dtype = _ST_FLOAT_DTYPES.get(st_dtype)
        if np_dtype is None:
            raise load_error(
                file, f"tensor {name!r} has non-float dtype {st_dtype}", "load a float checkpoint"
            )
        n = int(np.prod(got, dtype=np.int64))
        if end - begin != n * np.dtype(np_dtype).itemsize or base + end > self._size(file):
            raise load_error(
                file,
                f"is not a readable safetensors file: tensor {name!r} lies outside the file",
                "re-download the file",
            )
        if n == 0:
            return np.zeros(got, dtype)
        try:
            mm = np.memmap(file, dtype=np_dtype, mode="r", offset=base + begin, shape=got)
        except (OSError, ValueError) as e:
            raise load_error(
                file,
                f"cannot read tensor {name!r} ({type(e).__name__}: {e})",
                "re-download the file",
            ) from e
        out = np.array(mm, dtype=dtype)  # a copy; dropping `mm` unmaps the tensor's pages
        del mm
        return out

    def _size(self, file: str) -> int:
        if file not in self._sizes:
            self._sizes[file] = os.path.getsize(file)
        return self._sizes[file]

    def close(self) -> None:
        """Drops the safe_open handles (their memory maps)."""
        self._handles.clear()


# safetensors dtype names -> numpy dtypes (bfloat16 from ml_dtypes, as JAX uses).
_ST_FLOAT_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
}


def _name_resolver(st: _SafetensorsDir):
    """Checkpoints saved from LlamaForCausalLM use 'model.' prefixes; a bare LlamaModel has none."""
    prefix = (
        "model." if st.has("model.embed_tokens.weight") or not st.has("embed_tokens.weight") else ""
    )
    return lambda name: name if name == "lm_head.weight" else prefix + name


class HFCheckpoint:
    """A Hugging Face Llama / Mistral / Qwen2 directory, read one piece at a time.

    Attributes:
        path: the directory.
        config: its `LlamaConfig` (with ``dtype`` as requested).
    """

    def __init__(self, path: str | os.PathLike, dtype: str = "float32"):
        self.path = os.fspath(path)
        self.config = config_from_hf(self.path, dtype)
        self._st = _SafetensorsDir(self.path)
        self._nm = _name_resolver(self._st)

    def disk_bytes(self) -> int:
        """Bytes of the safetensors files holding the model."""
        return sum(os.path.getsize(f) for f in set(self._st.where.values()))

    def layer(self, i: int, dtype=np.float32) -> LayerParams:
        """Decoder block `i` as numpy arrays without the layer axis, in `Params` layout.

        Returns:
            LayerParams with attn_norm / mlp_norm [D], wqkv [D, q + 2kv], bqkv [q + 2kv] or
            None, wo [q, D], w_gate_up [D, 2F], w_down [F, D].
        """
        cfg, st, nm = self.config, self._st, self._nm
        d, f = cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.q_size, cfg.kv_size
        b = f"layers.{i}."

        def get(name, shape):
            return st.get(nm(b + name), shape, dtype)

        wqkv = np.empty((d, q + 2 * kv), dtype)  # [D, q + 2kv]
        wqkv[:, :q] = get("self_attn.q_proj.weight", (q, d)).T
        wqkv[:, q : q + kv] = get("self_attn.k_proj.weight", (kv, d)).T
        wqkv[:, q + kv :] = get("self_attn.v_proj.weight", (kv, d)).T
        bqkv = None
        if cfg.qkv_bias:
            bqkv = np.concatenate(
                [
                    get("self_attn.q_proj.bias", (q,)),
                    get("self_attn.k_proj.bias", (kv,)),
                    get("self_attn.v_proj.bias", (kv,)),
                ]
            )  # [q + 2kv]
        w_gate_up = np.empty((d, 2 * f), dtype)  # [D, 2F]
        w_gate_up[:, :f] = get("mlp.gate_proj.weight", (f, d)).T
        w_gate_up[:, f:] = get("mlp.up_proj.weight", (f, d)).T
        return LayerParams(
            attn_norm=get("input_layernorm.weight", (d,)),
            wqkv=wqkv,
            bqkv=bqkv,
            wo=np.ascontiguousarray(get("self_attn.o_proj.weight", (d, q)).T),  # [q, D]
            mlp_norm=get("post_attention_layernorm.weight", (d,)),
            w_gate_up=w_gate_up,
            w_down=np.ascontiguousarray(get("mlp.down_proj.weight", (d, f)).T),  # [F, D]
        )

    def embed(self, dtype=np.float32) -> np.ndarray:
        """Token embedding [V, D]."""
        cfg = self.config
        return self._st.get(
            self._nm("embed_tokens.weight"), (cfg.vocab_size, cfg.hidden_size), dtype
        )

    def final_norm(self, dtype=np.float32) -> np.ndarray:
        """Final RMSNorm scale [D]."""
        return self._st.get(self._nm("norm.weight"), (self.config.hidden_size,), dtype)

    def lm_head(self, dtype=np.float32) -> np.ndarray | None:
        """The untied LM head [D, V], or None when tied to the embedding."""
        cfg = self.config
        if cfg.tie_embeddings:
            return None
        w = self._st.get("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), dtype)  # [V, D]
        return np.ascontiguousarray(w.T)  # [D, V]

    def close(self) -> None:
        self._st.close()


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
    np_dtype = _float_dtype(dtype)
    ckpt = HFCheckpoint(path, dtype)
    cfg = ckpt.config
    n_layers = cfg.num_layers
    arr = lambda x: jnp.asarray(x, dtype=np_dtype)

    stacked: dict[str, np.ndarray] = {}
    for i in range(n_layers):
        lp = ckpt.layer(i, np_dtype)
        for name in ("attn_norm", "wqkv", "bqkv", "wo", "mlp_norm", "w_gate_up", "w_down"):
            a = getattr(lp, name)
            if a is None:
                continue
            if name not in stacked:
                stacked[name] = np.empty((n_layers, *a.shape), np_dtype)
            stacked[name][i] = a
        del lp
    layers = LayerParams(
        attn_norm=arr(stacked["attn_norm"]),
        wqkv=arr(stacked["wqkv"]),
        bqkv=arr(stacked["bqkv"]) if "bqkv" in stacked else None,
        wo=arr(stacked["wo"]),
        mlp_norm=arr(stacked["mlp_norm"]),
        w_gate_up=arr(stacked["w_gate_up"]),
        w_down=arr(stacked["w_down"]),
    )
    del stacked
    head = ckpt.lm_head(np_dtype)
    params = Params(
        embed=arr(ckpt.embed(np_dtype)),
        layers=layers,
        final_norm=arr(ckpt.final_norm(np_dtype)),
        lm_head=None if head is None else arr(head),
    )
    ckpt.close()
    return cfg, params, QuantConfig(method="none")
