"""Shared fixtures of the loading tests: the embedded GGUF is read once per session."""

from __future__ import annotations

import os

# No network at test time: transformers / huggingface_hub must only read local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402

from qspec_jax.loading import LoadError, embedded_gguf_path  # noqa: E402


@pytest.fixture(scope="session")
def gguf_path() -> str:
    try:
        return embedded_gguf_path()
    except LoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def gguf_reader(gguf_path):
    from gguf import GGUFReader

    return GGUFReader(gguf_path)


@pytest.fixture(scope="session")
def gguf_float(gguf_path):
    """(cfg, params, quant) of the embedded GGUF with float weights."""
    from qspec_jax.loading import load_gguf

    return load_gguf(gguf_path)


@pytest.fixture(scope="session")
def gguf_int4(gguf_path):
    """(cfg, params, quant) of the embedded GGUF with the Q4_1 linears kept as int4."""
    from qspec_jax.loading import load_gguf

    return load_gguf(gguf_path, keep_int4=True)


@pytest.fixture(scope="session")
def hf_reference(request, gguf_path):
    """transformers' LlamaForCausalLM loaded from the same GGUF (float32), once per session.

    Reuses the suite-wide `hf_smollm2` fixture when a parent conftest defines it, so a full test
    run builds the (25 s) transformers model only once.
    """
    torch = pytest.importorskip("torch")
    try:
        shared = request.getfixturevalue("hf_smollm2")
    except pytest.FixtureLookupError:
        shared = None
    model = shared[0] if isinstance(shared, (tuple, list)) and shared else shared
    if hasattr(model, "state_dict") and getattr(model, "dtype", None) == torch.float32:
        return model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_state(hf_reference):
    """The reference state dict as float32 numpy arrays."""
    return {k: v.detach().cpu().numpy() for k, v in hf_reference.state_dict().items()}


@pytest.fixture(scope="session")
def smollm_tokenizer(gguf_path):
    from qspec_jax.loading import load_tokenizer

    return load_tokenizer(gguf_path)


# ------------------------------------------------------------------------------------------------
# A tiny synthetic Llama GGUF, written the way llama.cpp's converter writes one.
# ------------------------------------------------------------------------------------------------

TINY = dict(
    vocab=256, d=128, f=256, layers=2, heads=4, kv_heads=2, head_dim=32, theta=10000.0, eps=1e-5
)


def llamacpp_permute(w, n_head: int, n_head_kv: int | None = None):
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (HF rotate-half rows -> interleaved)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def tiny_hf_weights(seed: int = 0, qkv_bias: bool = False, tie: bool = True) -> dict:
    """Random tiny weights in Hugging Face layout ([out, in]), keyed by GGUF names."""
    import numpy as np

    t = TINY
    rng = np.random.default_rng(seed)
    q, kv = t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]
    d, f = t["d"], t["f"]
    w = {
        "token_embd.weight": rng.normal(size=(t["vocab"], d)),
        "output_norm.weight": 1 + 0.1 * rng.normal(size=d),
    }
    if not tie:
        w["output.weight"] = rng.normal(size=(t["vocab"], d)) * 0.05
    for i in range(t["layers"]):
        b = f"blk.{i}."
        w[b + "attn_norm.weight"] = 1 + 0.1 * rng.normal(size=d)
        w[b + "ffn_norm.weight"] = 1 + 0.1 * rng.normal(size=d)
        w[b + "attn_q.weight"] = rng.normal(size=(q, d)) * 0.05
        w[b + "attn_k.weight"] = rng.normal(size=(kv, d)) * 0.05
        w[b + "attn_v.weight"] = rng.normal(size=(kv, d)) * 0.05
        w[b + "attn_output.weight"] = rng.normal(size=(d, q)) * 0.05
        w[b + "ffn_gate.weight"] = rng.normal(size=(f, d)) * 0.05
        w[b + "ffn_up.weight"] = rng.normal(size=(f, d)) * 0.05
        w[b + "ffn_down.weight"] = rng.normal(size=(d, f)) * 0.05
        if qkv_bias:
            w[b + "attn_q.bias"] = rng.normal(size=q) * 0.1
            w[b + "attn_k.bias"] = rng.normal(size=kv) * 0.1
            w[b + "attn_v.bias"] = rng.normal(size=kv) * 0.1
    return {k: v.astype("float32") for k, v in w.items()}


def write_tiny_gguf(
    path,
    weights: dict,
    *,
    arch: str = "llama",
    linear_type: str = "Q4_1",
    drop: tuple[str, ...] = (),
    reshape: dict | None = None,
    extra: dict | None = None,
):
    """Writes `weights` (HF layout) as a GGUF file like llama.cpp: q/k rows permuted, linears
    quantized to `linear_type`, embeddings Q8_0, norms F32. Returns the path."""
    import gguf
    import numpy as np

    t = TINY
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_block_count(t["layers"])
    writer.add_context_length(512)
    writer.add_embedding_length(t["d"])
    writer.add_feed_forward_length(t["f"])
    writer.add_head_count(t["heads"])
    writer.add_head_count_kv(t["kv_heads"])
    writer.add_rope_dimension_count(t["head_dim"])
    writer.add_rope_freq_base(t["theta"])
    writer.add_layer_norm_rms_eps(t["eps"])
    writer.add_vocab_size(t["vocab"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    qtype = gguf.GGMLQuantizationType[linear_type]
    tensors = dict(weights)
    tensors.update(extra or {})
    for name, w in tensors.items():
        if name in drop:
            continue
        if ".attn_q." in name:
            w = llamacpp_permute(w, t["heads"], t["heads"])
        elif ".attn_k." in name:
            w = llamacpp_permute(w, t["heads"], t["kv_heads"])
        if reshape and name in reshape:
            w = w.reshape(reshape[name])
        if w.ndim == 2 and name != "token_embd.weight" and name != "output.weight":
            wt = qtype
        elif name in ("token_embd.weight", "output.weight"):
            wt = gguf.GGMLQuantizationType.Q8_0
        else:
            wt = gguf.GGMLQuantizationType.F32
        if wt == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
        elif wt == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, np.ascontiguousarray(w, np.float16))
        else:
            writer.add_tensor(
                name, gguf.quants.quantize(np.ascontiguousarray(w, np.float32), wt), raw_dtype=wt
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


@pytest.fixture(scope="session")
def tiny_gguf():
    """The tiny-GGUF helpers above, as a fixture (tests never import conftest directly)."""
    import types

    return types.SimpleNamespace(
        cfg=TINY, weights=tiny_hf_weights, write=write_tiny_gguf, permute=llamacpp_permute
    )
