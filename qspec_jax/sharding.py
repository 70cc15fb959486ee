"""Device meshes and Megatron-style tensor parallelism through the int4 kernels.

With a mesh, every forward runs under `jax.shard_map`: each device runs the unchanged layer code
on its own shard with a *local* config (num_heads / model, num_kv_heads / model,
intermediate_size / model), so `qspec_jax.model.linear.linear` calls the same kernels (the CPU
XLA-FFI kernels, Pallas, or XLA's reference) on local operands; no weight is ever gathered.

    mesh = make_mesh(model_parallel=3)             # ("data", "model") over all devices
    params = shard_params(params, mesh, cfg)       # converts the layout once, then places it
    cache = shard_cache(KVCache.init(cfg, batch, capacity), mesh)   # any cache format
    toks, lens = shard_batch(toks, mesh), shard_batch(lens, mesh)   # batch over "data"
    state = generate(params, cache, toks, lens, key, cfg=cfg, qcfg=qcfg, dc=dc)

The decoding loop and the methods know nothing about devices: `shard_params` records the mesh
in the static field `Params.mesh`, and `qspec_jax.model.llama.forward` wraps itself in
`shard_map` when it is set (no mesh: the single-device code, unchanged). Everything outside the
forward (sampling, acceptance, cache commits and the hierarchical cache's quantization) is
partitioned by GSPMD from the input shardings; every such op is per row or per KV head.

Layout (`param_specs`; `tp_layout` converts, `canonical_params` converts back):

* column parallel over "model" (split N): ``wqkv`` with its columns re-ordered once at load as
  [q_0 | k_0 | v_0 | q_1 | k_1 | v_1 | ...] (device i holds query heads i*H/m.. and KV heads
  i*KV/m.., the GQA groups stay whole), ``w_gate_up`` as [gate_0 | up_0 | gate_1 | up_1 | ...],
  and ``bqkv`` like wqkv. For a `QuantizedWeight` the packed codes, scales and mins move
  together (N is never packed);
* row parallel over "model" (split K): ``wo`` and ``w_down``; each device's partial product is
  summed by one `psum` (all-reduce of the [batch, t, D] activations) per projection. Packed int4
  needs whole 64-row pack tiles and whole quantization groups per shard (K / model a multiple
  of lcm(64, G)); per-channel scales [.., 1, N] are replicated;
* vocabulary parallel: ``embed`` [V, D] split over V (each device looks up the ids in its
  range, zeros elsewhere, one `psum`), ``lm_head`` [D, V] and the Q8_0 head codes split over V;
  each device computes its V / model logits and one all-gather assembles the [batch, t, V]
  logits (activation-sized);
* norms replicated; every weight replicated over "data" (data parallel over the batch);
* KV caches (the float `KVCache` and the hierarchical `HierKVCache`): batch over "data", KV
  heads over "model" (`cache_specs`).

Anything that does not divide (heads, KV heads, F, V, pack tiles, groups) is refused with a
ValueError naming it: there is no replicated fallback. QuaRot-rotated models are refused with
model > 1 (their online Hadamard spans the whole attention width).

Checkpoints stay canonical: `load_quantized(..., mesh=)` restores the canonical arrays and
converts them with `shard_params`, and `save_quantized` converts tensor-parallel params back
with `canonical_params` before writing.

Numerics: the embedding psum adds exact zeros, column-parallel matmuls and local attention are
the same operations on fewer columns/heads, but the row-parallel psums add model partial sums
of K / model rows each, which can change float rounding in the last bits compared with one
device's single K-long accumulation (integer W4A4 / W4A8 dots accumulate in int32 and are exact
until their float epilogue, which is per shard). The tests measure the logit difference and
check greedy tokens.

Multi-process (`experiments/sharding_multiprocess.py` runs 2 processes on one machine with
gloo CPU collectives):

    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU only
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    mesh = make_mesh(model_parallel=m)   # jax.devices() is then the GLOBAL device list
    params = shard_params(params, mesh, cfg)   # each process holds the same full host copy
    toks = shard_batch(local_rows, mesh)       # make_array_from_process_local_data

The mesh should keep the "model" axis inside a host (devices are taken in `jax.devices()`
order, host-major) so tensor-parallel all-reduces stay on intra-host links.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels.int4 import PACK_TILE
from qspec_jax.config import LlamaConfig
from qspec_jax.model.params import LayerParams, Params
from qspec_jax.quant.format import Q8Head, QuantizedWeight

AXES = ("data", "model")
COLUMN_PARALLEL = ("wqkv", "w_gate_up")
ROW_PARALLEL = ("wo", "w_down")

__all__ = [
    "AXES",
    "batch_sharding",
    "cache_on_mesh",
    "cache_specs",
    "canonical_params",
    "check_tensor_parallel",
    "local_config",
    "make_mesh",
    "param_specs",
    "replicated",
    "shard_batch",
    "shard_cache",
    "shard_params",
    "tp_layout",
]


def make_mesh(devices: int | None = None, model_parallel: int = 1) -> Mesh:
    """A 2-D mesh ("data", "model") of shape (devices // model_parallel, model_parallel).

    Args:
        devices: how many devices to use, the first ones of `jax.devices()` (None = all).
        model_parallel: size of the tensor-parallel "model" axis; must divide `devices`.

    Raises:
        ValueError: a count that is not positive, more devices than exist, or a model_parallel
            that does not divide the device count.
    """
    available = jax.devices()
    n = len(available) if devices is None else devices
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"devices must be a positive integer or None, got {devices!r}")
    if n > len(available):
        raise ValueError(
            f"asked for {n} devices but only {len(available)} are visible "
            f"({available[0].platform}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
            "before jax is imported"
        )
    if not isinstance(model_parallel, int) or model_parallel < 1 or n % model_parallel:
        raise ValueError(
            f"model_parallel={model_parallel!r} must be a positive integer that divides the device "
            f"count {n}"
        )
    grid = np.asarray(available[:n], dtype=object).reshape(n // model_parallel, model_parallel)
    return Mesh(grid, AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _axis_spec(ndim: int, axis: int) -> PartitionSpec:
    spec: list[Any] = [None] * ndim
    spec[axis % ndim] = "model"
    return PartitionSpec(*spec)


def _weight_specs(name: str, w: Any) -> Any:
    """The PartitionSpec pytree of one linear weight (float array or QuantizedWeight)."""
    if name in COLUMN_PARALLEL:  # split N (the last axis) of every array
        if not isinstance(w, QuantizedWeight):
            return _axis_spec(len(w.shape), -1)
        spec = _axis_spec(len(w.packed.shape), -1)
        return QuantizedWeight(spec, spec, None if w.mins is None else spec)
    if not isinstance(w, QuantizedWeight):  # row parallel: split K
        return _axis_spec(len(w.shape), -2)
    code_spec = _axis_spec(len(w.packed.shape), -2)
    if w.scales.shape[-2] == 1:  # per channel: the [.., 1, N] scales apply to every shard
        scale_spec = PartitionSpec()
    else:
        scale_spec = code_spec
    return QuantizedWeight(code_spec, scale_spec, None if w.mins is None else scale_spec)


def param_specs(params: Params, mesh: Mesh | int) -> Params:
    """The PartitionSpec of every array leaf of tensor-parallel `params` (None kept).

    Args:
        params: float or int4 parameters, with stacked layers or a tuple of per-layer
            `LayerParams` (`qspec_jax.model.params.unstack_layers`, the engine's CPU layout).
        mesh: the mesh, or just the size of its "model" axis (the specs are the same for any
            size; `check_tensor_parallel` says whether a size divides the model).
    """
    del mesh  # same specs for every model size (model = 1 splits nothing)
    rep = PartitionSpec()
    if isinstance(params.layers, tuple):  # per-layer arrays (`unstack_layers`): same rules each
        layers = tuple(_layer_specs(lp) for lp in params.layers)
    else:
        layers = _layer_specs(params.layers)
    vocab_rows = PartitionSpec("model", None)  # [V, D] / [V, D // 32]: split V
    return Params(
        embed=vocab_rows,
        layers=layers,
        final_norm=rep,
        lm_head=None if params.lm_head is None else PartitionSpec(None, "model"),  # [D, V]
        head_q8=None if params.head_q8 is None else Q8Head(codes=vocab_rows, scales=vocab_rows),
        mesh=params.mesh,
    )


def _layer_specs(lp: LayerParams) -> LayerParams:
    """Specs of one LayerParams, stacked [L, ...] or a single layer (rules use the last 2 axes)."""
    rep = PartitionSpec()
    return LayerParams(
        attn_norm=rep,
        wqkv=_weight_specs("wqkv", lp.wqkv),
        bqkv=None if lp.bqkv is None else _axis_spec(len(lp.bqkv.shape), -1),
        wo=_weight_specs("wo", lp.wo),
        mlp_norm=rep,
        w_gate_up=_weight_specs("w_gate_up", lp.w_gate_up),
        w_down=_weight_specs("w_down", lp.w_down),
    )


def check_tensor_parallel(cfg: LlamaConfig, params: Params, m: int) -> None:
    """Raises ValueError when `m` devices cannot split this model head-consistently.

    Needs m to divide the query heads, the KV heads, the MLP width and the vocabulary, and (for
    int4 row-parallel weights) each shard to hold whole 64-row pack tiles and whole groups.
    """
    if m == 1:
        return
    sizes = {
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
    }
    for what, n in sizes.items():
        if n % m:
            raise ValueError(
                f"model_parallel={m} does not divide the model's {what} ({n}); choose a "
                "model_parallel that divides num_heads, num_kv_heads, intermediate_size and "
                "vocab_size"
            )
    layers = params.layers if isinstance(params.layers, tuple) else (params.layers,)
    for name in ROW_PARALLEL:
        w = getattr(layers[0], name)
        if not isinstance(w, QuantizedWeight):
            continue
        k, groups = w.in_features, w.scales.shape[-2]
        unit = PACK_TILE if groups == 1 else math.lcm(PACK_TILE, k // groups)
        if k % (m * unit):
            raise ValueError(
                f"model_parallel={m} splits {name} (K = {k}, group size {k // groups}) into "
                f"shards of {k // m} rows, not a multiple of {unit} (whole {PACK_TILE}-row int4 "
                "pack tiles and whole quantization groups); choose a smaller model_parallel"
            )


def local_config(cfg: LlamaConfig, m: int) -> LlamaConfig:
    """The config one of `m` tensor-parallel devices runs: its heads and its MLP columns.

    (vocab_size stays global: the local head's width comes from the weights' shapes.)
    """
    if m == 1:
        return cfg
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // m,
        num_kv_heads=cfg.num_kv_heads // m,
        intermediate_size=cfg.intermediate_size // m,
    )


def _column_orders(cfg: LlamaConfig, m: int) -> dict[str, np.ndarray]:
    """Column permutations canonical -> tensor-parallel of the fused N axes (`tp_layout`)."""
    q, kv, f = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    qi, kvi, fi = q // m, kv // m, f // m
    qkv = np.concatenate(
        [
            np.concatenate(
                [
                    np.arange(i * qi, (i + 1) * qi),  # q heads of shard i
                    q + np.arange(i * kvi, (i + 1) * kvi),  # its k heads
                    q + kv + np.arange(i * kvi, (i + 1) * kvi),  # its v heads
                ]
            )
            for i in range(m)
        ]
    )
    gate_up = np.concatenate(
        [np.concatenate([np.arange(i * fi, (i + 1) * fi), f + np.arange(i * fi, (i + 1) * fi)])
         for i in range(m)]
    )  # fmt: skip
    return {"wqkv": qkv, "bqkv": qkv, "w_gate_up": gate_up}


def _permute_columns(params: Params, orders: dict[str, np.ndarray]) -> Params:
    def layer(lp: LayerParams) -> LayerParams:
        def cols(x, order):
            if x is None:
                return None
            if isinstance(x, QuantizedWeight):
                return jax.tree_util.tree_map(lambda a: cols(a, order), x)
            return np.take(np.asarray(jax.device_get(x)), order, axis=-1)

        return lp.replace(
            **{name: cols(getattr(lp, name), order) for name, order in orders.items()}
        )

    if isinstance(params.layers, tuple):
        return params.replace(layers=tuple(layer(lp) for lp in params.layers))
    return params.replace(layers=layer(params.layers))


def tp_layout(params: Params, cfg: LlamaConfig, m: int) -> Params:
    """Re-orders wqkv / bqkv / w_gate_up columns so a contiguous split of N over `m` devices
    gives each its own q, k, v heads and gate, up columns (host arrays; see the module doc)."""
    if m == 1:
        return params
    return _permute_columns(params, _column_orders(cfg, m))


def canonical_params(params: Params, cfg: LlamaConfig) -> Params:
    """Tensor-parallel params (from `shard_params`) back in the canonical layout, on the host,
    without a mesh (what checkpoints store). Params without a mesh are returned unchanged."""
    if params.mesh is None:
        return params
    m = params.mesh.shape["model"]
    inverse = {k: np.argsort(v) for k, v in _column_orders(cfg, m).items()}
    return (
        _permute_columns(params, inverse).replace(mesh=None) if m > 1 else params.replace(mesh=None)
    )


def shard_params(params: Params, mesh: Mesh, cfg: LlamaConfig) -> Params:
    """Tensor-parallel params on `mesh`: converted once to the head-consistent layout, placed
    with `param_specs` (each device holds about 1 / model of the weight bytes), and marked with
    the mesh (`Params.mesh`) so `forward` runs under `shard_map`.

    Works for float and `QuantizedWeight` linears, stacked or per-layer. `params` must be in the
    canonical layout (as loaded or restored); returns new arrays.

    Raises:
        ValueError: the model does not split over the mesh's "model" axis
            (`check_tensor_parallel`), or `params` already carry a mesh.
    """
    if params.mesh is not None:
        raise ValueError("shard_params: these params are already sharded (Params.mesh is set)")
    m = mesh.shape["model"]
    check_tensor_parallel(cfg, params, m)
    params = tp_layout(params, cfg, m).replace(mesh=mesh)
    specs = param_specs(params, mesh)
    return jax.tree_util.tree_map(lambda a, s: _place(a, NamedSharding(mesh, s)), params, specs)


def _place(a, sharding: NamedSharding):
    """`a` placed with `sharding`; with several processes each builds its addressable shards
    from its own full host copy (every process must hold the same values)."""
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    host = np.asarray(jax.device_get(a))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def batch_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    """NamedSharding splitting `axis` of an ndim-array over "data" (other axes replicated)."""
    spec: list[Any] = [None] * ndim
    spec[axis] = "data"
    return NamedSharding(mesh, PartitionSpec(*spec))


def shard_batch(x, mesh: Mesh, axis: int = 0):
    """Places an array (or a pytree of arrays) with its batch axis `axis` split over "data".

    The batch size must be a multiple of the "data" axis size (pad the batch: the engine's batch
    buckets are powers of two). With several processes, `x` is this process's rows and the
    global array is assembled with `jax.make_array_from_process_local_data`.

    Raises:
        ValueError: the batch does not divide over the "data" axis.
    """
    d = mesh.shape["data"]
    multi = jax.process_count() > 1

    def put(a):
        a = a if isinstance(a, jax.Array) else np.asarray(a)
        if a.ndim <= axis:
            raise ValueError(f"shard_batch: array of shape {a.shape} has no batch axis {axis}")
        local_d = d // jax.process_count() if multi else d
        if a.shape[axis] % max(local_d, 1):
            raise ValueError(
                f"batch size {a.shape[axis]} is not a multiple of the data-parallel size {d}; "
                "pad the batch"
            )
        sh = batch_sharding(mesh, a.ndim, axis)
        if multi:
            return jax.make_array_from_process_local_data(sh, np.asarray(a))
        return jax.device_put(a, sh)

    return jax.tree_util.tree_map(put, x)


def cache_specs(cache) -> Any:
    """PartitionSpecs of a cache (any format): batch over "data", KV heads over "model".

    Every array of `KVCache` and `HierKVCache` is either per row ([batch]: lengths, q_len,
    buf_start) or [layers, batch, positions, kv_heads, ...] (keys, values, codes, scales).
    """

    def spec(a):
        if a.ndim == 1:
            return PartitionSpec("data")
        if a.ndim < 4:
            raise ValueError(f"cache_specs: unexpected cache array of shape {a.shape}")
        return PartitionSpec(None, "data", None, "model", *([None] * (a.ndim - 4)))

    return jax.tree_util.tree_map(spec, cache)


def shard_cache(cache, mesh: Mesh):
    """Places a cache (`KVCache` or `HierKVCache`) with `cache_specs`: batch over "data", KV
    heads over "model" (memory per device 1 / (data * model)).

    Raises:
        ValueError: the batch or the KV heads do not divide over the mesh.
    """
    d, m = mesh.shape["data"], mesh.shape["model"]
    leaves = jax.tree_util.tree_leaves(cache)
    b = cache.batch
    kvh = next(a.shape[3] for a in leaves if a.ndim >= 4)
    if b % d:
        raise ValueError(
            f"batch size {b} is not a multiple of the data-parallel size {d}; pad the batch"
        )
    if kvh % m:
        raise ValueError(f"model_parallel={m} does not divide the cache's {kvh} KV heads")
    specs = cache_specs(cache)
    placed = jax.tree_util.tree_map(lambda a, s: _place(a, NamedSharding(mesh, s)), cache, specs)
    return cache_on_mesh(placed, mesh)


def cache_on_mesh(cache, mesh: Mesh):
    """Records `mesh` in a hierarchical cache's static layout (its bookkeeping then runs per
    shard, see `HierLayout.mesh`); other formats are returned unchanged. `shard_cache` calls it;
    use it directly for abstract caches (`jax.ShapeDtypeStruct` leaves)."""
    if hasattr(cache, "layout"):
        return cache.replace(layout=dataclasses.replace(cache.layout, mesh=mesh))
    return cache


# --------------------------------------------------------------------------- compiled-program audit
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip
_COLLECTIVE_RE = re.compile(
    r"=\s*(?P<type>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\("
)
_SHAPE_RE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


def hlo_collectives(hlo_text: str) -> list[dict[str, Any]]:
    """The collective operations of a compiled HLO module (`compiled.as_text()`), one per op.

    Each entry: {"op": "all-reduce" | "all-gather" | ..., "bytes": bytes of its result,
    "shapes": the result shapes}. An async "-start" op counts once (its "-done" is skipped);
    for an async all-gather, whose result tuple holds (operand, result), only the result counts.
    Static: an op inside a loop body is listed once, however many times the loop runs.
    """
    out = []
    for line in hlo_text.splitlines():
        mt = _COLLECTIVE_RE.search(line)
        if mt is None:
            continue
        shapes = [
            (dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in _SHAPE_RE.findall(mt.group("type"))
            if dt in _DTYPE_BYTES
        ]
        if mt.group("start") and mt.group("op") == "all-gather":
            shapes = shapes[-1:]
        nbytes = sum(_DTYPE_BYTES[dt] * math.prod(s) for dt, s in shapes)
        out.append(
            {"op": mt.group("op"), "bytes": int(nbytes), "shapes": [list(s) for _, s in shapes]}
        )
    return out


def weight_bytes(params: Params) -> tuple[int, int]:
    """(total bytes of the weights, the largest bytes any one device holds of them).

    Works on placed arrays and on `jax.ShapeDtypeStruct`s carrying a sharding; the int8
    head copy (`head_q8`) counts like any weight.
    """
    total, per_device = 0, {}
    for a in jax.tree_util.tree_leaves(params):
        nbytes = math.prod(a.shape) * np.dtype(a.dtype).itemsize
        total += nbytes
        sh = getattr(a, "sharding", None)
        if sh is None:
            per_device[None] = per_device.get(None, 0) + nbytes
            continue
        shard = math.prod(sh.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
        for d in sh.device_set:
            per_device[d] = per_device.get(d, 0) + shard
    return int(total), int(max(per_device.values()))
