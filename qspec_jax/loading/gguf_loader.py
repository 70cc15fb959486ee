"""Loads a llama.cpp GGUF checkpoint (Llama architecture) into `Params`.

Two modes:

* float (default): every tensor is dequantized with `gguf.quants.dequantize` (the same routine
  transformers' GGUF loader uses) and returned as float `Params` with ``QuantConfig(method="none")``.
* ``keep_int4=True``: every linear stored as GGUF Q4_1 is converted *exactly* (no requantization)
  to an asymmetric group-32 `QuantizedWeight`. A Q4_1 block holds 32 consecutive weights of one
  output row along the input dimension: an f16 scale ``d``, an f16 minimum ``m`` and 16 bytes of
  codes (byte ``j`` holds element ``j`` in its low nibble and element ``j + 16`` in its high
  nibble), with ``w = d * q + m``, ``q`` in [0, 15]. That is precisely ``code * scale + min`` of
  the project's asymmetric int4 format with group size 32. The token embedding, the norms and an
  untied LM head stay float.

GGUF stores a linear as ggml shape ``[in, out]`` which reads as a row-major numpy ``[out, in]``
(PyTorch's layout); `Params` stores ``[in, out]`` (``x @ w``), so every linear is transposed.

llama.cpp's converter permutes the output rows of ``attn_q`` and ``attn_k`` so that its
interleaved ("GPT-J") RoPE pairs adjacent elements. Within each head of width ``hd`` the
Hugging Face row ``s * hd/2 + j`` (half ``s`` in {0, 1}, pair ``j``) is stored at GGUF row
``2 * j + s``. `qk_unpermute_index` gives the inverse gather, identical to transformers'
``LlamaTensorProcessor._reverse_permute_weights``; it is applied to the rows of float weights and
to the output columns (N) of codes, scales and mins, so both modes use the Hugging Face rotate-half
RoPE convention.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from pallas_kernels.int4 import check_packable, pack_int4
from qspec_jax.config import LlamaConfig, QuantConfig, RopeScaling
from qspec_jax.loading.errors import load_error
from qspec_jax.model.params import LayerParams, Params
from qspec_jax.quant.format import QuantizedWeight, q8_head_from_float

__all__ = [
    "GGUF_INT4_QUANT",
    "load_gguf",
    "qk_unpermute_index",
    "read_gguf_config",
]

# Activations of the low-bit modes get one scale per 32 input channels: on SmolLM2's own Q4_1
# codes (no rotation possible without re-quantizing) that took W4A8's agreement with W4A16 from
# 0.939 to 0.973 and W4A4's from 0.143 to 0.757 (experiments/quant_probe.py --methods gguf,
# README "Quantization").
GGUF_INT4_QUANT = QuantConfig(method="gguf", group_size=32, symmetric=False, act_group_size=32)

_Q4_1_BLOCK = 32  # weights per Q4_1 block
_Q4_1_BYTES = 20  # f16 d, f16 m, 16 bytes of nibbles

# Per-layer GGUF tensor suffixes (blk.{i}.<suffix>) this loader understands.
_LAYER_WEIGHTS = (
    "attn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
)
_LAYER_BIASES = ("attn_q.bias", "attn_k.bias", "attn_v.bias")
_LINEARS = (
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
)

# Llama-3.x RoPE scalings llama.cpp bakes into a `rope_freqs.weight` tensor (it drops the
# parameters from the metadata), recognised by recomputing their per-frequency factors.
_KNOWN_LLAMA3_SCALINGS = (
    RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    ),
    RopeScaling(
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    RopeScaling(
        factor=16.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _float_dtype(dtype: Any) -> np.dtype:
    dt = jnp.dtype(dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"dtype must be a float dtype such as 'float32' or 'bfloat16', got {dtype!r}"
        )
    return dt


def _f32_value(v: float) -> float:
    """The shortest decimal that round-trips to the same float32 (GGUF stores f32 metadata).

    9.999999747378752e-06 (1e-5 widened from float32) becomes 1e-05, so configs compare equal to
    the presets; the float32 value used by the model is unchanged.
    """
    return float(np.format_float_positional(np.float32(v), unique=True, trim="-"))


def qk_unpermute_index(n_rows: int, n_heads: int) -> np.ndarray:
    """Gather index undoing llama.cpp's q/k row permutation: ``hf_rows = gguf_rows[index]``.

    ``n_rows = n_heads * head_dim``. Equivalent to transformers'
    ``w.reshape(n_heads, head_dim // 2, 2, ...).swapaxes(1, 2).reshape(w.shape)``: HF row
    ``h * hd + s * hd/2 + j`` comes from GGUF row ``h * hd + 2 * j + s``.
    """
    if n_rows % (2 * n_heads):
        raise ValueError(f"{n_rows} q/k rows cannot be split into {n_heads} heads of even width")
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, half, 2).swapaxes(1, 2).reshape(-1)


def _llama3_rope_factors(head_dim: int, theta: float, rs: RopeScaling) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter stores in ``rope_freqs.weight``."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(rs.factor)
        else:
            smooth = (rs.original_max_position_embeddings / wl - rs.low_freq_factor) / (
                rs.high_freq_factor - rs.low_freq_factor
            )
            out.append(1.0 / ((1 - smooth) / rs.factor + smooth))
    return np.asarray(out)


# --------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------


def _open(path: str):
    """Opens a GGUF file with `gguf.GGUFReader`, turning every failure into a `LoadError`."""
    if not os.path.exists(path):
        raise load_error(
            path,
            "no such GGUF file",
            "check the path, or pass 'smollm2-135m' for the embedded model",
        )
    if not os.path.isfile(path):
        raise load_error(path, "is not a regular file", "pass the path of a .gguf file")
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - gguf is a hard dependency
        raise load_error(
            path, f"the gguf package is not importable ({e})", "run `pip install gguf`"
        ) from e
    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise load_error(
            path,
            f"is not a readable GGUF file, it is truncated or corrupt ({type(e).__name__}: {e})",
            "re-download or re-convert the file",
        ) from e
    if reader.byte_order != "I":
        raise load_error(
            path, "is a byte-swapped (big-endian) GGUF file", "convert it to little-endian GGUF"
        )
    _check_tensor_extents(path, reader)
    return reader


def _check_tensor_extents(path: str, reader) -> None:
    """Every tensor's bytes must be present in full (a truncated file otherwise reads garbage)."""
    size = os.path.getsize(path)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise load_error(
                path,
                f"is truncated: tensor {t.name!r} needs bytes up to {end} but the file has {size}",
                "re-download or re-convert the file",
            )


def _meta(reader, key: str, default: Any = KeyError):
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise KeyError(key)
        return default
    return field.contents()


def _architecture(path: str, reader) -> str:
    try:
        return str(_meta(reader, "general.architecture"))
    except KeyError:
        raise load_error(
            path,
            "has no 'general.architecture' metadata",
            "re-convert it with llama.cpp's convert_hf_to_gguf.py",
        ) from None


def _config_from_reader(path: str, reader, dtype: str, tensor_names: set[str]) -> LlamaConfig:
    arch = _architecture(path, reader)
    if arch != "llama":
        raise load_error(
            path,
            f"has GGUF architecture {arch!r}, but only 'llama' is supported",
            "use a Llama-architecture GGUF file or load the model's Hugging Face directory",
        )

    def req(key: str):
        try:
            return _meta(reader, key)
        except KeyError:
            raise load_error(
                path,
                f"is missing the metadata key {key!r}",
                "re-convert it with llama.cpp's convert_hf_to_gguf.py",
            ) from None

    n_layers = int(req("llama.block_count"))
    d = int(req("llama.embedding_length"))
    f = int(req("llama.feed_forward_length"))
    n_heads = int(req("llama.attention.head_count"))
    n_kv = int(_meta(reader, "llama.attention.head_count_kv", n_heads))
    rope_dim = _meta(reader, "llama.rope.dimension_count", None)
    head_dim = int(
        _meta(
            reader, "llama.attention.key_length", rope_dim if rope_dim is not None else d // n_heads
        )
    )
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise load_error(
            path,
            f"applies RoPE to {rope_dim} of {head_dim} head dimensions (partial rotary), which is not supported",
            "use a model with full-width RoPE",
        )
    value_dim = int(_meta(reader, "llama.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise load_error(
            path,
            f"has value heads of width {value_dim} != key width {head_dim}",
            "use a standard Llama model",
        )
    if n_heads % n_kv:
        raise load_error(
            path,
            f"has {n_heads} heads, not a multiple of {n_kv} KV heads",
            "the file is corrupt; re-convert it",
        )

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _meta(reader, "llama.vocab_size", None)
    if vocab is None:
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = int(emb.shape[-1]) if emb is not None else None
    if vocab is None:
        raise load_error(
            path, "gives no vocabulary size", "re-convert it with llama.cpp's convert_hf_to_gguf.py"
        )

    theta = _f32_value(_meta(reader, "llama.rope.freq_base", 10000.0))
    eps = _f32_value(_meta(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5))
    max_pos = int(_meta(reader, "llama.context_length", 4096))

    scaling_type = _meta(reader, "llama.rope.scaling.type", "none")
    if scaling_type not in ("none", ""):
        raise load_error(
            path,
            f"uses RoPE scaling type {scaling_type!r}, which is not supported (only Llama-3 scaling is)",
            "use a model without this RoPE scaling",
        )
    rope_scaling = None
    if "rope_freqs.weight" in tensor_names:
        rope_scaling = _rope_scaling_from_freqs(path, reader, head_dim, theta)

    bos = _meta(reader, "tokenizer.ggml.bos_token_id", None)
    eos_ids: list[int] = []
    for key in (
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ):
        v = _meta(reader, key, None)
        if v is not None and int(v) not in eos_ids:
            eos_ids.append(int(v))
    pad = _meta(reader, "tokenizer.ggml.padding_token_id", None)
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0

    return LlamaConfig(
        name=os.path.splitext(os.path.basename(path))[0],
        vocab_size=int(vocab),
        hidden_size=d,
        intermediate_size=f,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rope_theta=theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=eps,
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        max_position_embeddings=max_pos,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos_ids),
        pad_token_id=int(pad),
        dtype=str(dtype),
    )


def _rope_scaling_from_freqs(path: str, reader, head_dim: int, theta: float) -> RopeScaling:
    from gguf.quants import dequantize

    t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    got = np.asarray(dequantize(t.data, t.tensor_type), np.float64).reshape(-1)
    for rs in _KNOWN_LLAMA3_SCALINGS:
        want = _llama3_rope_factors(head_dim, theta, rs)
        if got.shape == want.shape and np.allclose(got, want, rtol=1e-4, atol=0):
            return rs
    raise load_error(
        path,
        "has a 'rope_freqs.weight' tensor that matches no known Llama-3 RoPE scaling",
        "load the model's Hugging Face directory instead (its config.json states the scaling)",
    )


def read_gguf_config(path: str | os.PathLike, dtype: str = "float32") -> LlamaConfig:
    """Reads only the model config of a GGUF file (no tensor is dequantized)."""
    path = os.fspath(path)
    _float_dtype(dtype)
    reader = _open(path)
    return _config_from_reader(path, reader, dtype, {t.name for t in reader.tensors})


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


class _Tensors:
    """Name -> tensor lookup with shape checks and dequantization, all errors as `LoadError`."""

    def __init__(self, path: str, reader):
        self.path = path
        self.by_name = {t.name: t for t in reader.tensors}

    def get(self, name: str, shape: tuple[int, ...]):
        t = self.by_name.get(name)
        if t is None:
            raise load_error(
                self.path,
                f"is missing the tensor {name!r}",
                "the file is incomplete or not a standard Llama conversion",
            )
        got = tuple(
            int(s) for s in reversed(t.shape)
        )  # ggml shape is [in, out]; numpy is [out, in]
        while len(got) > len(shape) and got[0] == 1:
            got = got[1:]
        if got != tuple(shape):
            raise load_error(
                self.path,
                f"tensor {name!r} has shape {list(got)} but the config implies {list(shape)}",
                "the file's metadata and tensors disagree; re-convert it",
            )
        return t

    def dequant(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The float32 tensor in numpy (PyTorch) layout, e.g. [out, in] for a linear."""
        from gguf.quants import dequantize

        t = self.get(name, shape)
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise load_error(
                self.path,
                f"tensor {name!r} has GGML type {t.tensor_type.name}, which the gguf package cannot dequantize",
                "re-quantize the file with a common type such as Q4_1, Q8_0 or F16",
            ) from e
        return np.asarray(w, dtype=np.float32).reshape(shape)

    def q4_1(self, name: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact parts of a Q4_1 linear of numpy shape [out, in].

        Returns codes uint8 [in, out] in [0, 15], scales float32 [in // 32, out] and mins
        float32 [in // 32, out] with ``w[k, n] = codes[k, n] * scales[k // 32, n] + mins[k // 32, n]``.
        """
        from gguf import GGMLQuantizationType

        t = self.get(name, shape)
        if t.tensor_type != GGMLQuantizationType.Q4_1:
            raise load_error(
                self.path,
                f"tensor {name!r} is stored as {t.tensor_type.name}, not Q4_1, so its int4 codes cannot be kept exactly",
                "load with keep_int4=False (float weights) or use a Q4_1 GGUF file",
            )
        n_out, n_in = shape
        nb = n_in // _Q4_1_BLOCK
        blocks = np.asarray(t.data, dtype=np.uint8).reshape(n_out, nb, _Q4_1_BYTES)
        d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16).reshape(n_out, nb)
        m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16).reshape(n_out, nb)
        qs = blocks[
            ..., 4:
        ]  # [out, nb, 16]: byte j = element j (low nibble) | element j + 16 (high)
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n_out, n_in)
        return codes.T, d.T.astype(np.float32), m.T.astype(np.float32)


