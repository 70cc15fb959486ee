"""Model parameters as registered pytree dataclasses.

Layer weights are stacked along a leading layer axis so the decoder runs as one `lax.scan`
(one compiled layer body, whatever the depth). Linear weights are stored [in, out] (x @ w) and
are either float arrays (the unquantized model) or `QuantizedWeight` (one packed int4 copy that
every precision reads). q/k/v are fused into one [D, q + 2 kv] projection and gate/up into one
[D, 2F] projection, so each low-bit activation is quantized once per block input.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from qspec_jax.config import LlamaConfig, QuantConfig
from qspec_jax.quant.format import Q8Head, QuantizedWeight, Weight, q8_head_from_float


@struct.dataclass
class LayerParams:
    """Weights of all decoder blocks, stacked on axis 0 (L = num_layers).

    Attributes:
        attn_norm: [L, D] RMSNorm scale before attention (ones after QuaRot folding).
        wqkv: [L, D, q + 2 kv] fused q/k/v projection; columns are q heads, then k, then v.
        bqkv: [L, q + 2 kv] fused q/k/v bias (Qwen2), or None.
        wo: [L, q, D] attention output projection.
        mlp_norm: [L, D] RMSNorm scale before the MLP.
        w_gate_up: [L, D, 2F] fused SwiGLU gate (first F columns) and up (last F columns).
        w_down: [L, F, D] MLP down projection.
    """

    attn_norm: jnp.ndarray
    wqkv: Weight
    bqkv: jnp.ndarray | None
    wo: Weight
    mlp_norm: jnp.ndarray
    w_gate_up: Weight
    w_down: Weight


@struct.dataclass
class Params:
    """All model weights.

    Attributes:
        embed: [V, D] token embedding (float; also the LM head when `lm_head` is None).
        layers: the decoder blocks, stacked on axis 0 (run as a `lax.scan`), or a tuple of
            per-layer LayerParams without the layer axis (run unrolled; see `unstack_layers`).
        final_norm: [D] final RMSNorm scale.
        lm_head: [D, V] float LM head, or None when tied to `embed`.
        head_q8: the head as int8 codes on its exact Q8_0 grid, or None. Set by the GGUF loader
            from the file's float32 values before they are cast to the model dtype, so a
            bfloat16 model keeps it too (`qspec_jax.loading.gguf_loader.load_gguf`), or found
            afterwards in a float32 head (`attach_q8_head`). In float32 it holds exactly the
            float head's values; in bfloat16 it holds the file's values and the float head
            their bfloat16 rounding (the CPU LM head kernel reads the codes, so every mode
            there uses the file's values). Saved in checkpoints (the quantized-weight cache
            too), since a bfloat16 head cannot give it back; whatever replaces `embed` /
            `lm_head` must drop it (`params.replace(..., head_q8=None)`).
        mesh: the `jax.sharding.Mesh` of tensor-parallel params (`qspec_jax.sharding.shard_params`:
            head-consistent layout; `forward` then runs under `shard_map`), or None. Static (in
            the pytree structure, not a leaf) and never stored in checkpoints.
    """

    embed: jnp.ndarray
    layers: LayerParams
    final_norm: jnp.ndarray
    lm_head: jnp.ndarray | None = None
    head_q8: Q8Head | None = None
    mesh: Any = struct.field(pytree_node=False, default=None, metadata={"derived": True})


def is_derived(field) -> bool:
    """True for a dataclass field computed from the others (not saved in checkpoints)."""
    return bool(field.metadata.get("derived", False))


def float_head(params: Params) -> jnp.ndarray:
    """The float LM head [D, V] (the embedding's transpose when tied)."""
    return params.lm_head if params.lm_head is not None else params.embed.T


def attach_q8_head(params: Params) -> Params:
    """`params` with `head_q8` set when the float head lies exactly on the Q8_0 grid.

    True of every model loaded from a GGUF whose head (or tied embedding) is Q8_0, like the
    shipped SmolLM2 file (whose loader already sets it, in any dtype); False after a rotation
    (QuaRot), for most float checkpoints, which keep the float head, and for any head not in
    float32 (a bfloat16 head is off the grid: only the loader, which still has the float32
    values, can keep the codes). Costs one pass over the head (0.30 s for SmolLM2, median of 3,
    measured 2026-11-23 on the 2-core development machine).
    """
    if params.head_q8 is not None:
        return params
    head = params.lm_head.T if params.lm_head is not None else params.embed  # [V, D]
    return params.replace(head_q8=q8_head_from_float(head))


def init_params(cfg: LlamaConfig, key: jax.Array) -> Params:
    """Random float parameters for a config (for tests and the big-model shape presets).

    Linear weights have std 1/sqrt(fan_in) so activations keep their scale through the blocks and
    a random model's next-token choice depends on the whole context (not only the last token).
    """
    d, f, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    qkv = cfg.q_size + 2 * cfg.kv_size
    dt = cfg.jnp_dtype
    ks = jax.random.split(key, 8)

    def rnd(k, shape, fan_in):
        return (jax.random.normal(k, shape, jnp.float32) / fan_in**0.5).astype(dt)

    layers = LayerParams(
        attn_norm=(1.0 + 0.1 * jax.random.normal(ks[0], (n_layers, d))).astype(dt),
        wqkv=rnd(ks[1], (n_layers, d, qkv), d),
        bqkv=rnd(ks[2], (n_layers, qkv), d) if cfg.qkv_bias else None,
        wo=rnd(ks[3], (n_layers, cfg.q_size, d), cfg.q_size),
        mlp_norm=(1.0 + 0.1 * jax.random.normal(ks[4], (n_layers, d))).astype(dt),
        w_gate_up=rnd(ks[5], (n_layers, d, 2 * f), d),
        w_down=rnd(ks[6], (n_layers, f, d), f),
    )
    return Params(
        embed=rnd(ks[7], (cfg.vocab_size, d), 1),
        layers=layers,
        final_norm=jnp.ones((d,), dt),
        lm_head=None
        if cfg.tie_embeddings
        else rnd(jax.random.fold_in(key, 99), (d, cfg.vocab_size), d),
    )


def weight_bytes(params: Params) -> int:
    """Bytes of every array held by the parameters (each array counted once)."""
    seen, total = set(), 0
    for leaf in jax.tree_util.tree_leaves(params):
        if id(leaf) not in seen:
            seen.add(id(leaf))
            total += leaf.nbytes
    return total


def is_quantized(params: Params) -> bool:
    layers = params.layers[0] if isinstance(params.layers, tuple) else params.layers
    return isinstance(layers.wqkv, QuantizedWeight)


def unstack_layers(params: Params) -> Params:
    """Splits the stacked layer axis into a tuple of per-layer `LayerParams` (no extra copy kept).

    On CPU, XLA copies a layer's weights out of a stacked array before every matmul when the
    layers run as a `lax.scan` (dynamic slice) or as static slices, which doubles the memory
    traffic of a decode step; separate per-layer arrays with the loop unrolled avoid it
    (`forward` picks the unrolled path when `params.layers` is a tuple).
    """
    if isinstance(params.layers, tuple):
        return params
    n = jax.tree_util.tree_leaves(params.layers)[0].shape[0]
    layers = tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], params.layers) for i in range(n))
    return params.replace(layers=layers)


