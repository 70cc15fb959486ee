"""Collectives and per-device weight bytes of the tensor-parallel programs, read from compiled HLO.

For each mesh (data x model) this compiles, without running them:

* the decode forward of one token per row (`qspec_jax.model.llama.forward`, t = 1, the 30 layers
  unrolled as the engine runs them on CPU): its collectives are exactly those of one generated
  token of autoregressive W4A16 decoding (count and bytes per kind);
* the whole generation programs of w4a16, qspec (float cache) and quantspec (hierarchical
  cache) with stacked layers: their static collectives (an op in a loop body listed once);
  the all-gathered bytes are compared with the weight bytes;

and reports each device's addressable weight bytes. Shapes are SmolLM2-135M's as the GGUF loads
them (asymmetric group-32 int4 linears with float32 scales and mins, the tied float32 embedding
and its int8 Q8_0 head copy), built as abstract arrays: nothing is loaded or run here.
`--run` additionally loads the real model on one device and on data 2 x model 3 and measures
greedy tokens and tokens/s on the emulated devices (which share this machine's cores: no
speed-up is possible) and the prefill logit difference against one device.

    python -m experiments.sharding_collectives [--run] [--logits] [--meshes 1x1,2x1,1x3,2x3]
        [--out experiments/results/sharding_collectives.json]

XLA's host device count is set here (6 devices) before jax is imported.
"""

from __future__ import annotations

import argparse
import os
import sys

NDEV = 6
if "jax" not in sys.modules:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={NDEV}".strip()

MESHES = ((1, 1), (2, 1), (1, 3), (2, 3))  # (data, model)
MODES = (("w4a16", "float"), ("qspec", "float"), ("quantspec", "hier"))