def _stack_float(tensors: _Tensors, cfg: LlamaConfig, np_dtype, keep: bool):
    """Float per-layer stacks [L, in, out]; with `keep` the linears are skipped (returned None)."""
    n_layers, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.q_size, cfg.kv_size
    q_idx = qk_unpermute_index(q, cfg.num_heads)
    k_idx = qk_unpermute_index(kv, cfg.num_kv_heads)

    attn_norm = np.empty((n_layers, d), np_dtype)
    mlp_norm = np.empty((n_layers, d), np_dtype)
    bqkv = np.empty((n_layers, q + 2 * kv), np_dtype) if cfg.qkv_bias else None
    if not keep:
        wqkv = np.empty((n_layers, d, q + 2 * kv), np_dtype)
        wo = np.empty((n_layers, q, d), np_dtype)
        w_gate_up = np.empty((n_layers, d, 2 * f), np_dtype)
        w_down = np.empty((n_layers, f, d), np_dtype)
    for i in range(n_layers):
        b = f"blk.{i}."
        attn_norm[i] = tensors.dequant(b + "attn_norm.weight", (d,))
        mlp_norm[i] = tensors.dequant(b + "ffn_norm.weight", (d,))
        if bqkv is not None:
            bqkv[i, :q] = tensors.dequant(b + "attn_q.bias", (q,))[q_idx]
            bqkv[i, q : q + kv] = tensors.dequant(b + "attn_k.bias", (kv,))[k_idx]
            bqkv[i, q + kv :] = tensors.dequant(b + "attn_v.bias", (kv,))
        if keep:
            continue
        wqkv[i, :, :q] = tensors.dequant(b + "attn_q.weight", (q, d))[q_idx].T
        wqkv[i, :, q : q + kv] = tensors.dequant(b + "attn_k.weight", (kv, d))[k_idx].T
        wqkv[i, :, q + kv :] = tensors.dequant(b + "attn_v.weight", (kv, d)).T
        wo[i] = tensors.dequant(b + "attn_output.weight", (d, q)).T
        w_gate_up[i, :, :f] = tensors.dequant(b + "ffn_gate.weight", (f, d)).T
        w_gate_up[i, :, f:] = tensors.dequant(b + "ffn_up.weight", (f, d)).T
        w_down[i] = tensors.dequant(b + "ffn_down.weight", (d, f)).T
    out = dict(attn_norm=attn_norm, mlp_norm=mlp_norm, bqkv=bqkv)
    if not keep:
        out.update(wqkv=wqkv, wo=wo, w_gate_up=w_gate_up, w_down=w_down)
    return out


