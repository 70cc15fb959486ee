"""Device meshes and GSPMD shardings for the weights, the batch and the KV cache.

Nothing in the model or the decoding loop knows about devices: `jax.jit` partitions
`qspec_jax.decoding.loop.generate` (and `forward`) from the shardings of its inputs (GSPMD), so
sharding is only a matter of placing the arrays:

    mesh = make_mesh(model_parallel=2)             # ("data", "model") over all devices
    params = shard_params(params, mesh)            # tensor parallel over "model"
    cache = shard_cache(KVCache.init(cfg, batch, capacity), mesh)
    toks, lens = shard_batch(toks, mesh), shard_batch(lens, mesh)   # batch over "data"
    state = generate(params, cache, toks, lens, key, cfg=cfg, qcfg=qcfg, dc=dc)

Layout (`param_specs` gives the `PartitionSpec` of every leaf):

* column parallel over "model" (split N, the output features, of a [L, K, N] weight):
  ``wqkv`` and ``w_gate_up`` (float, or packed/scales/mins of a `QuantizedWeight`: N is never
  packed, so any split of N is byte-aligned), and ``bqkv`` along the same N;
* row parallel over "model" (split K, the input features): ``wo`` and ``w_down``. For packed
  int4 the packed axis K // 2 is split, and every shard must hold whole 64-row pack tiles and
  whole quantization groups: K must be a multiple of model * lcm(64, G). Scales / mins
  [L, K // G, N] are then split along K // G at the same row boundaries. A per-channel weight
  (G = K) splits its packed codes (K a multiple of 64 * model) and replicates its [L, 1, N]
  scales. A weight that does not divide is replicated whole (`param_specs` is the record);
* everything else (embedding, LM head, norms, the layer axis) is replicated.

The fused layouts are a trade-off. ``wqkv`` columns are [q heads | k heads | v heads] and
``w_gate_up`` columns are [gate | up]; a contiguous split of the fused N gives each device a
block that is not "its heads": with model = 2 on the tiny preset device 0 holds all of q and
device 1 all of k and v, and for gate/up device 0 holds the gate and device 1 the up
projection. The result is still exactly the partitioned computation of the same program (GSPMD
inserts the collectives the following split / reshape / elementwise product need), so it is
correct, but it costs an all-to-all / all-gather per block that a head-consistent (Megatron)
layout would not. Head-consistent sharding needs a different parameter layout -- wqkv columns
interleaved per shard as [q_i | k_i | v_i] for i in 0..model-1, gate/up as [gate_i | up_i] --
and the model's `jnp.split` done per shard (reshape N to [model, N / model] first); the model
code splits the global fused axis, so that layout is not used here.

Row-parallel matmuls sum partial products across devices, so their float rounding can differ
from a single device in the last bits (integer W4A4 / W4A8 dots accumulate in int32 and are
exact until the float epilogue). Data parallelism changes nothing numerically except through
XLA's choice of matmul kernel for the per-device batch.

Multi-host (NOT tested here: only one host with emulated CPU devices was available). Every
process runs the same program:

    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    mesh = make_mesh(model_parallel=m)   # jax.devices() is then the GLOBAL device list
    params = shard_params(params, mesh)  # each process holds the same full host copy
    local = toks_of_this_process         # [global_batch / process_count, T]
    toks = jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)

`shard_params` uses `jax.device_put`, which places the addressable shards of each process from
its own full copy (every process must pass identical values). The batch must be built with
`jax.make_array_from_process_local_data` (each process passes only its rows); `shard_batch`
calls it automatically when `jax.process_count() > 1`. The mesh should keep the "model" axis
inside a host (devices are taken in `jax.devices()` order, host-major), so tensor-parallel
collectives stay on the fast intra-host links and only data-parallel traffic crosses hosts.
Outputs are global arrays: read them with `jax.experimental.multihost_utils.process_allgather`
or per process via `addressable_shards`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels.int4 import PACK_TILE
from qspec_jax.model.params import LayerParams, Params
from qspec_jax.quant.format import Q8Head, QuantizedWeight

AXES = ("data", "model")
COLUMN_PARALLEL = ("wqkv", "w_gate_up")
ROW_PARALLEL = ("wo", "w_down")

__all__ = [
    "AXES",
    "batch_sharding",
    "make_mesh",
    "param_specs",
    "replicated",
    "shard_batch",
    "shard_cache",
    "shard_params",
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


def _column_spec(shape: tuple[int, ...], m: int) -> PartitionSpec:
    """Split the last axis (N) over "model" when it divides, else replicate."""
    if m > 1 and shape[-1] % m == 0:
        return PartitionSpec(*([None] * (len(shape) - 1)), "model")
    return PartitionSpec()


def _axis_spec(ndim: int, axis: int) -> PartitionSpec:
    spec: list[Any] = [None] * ndim
    spec[axis] = "model"
    return PartitionSpec(*spec)


def _weight_specs(name: str, w: Any, m: int) -> Any:
    """The PartitionSpec pytree of one linear weight (float array or QuantizedWeight)."""
    quant = isinstance(w, QuantizedWeight)
    arrays = [w.packed, w.scales, w.mins] if quant else [w]

    def same(spec):
        if not quant:
            return spec
        return QuantizedWeight(spec, spec, None if w.mins is None else spec)

    if m == 1:
        return same(PartitionSpec())
    if name in COLUMN_PARALLEL:
        if all(a.shape[-1] % m == 0 for a in arrays if a is not None):
            return same(_column_spec(arrays[0].shape, m))
        return same(PartitionSpec())
    # row parallel: split K
    if not quant:
        nd = len(w.shape)
        return _axis_spec(nd, nd - 2) if w.shape[-2] % m == 0 else PartitionSpec()
    k, groups = w.in_features, w.scales.shape[-2]
    g = k // groups
    if groups == 1:  # per channel: split the codes in whole tiles, replicate the [.., 1, N] scales
        if k % (m * PACK_TILE):
            return same(PartitionSpec())
        code_spec = _axis_spec(len(w.packed.shape), len(w.packed.shape) - 2)
        return QuantizedWeight(code_spec, PartitionSpec(), None if w.mins is None else PartitionSpec())
    if k % (m * math.lcm(PACK_TILE, g)):
        return same(PartitionSpec())
    spec = _axis_spec(len(w.packed.shape), len(w.packed.shape) - 2)
    return same(spec)


def param_specs(params: Params, mesh: Mesh | int) -> Params:
    """The PartitionSpec of every array leaf of `params` (same pytree structure, None kept).

    Args:
        params: float or int4 parameters, with stacked layers or a tuple of per-layer
            `LayerParams` (`qspec_jax.model.params.unstack_layers`, the engine's CPU layout).
        mesh: the mesh, or just the size of its "model" axis.
    """
    m = mesh if isinstance(mesh, int) else mesh.shape["model"]
    rep = PartitionSpec()
    if isinstance(params.layers, tuple):  # per-layer arrays (`unstack_layers`): same rules each
        layers = tuple(_layer_specs(lp, m) for lp in params.layers)
    else:
        layers = _layer_specs(params.layers, m)
    return Params(
        embed=rep,
        layers=layers,
        final_norm=rep,
        lm_head=None if params.lm_head is None else rep,
        head_q8=None if params.head_q8 is None else Q8Head(codes=rep, scales=rep),
    )


def _layer_specs(lp: LayerParams, m: int) -> LayerParams:
    """Specs of one LayerParams, stacked [L, ...] or a single layer (rules use the last 2 axes)."""
    rep = PartitionSpec()
    wqkv_spec = _weight_specs("wqkv", lp.wqkv, m)
    if lp.bqkv is None:
        bqkv_spec = None
    else:
        # the bias follows the columns of wqkv
        col = wqkv_spec.packed if isinstance(wqkv_spec, QuantizedWeight) else wqkv_spec
        bqkv_spec = _column_spec(lp.bqkv.shape, m) if col != rep else rep
    return LayerParams(
        attn_norm=rep,
        wqkv=wqkv_spec,
        bqkv=bqkv_spec,
        wo=_weight_specs("wo", lp.wo, m),
        mlp_norm=rep,
        w_gate_up=_weight_specs("w_gate_up", lp.w_gate_up, m),
        w_down=_weight_specs("w_down", lp.w_down, m),
    )


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def shard_params(params: Params, mesh: Mesh) -> Params:
    """Places `params` on `mesh`: tensor parallel over "model", replicated over "data".

    Works for float and `QuantizedWeight` linears (see the module docstring for the layout and
    `param_specs` for the spec of each leaf). Returns new arrays; `params` is unchanged.
    """
    specs = param_specs(params, mesh)
    shardings = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
    return jax.device_put(params, shardings)


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


def shard_cache(cache, mesh: Mesh, shard_heads: bool = True):
    """Places a `KVCache`: batch over "data" and, when they divide, KV heads over "model".

    k / v are [layers, batch, capacity, kv_heads, head_dim]; lengths [batch]. Sharding the heads
    over "model" keeps the cache memory per device at 1 / (data * model); it is correct whatever
    the weights' layout (GSPMD reshards), and `shard_heads=False` replicates them instead.
    """
    d, m = mesh.shape["data"], mesh.shape["model"]
    b, kvh = cache.k.shape[1], cache.k.shape[3]
    if b % d:
        raise ValueError(
            f"batch size {b} is not a multiple of the data-parallel size {d}; pad the batch"
        )
    heads = "model" if shard_heads and m > 1 and kvh % m == 0 else None
    kv = NamedSharding(mesh, PartitionSpec(None, "data", None, heads, None))
    return cache.replace(
        k=jax.device_put(cache.k, kv),
        v=jax.device_put(cache.v, kv),
        lengths=jax.device_put(cache.lengths, NamedSharding(mesh, PartitionSpec("data"))),
    )