def abstract_params(cfg, mesh, *, stacked: bool = True, q8_head: bool = True):
    """Shape/dtype structs of GGUF-loaded int4 params of `cfg` (with the mesh's shardings)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

    from qspec_jax.model.params import LayerParams, Params  # noqa: PLC0415
    from qspec_jax.quant.format import Q8Head, QuantizedWeight  # noqa: PLC0415
    from qspec_jax.sharding import param_specs  # noqa: PLC0415

    sds = jax.ShapeDtypeStruct
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    lead = (cfg.num_layers,) if stacked else ()

    def qw(k, n):
        return QuantizedWeight(
            sds((*lead, k // 2, n), jnp.uint8),
            sds((*lead, k // 32, n), jnp.float32),
            sds((*lead, k // 32, n), jnp.float32),
        )

    layer = LayerParams(
        attn_norm=sds((*lead, d), jnp.float32),
        wqkv=qw(d, cfg.q_size + 2 * cfg.kv_size),
        bqkv=None,
        wo=qw(cfg.q_size, d),
        mlp_norm=sds((*lead, d), jnp.float32),
        w_gate_up=qw(d, 2 * f),
        w_down=qw(f, d),
    )
    params = Params(
        embed=sds((v, d), jnp.float32),
        layers=layer if stacked else tuple(layer for _ in range(cfg.num_layers)),
        final_norm=sds((d,), jnp.float32),
        lm_head=None if cfg.tie_embeddings else sds((d, v), jnp.float32),
        head_q8=Q8Head(sds((v, d), jnp.int8), sds((v, d // 32), jnp.float32)) if q8_head else None,
        mesh=mesh,
    )
    if mesh is None:
        return params
    specs = param_specs(params, mesh)
    return jax.tree_util.tree_map(
        lambda a, s: sds(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
        params,
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec) or hasattr(x, "dtype"),
    )


def abstract_cache(kind, cfg, batch, capacity, mesh, step_tokens=1):
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415

    from qspec_jax.cache import make_cache  # noqa: PLC0415
    from qspec_jax.sharding import cache_on_mesh, cache_specs  # noqa: PLC0415

    cache = jax.eval_shape(
        lambda: make_cache(kind, cfg, batch, capacity, residual=32, step_tokens=step_tokens)
    )
    if mesh is None:
        return cache
    placed = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, s)),
        cache,
        cache_specs(cache),
    )
    return cache_on_mesh(placed, mesh)


def _rows(shape, dtype, mesh):
    import jax  # noqa: PLC0415

    from qspec_jax.sharding import batch_sharding  # noqa: PLC0415

    sh = None if mesh is None else batch_sharding(mesh, len(shape))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def summarize(ops: list[dict]) -> dict:
    """{kind: {"count", "bytes", "max_bytes"}} of `hlo_collectives` output."""
    out: dict = {}
    for o in ops:
        s = out.setdefault(o["op"], {"count": 0, "bytes": 0, "max_bytes": 0})
        s["count"] += 1
        s["bytes"] += o["bytes"]
        s["max_bytes"] = max(s["max_bytes"], o["bytes"])
    return out


def decode_token_collectives(cfg, qcfg, mesh, batch: int, capacity: int = 256) -> dict:
    """Collectives of one decode forward (t = 1, unrolled layers) and the weight bytes."""
    import functools  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from qspec_jax.model.llama import forward  # noqa: PLC0415
    from qspec_jax.sharding import hlo_collectives, weight_bytes  # noqa: PLC0415

    params = abstract_params(cfg, mesh, stacked=False)
    cache = abstract_cache("float", cfg, batch, capacity, mesh)
    toks = _rows((batch, 1), jnp.int32, mesh)
    fn = jax.jit(functools.partial(forward, cfg=cfg, qcfg=qcfg, precision="w4a16"))
    hlo = fn.lower(params, toks, cache).compile().as_text()
    total, per_dev = weight_bytes(params)
    return {
        "collectives": summarize(hlo_collectives(hlo)),
        "weight_bytes": total,
        "per_device_weight_bytes": per_dev,
    }


def program_collectives(cfg, qcfg, mesh, mode, kind, batch, prompt, max_new, params=None):
    """Static collectives of the whole generation program (stacked layers) and weight bytes."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from qspec_jax.decoding import DecodeConfig, generate  # noqa: PLC0415
    from qspec_jax.sharding import hlo_collectives, weight_bytes  # noqa: PLC0415

    dc = DecodeConfig(mode=mode, max_new_tokens=max_new, gamma=0 if mode == "w4a16" else 3)
    capacity = -(-(prompt + max_new + 8) // 64) * 64
    params = abstract_params(cfg, mesh) if params is None else params
    cache = abstract_cache(kind, cfg, batch, capacity, mesh, dc.tokens_per_step)
    args = (
        params,
        cache,
        _rows((batch, prompt), jnp.int32, mesh),
        _rows((batch,), jnp.int32, mesh),
        jax.random.PRNGKey(0),
    )
    hlo = generate.lower(*args, cfg=cfg, qcfg=qcfg, dc=dc).compile().as_text()
    ops = hlo_collectives(hlo)
    total, per_dev = weight_bytes(params)
    return {
        "ops": ops,
        "collectives": summarize(ops),
        "weight_bytes": total,
        "per_device_weight_bytes": per_dev,
    }


def run_tokens(mesh_shapes, n_tokens: int = 24) -> dict:
    """Real SmolLM2-135M (GGUF int4): greedy tokens, tokens/s and prefill logits per mesh."""
    import time  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import qspec_jax  # noqa: PLC0415
    from qspec_jax.cache import KVCache  # noqa: PLC0415
    from qspec_jax.model.llama import forward  # noqa: PLC0415
    from qspec_jax.sharding import make_mesh, shard_batch, shard_cache  # noqa: PLC0415

    prompts = ["def fibonacci(n):", "The capital of France is"]
    out: dict = {}
    ref_logits = None
    for data, model in mesh_shapes:
        mesh = None if data * model == 1 else make_mesh(data * model, model)
        eng = qspec_jax.load("smollm2-135m", quant="gguf", mesh=mesh)
        name = f"data{data}_model{model}"
        row: dict = {}
        for mode, kind in MODES:
            eng.generate(prompts, mode=mode, max_new_tokens=n_tokens, kv_cache=kind)  # compile
            t0 = time.perf_counter()
            r = eng.generate(prompts, mode=mode, max_new_tokens=n_tokens, kv_cache=kind)
            dt = time.perf_counter() - t0
            row[mode] = {"tokens": r.tokens, "tokens_per_s": round(sum(map(len, r.tokens)) / dt, 2)}
        ids = np.asarray([eng.encode([p])[0][:5] for p in prompts], np.int32)  # [2, 5]
        cache = KVCache.init(eng.config, 2, 64)
        if mesh is not None:
            cache, ids_in = shard_cache(cache, mesh), shard_batch(ids, mesh)
        else:
            ids_in = ids

        logits = jax.jit(
            lambda p, i, c, cfg=eng.config, q=eng.qconfig: forward(p, i, c, cfg, q, "w4a16")[0]
        )
        lg = np.asarray(jax.device_get(logits(eng.params, ids_in, cache)))
        if ref_logits is None:
            ref_logits = lg
        row["prefill_logits_max_abs_diff_vs_1dev"] = float(np.max(np.abs(lg - ref_logits)))
        row["prefill_logits_max_abs"] = float(np.max(np.abs(ref_logits)))
        out[name] = row
        print(name, {m: row[m]["tokens_per_s"] for m, _ in MODES}, flush=True)
    return out


def logits_difference(data: int = 2, model: int = 3) -> dict:
    """Real SmolLM2-135M (GGUF int4): w4a16 prefill logits on data x model against one device."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import qspec_jax  # noqa: PLC0415
    from qspec_jax.cache import KVCache  # noqa: PLC0415
    from qspec_jax.model.llama import forward  # noqa: PLC0415
    from qspec_jax.model.params import stack_layers  # noqa: PLC0415
    from qspec_jax.sharding import make_mesh, shard_batch, shard_cache, shard_params  # noqa: PLC0415

    mesh = make_mesh(data * model, model)
    eng = qspec_jax.load("smollm2-135m", quant="gguf")
    cfg, qcfg = eng.config, eng.qconfig
    params = stack_layers(eng.params)
    prompts = ["def fibonacci(n):", "The capital of France is"]
    ids = np.asarray([eng.encode([p])[0][:8] for p in prompts], np.int32)  # [2, 8]
    fn = jax.jit(lambda p, i, c: forward(p, i, c, cfg, qcfg, "w4a16")[0])
    ref = np.asarray(fn(params, jnp.asarray(ids), KVCache.init(cfg, 2, 16)))  # [2, 8, V]
    got = np.asarray(
        fn(
            shard_params(params, mesh, cfg),
            shard_batch(ids, mesh),
            shard_cache(KVCache.init(cfg, 2, 16), mesh),
        )
    )
    d = np.abs(ref - got)
    return {
        "mesh": f"data{data}_model{model}",
        "positions": int(ref.shape[0] * ref.shape[1]),
        "max_abs_diff": float(d.max()),
        "max_abs_logit": float(np.abs(ref).max()),
        "bit_identical_fraction": float((d == 0).mean()),
        "argmax_equal": bool((ref.argmax(-1) == got.argmax(-1)).all()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="experiments/results/sharding_collectives.json")
    ap.add_argument("--run", action="store_true", help="also run the real model per mesh")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument(
        "--logits", action="store_true", help="also compare real prefill logits (data 2 x model 3)"
    )
    ap.add_argument(
        "--meshes", default="1x1,2x1,1x3,2x3", help="comma-separated DATAxMODEL shapes (6 devices)"
    )
    args = ap.parse_args(argv)
    meshes = [tuple(int(x) for x in m.split("x")) for m in args.meshes.split(",") if m]

    from qspec_jax.bench.common import run_meta, write_json  # noqa: PLC0415
    from qspec_jax.config import preset  # noqa: PLC0415
    from qspec_jax.loading.gguf_loader import GGUF_INT4_QUANT  # noqa: PLC0415
    from qspec_jax.sharding import make_mesh  # noqa: PLC0415

    cfg, qcfg = preset("smollm2-135m"), GGUF_INT4_QUANT
    result: dict = {"meta": run_meta(), "config": cfg.name, "batch": args.batch, "meshes": {}}
    for data, model in meshes:
        mesh = make_mesh(data * model, model)
        name = f"data{data}_model{model}"
        row = {"decode_token": decode_token_collectives(cfg, qcfg, mesh, args.batch)}
        for mode, kind in MODES:
            p = program_collectives(cfg, qcfg, mesh, mode, kind, args.batch, 32, 16)
            p.pop("ops")
            row[f"program_{mode}"] = p
        result["meshes"][name] = row
        print(name, row["decode_token"], flush=True)
        write_json(args.out, result)  # after every mesh: a cut run keeps what it measured
    if args.logits:
        result["logits_vs_one_device"] = logits_difference()
        print(result["logits_vs_one_device"], flush=True)
    if args.run:
        result["run"] = run_tokens(((1, 1), (2, 3)))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