def _stack_int4(tensors: _Tensors, cfg: LlamaConfig) -> dict[str, QuantizedWeight]:
    """Exact QuantizedWeight stacks of the Q4_1 linears."""
    n_layers, d, f = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.q_size, cfg.kv_size
    q_idx = qk_unpermute_index(q, cfg.num_heads)
    k_idx = qk_unpermute_index(kv, cfg.num_kv_heads)

    # name -> list of (gguf suffix, numpy [out, in] shape, column gather index or None)
    fused = {
        "wqkv": [
            ("attn_q.weight", (q, d), q_idx),
            ("attn_k.weight", (kv, d), k_idx),
            ("attn_v.weight", (kv, d), None),
        ],
        "wo": [("attn_output.weight", (d, q), None)],
        "w_gate_up": [("ffn_gate.weight", (f, d), None), ("ffn_up.weight", (f, d), None)],
        "w_down": [("ffn_down.weight", (d, f), None)],
    }
    out = {}
    for key, parts in fused.items():
        k_in = parts[0][1][1]
        try:
            check_packable(k_in, _Q4_1_BLOCK)
        except ValueError as e:
            raise load_error(
                tensors.path,
                f"cannot keep the int4 codes of {key} ({e})",
                "load with keep_int4=False",
            ) from e
        n_out = sum(p[1][0] for p in parts)
        codes = np.empty((n_layers, k_in, n_out), np.uint8)
        scales = np.empty((n_layers, k_in // _Q4_1_BLOCK, n_out), np.float32)
        mins = np.empty_like(scales)
        for i in range(n_layers):
            col = 0
            for suffix, shape, idx in parts:
                c, s, m = tensors.q4_1(f"blk.{i}.{suffix}", shape)
                if idx is not None:
                    c, s, m = c[:, idx], s[:, idx], m[:, idx]
                w = shape[0]
                codes[i, :, col : col + w] = c
                scales[i, :, col : col + w] = s
                mins[i, :, col : col + w] = m
                col += w
        out[key] = QuantizedWeight(
            packed=pack_int4(jnp.asarray(codes)), scales=jnp.asarray(scales), mins=jnp.asarray(mins)
        )
    return out


def _check_known_tensors(path: str, names: set[str], n_layers: int) -> None:
    known = {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"}
    for i in range(n_layers):
        known.update(f"blk.{i}.{s}" for s in _LAYER_WEIGHTS + _LAYER_BIASES)
    unknown = sorted(names - known)
    if unknown:
        raise load_error(
            path,
            f"contains tensors this Llama loader does not understand (e.g. {unknown[0]!r}, {len(unknown)} in all)",
            "use a standard Llama-architecture conversion",
        )


def load_gguf(
    path: str | os.PathLike, dtype: str = "float32", keep_int4: bool = False
) -> tuple[LlamaConfig, Params, QuantConfig]:
    """Loads a Llama-architecture GGUF file.

    Args:
        path: the .gguf file.
        dtype: float dtype of the float arrays (embedding, norms, LM head and, without
            `keep_int4`, the linears); also stored as ``cfg.dtype``.
        keep_int4: keep every linear's Q4_1 codes exactly as an asymmetric group-32
            `QuantizedWeight` (scales and mins float32) instead of dequantizing it.

    Returns:
        ``(cfg, params, quant)``: quant is ``QuantConfig(method="none")`` for float params and
        ``QuantConfig(method="gguf", group_size=32, symmetric=False)`` with `keep_int4`.
        ``params.head_q8`` holds the head's int8 codes when the file's head (or tied
        embedding) lies on the Q8_0 grid, whatever `dtype` is (`Params.head_q8`).

    Raises:
        LoadError: missing, truncated or corrupt file; an architecture other than 'llama';
            missing or unexpected tensors; a tensor shape that disagrees with the metadata; with
            `keep_int4`, a linear not stored as Q4_1.
    """
    path = os.fspath(path)
    np_dtype = _float_dtype(dtype)
    reader = _open(path)
    names = {t.name for t in reader.tensors}
    cfg = _config_from_reader(path, reader, str(np_dtype), names)
    _check_known_tensors(path, names, cfg.num_layers)
    if any(n.startswith(f"blk.{cfg.num_layers}.") for n in names):
        raise load_error(
            path,
            f"has more decoder blocks than its block_count {cfg.num_layers}",
            "the file is corrupt; re-convert it",
        )
    tensors = _Tensors(path, reader)

    d, v = cfg.hidden_size, cfg.vocab_size
    embed32 = tensors.dequant("token_embd.weight", (v, d))  # [V, D] float32
    head32 = embed32 if cfg.tie_embeddings else tensors.dequant("output.weight", (v, d))
    # A Q8_0 head's int8 codes, found in the float32 values before the cast: in bfloat16 the
    # head is off the grid, and without the codes it would run on the float head (7x slower
    # on CPU; docs/kernels.md, "bfloat16 against float32, measured").
    head_q8 = q8_head_from_float(head32)  # None unless the file's head is on the Q8_0 grid
    embed = embed32.astype(np_dtype)
    final_norm = tensors.dequant("output_norm.weight", (d,)).astype(np_dtype)
    lm_head = None if cfg.tie_embeddings else head32.T.astype(np_dtype)
    del embed32, head32

    stacks = _stack_float(tensors, cfg, np_dtype, keep=keep_int4)
    if keep_int4:
        stacks.update(_stack_int4(tensors, cfg))
        quant = GGUF_INT4_QUANT
    else:
        quant = QuantConfig(method="none")

    def arr(x):
        return x if isinstance(x, QuantizedWeight) else jnp.asarray(x, dtype=np_dtype)

    layers = LayerParams(
        attn_norm=arr(stacks["attn_norm"]),
        wqkv=arr(stacks["wqkv"]),
        bqkv=None if stacks["bqkv"] is None else arr(stacks["bqkv"]),
        wo=arr(stacks["wo"]),
        mlp_norm=arr(stacks["mlp_norm"]),
        w_gate_up=arr(stacks["w_gate_up"]),
        w_down=arr(stacks["w_down"]),
    )
    params = Params(
        embed=arr(embed),
        layers=layers,
        final_norm=arr(final_norm),
        lm_head=None if lm_head is None else arr(lm_head),
        head_q8=head_q8,
    )
    return cfg, params, quant