def stack_layers(params: Params) -> Params:
    """Inverse of `unstack_layers`."""
    if not isinstance(params.layers, tuple):
        return params
    return params.replace(layers=jax.tree_util.tree_map(lambda *a: jnp.stack(a), *params.layers))


@struct.dataclass
class TwoWeights:
    """Two weight sets of one model: a float target and its packed int4 copy for drafting.

    QuantSpec as published: the target runs its float weights ("fp"), the draft the 4-bit copy
    ("w4a16", "w4a8", "w4a4"). `forward` picks the set from the precision, so every decoding
    method runs on it unchanged; both sets share the model's shape and the KV cache.

    Attributes:
        target: float weights (precision "fp").
        draft: the same model with packed int4 linears (the int4 precisions).
    """

    target: Params
    draft: Params

    def for_precision(self, precision: str) -> Params:
        return self.target if precision == "fp" else self.draft


def truncate_layers(params: Params, k: int) -> Params:
    """The model's first `k` decoder blocks with its own embedding, final norm and head.

    A self-draft (`load(..., draft_model="self:k")`): the early-exit model shares the target's
    arrays. With per-layer arrays (`unstack_layers`, the CPU default) every array is shared,
    none copied; with stacked layers the first k slices of each layer array are a copy.
    """
    n = len(params.layers) if isinstance(params.layers, tuple) else None
    if n is None:
        n = jax.tree_util.tree_leaves(params.layers)[0].shape[0]
    if not (isinstance(k, int) and 1 <= k <= n):
        raise ValueError(f"a truncated draft keeps 1..{n} layers of this model, not {k!r}")
    if isinstance(params.layers, tuple):
        return params.replace(layers=params.layers[:k])
    return params.replace(layers=jax.tree_util.tree_map(lambda a: a[:k], params.layers))


@struct.dataclass
class WithDraftModel:
    """A target's weights beside a separate draft model with the same vocabulary.

    The draft is a smaller model or the target's first layers (`truncate_layers`); its config
    and quantization config are static (part of the pytree's structure). `forward` given this
    container runs the target; the draft-model decoding method
    (`qspec_jax.decoding.methods.draftmodel`) runs `draft` with `draft_cfg` over its own cache.

    Attributes:
        target: the target's weights (`Params` or `TwoWeights`).
        draft: the draft model's weights (float or int4 `Params`).
        draft_cfg: the draft model's `LlamaConfig` (static).
        draft_qcfg: the draft model's `QuantConfig` (static).
    """

    target: Params | TwoWeights
    draft: Params
    draft_cfg: LlamaConfig = struct.field(pytree_node=False)
    draft_qcfg: QuantConfig = struct.field(pytree_node=False)

    def for_precision(self, precision: str) -> Params:
        t = self.target
        return t.for_precision(precision) if isinstance(t, TwoWeights) else t

    @property
    def draft_precision(self) -> str:
        """The precision the draft model runs in: "w4a16" for int4 weights, else "fp"."""
        return "w4a16" if is_quantized(self.draft) else "fp"


def weight_kinds(params) -> frozenset[str]:
    """The weight kinds the parameters hold: {"float"}, {"int4"} or both (`TwoWeights`).

    A `WithDraftModel` adds "draft_model" to its target's kinds.
    """
    if isinstance(params, WithDraftModel):
        return weight_kinds(params.target) | {"draft_model"}
    if isinstance(params, TwoWeights):
        return frozenset({"float", "int4"})
    return frozenset({"int4"}) if is_quantized(params) else frozenset({"float"})


def map_weight_sets(fn, params):
    """Applies `fn` to each weight set (both of a `TwoWeights`, else the one).

    A `WithDraftModel` maps its target's sets and its draft (arrays they shared before are
    shared after only when `fn` returns them unchanged).
    """
    if isinstance(params, WithDraftModel):
        return params.replace(target=map_weight_sets(fn, params.target), draft=fn(params.draft))
    if isinstance(params, TwoWeights):
        return TwoWeights(target=fn(params.target), draft=fn(params.draft))
    return fn(params)
