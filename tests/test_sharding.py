"""Tensor parallelism on 6 emulated CPU devices (data 2 x model 3), proven in the compiled program.

XLA's host device count must be set before jax initialises, and other tests in the same pytest
process have already imported jax, so the multi-device checks run this file as a script in a
subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=6) that prints JSON results; the
test functions assert on them. The single-process tests cover the spec / divisibility logic.

The model is a small config with SmolLM2-135M's head structure (9 query heads on 3 KV heads,
head_dim 64, tied embedding) so that model = 3 splits heads, KV heads, the MLP and the
vocabulary exactly as for the real model; its int4 weights are asymmetric group-32 like the
GGUF's. The real model's figures come from `experiments/sharding_collectives.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

NDEV = 6
MAX_NEW = 10
PROMPT_LENS = [3, 16, 9, 12, 5, 7]
# (name, data, model, modes); "1dev" is the unsharded baseline on one device
PLAN = [
    ("1dev", 1, 1, ("w4a16",)),
    ("data2_model3", 2, 3, ("w4a16", "qspec", "quantspec")),
]
HLO_MODES = ("w4a16", "qspec", "quantspec")  # generation programs audited on data2_model3


def tp_config():
    from qspec_jax.config import preset

    return preset("tiny").replace(
        name="tiny-9h3kv", num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=256,
        intermediate_size=768, vocab_size=384, num_layers=2, tie_embeddings=True,
    )  # fmt: skip


# --------------------------------------------------------------------------- worker (subprocess)
def _worker(tmpdir: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qspec_jax.cache import KVCache, make_cache
    from qspec_jax.checkpoint import load_quantized, save_quantized
    from qspec_jax.config import QuantConfig
    from qspec_jax.decoding import DecodeConfig, generate
    from qspec_jax.model.llama import forward
    from qspec_jax.model.params import attach_q8_head, init_params
    from qspec_jax.quant import quantize_model
    from qspec_jax.sharding import (
        hlo_collectives,
        make_mesh,
        shard_batch,
        shard_cache,
        shard_params,
        weight_bytes,
    )

    t_start = time.perf_counter()
    out: dict = {"devices": jax.device_count(), "tokens": {}, "times": {}, "hlo": {},
                 "n_devices": {}, "errors": {}}  # fmt: skip
    cfg = tp_config()
    fparams = init_params(cfg, jax.random.PRNGKey(0))
    qparams, qcfg = quantize_model(fparams, cfg, "rtn", 32, symmetric=False, progress=False)
    qparams = attach_q8_head(qparams)  # None unless on the Q8_0 grid; kept for the real path
    b = len(PROMPT_LENS)
    toks = np.array(jax.random.randint(jax.random.PRNGKey(3), (b, 16), 3, 380), np.int32)
    for i, n in enumerate(PROMPT_LENS):
        toks[i, n:] = 0
    lens = np.asarray(PROMPT_LENS, np.int32)
    key = jax.random.PRNGKey(0)
    placed = {}

    def run(name, mesh, mode, params=None, audit=False):
        base = fparams if mode == "fp" else qparams
        params = base if params is None else params
        q = QuantConfig() if mode == "fp" else qcfg
        gamma = {"qspec": 3, "quantspec": 3}.get(mode, 0)
        dc = DecodeConfig(mode=mode, max_new_tokens=MAX_NEW, gamma=gamma)
        kind = "hier" if mode == "quantspec" else "float"
        cache = make_cache(kind, cfg, b, 64, residual=16, step_tokens=dc.tokens_per_step)
        args = (params, cache, jnp.asarray(toks), jnp.asarray(lens))
        if mesh is not None:
            pkey = (id(mesh), id(params))
            if pkey not in placed:
                placed[pkey] = shard_params(params, mesh, cfg)
            args = (placed[pkey], shard_cache(cache, mesh), shard_batch(toks, mesh),
                    shard_batch(lens, mesh))  # fmt: skip
        t0 = time.perf_counter()
        compiled = generate.lower(*args, key, cfg=cfg, qcfg=q, dc=dc).compile()
        if audit:
            total, per_dev = weight_bytes(args[0])
            out["hlo"][name] = {"ops": hlo_collectives(compiled.as_text()), "weight_bytes": total,
                                "per_device_weight_bytes": per_dev}  # fmt: skip
        st = compiled(*args, key)
        ntok, toks_out = jax.device_get((st.num_generated, st.out_tokens))
        out["times"][name] = round(time.perf_counter() - t0, 2)
        out["tokens"][name] = [toks_out[r, : ntok[r]].tolist() for r in range(b)]
        out["n_devices"][name] = len(st.out_tokens.sharding.device_set)

    meshes = {}
    for mesh_name, data, model, modes in PLAN:
        mesh = None if mesh_name == "1dev" else make_mesh(data * model, model_parallel=model)
        meshes[mesh_name] = mesh
        for mode in modes:
            audit = mesh_name == "data2_model3" and mode in HLO_MODES
            run(f"{mesh_name}/{mode}", mesh, mode, audit=audit)
    mesh = meshes["data2_model3"]
    placed[(id(mesh), id(fparams))] = shard_params(fparams, mesh, cfg)

    # checkpoints stay canonical: saved from tensor-parallel params, restored onto the mesh
    sharded = placed[(id(mesh), id(qparams))]
    path = os.path.join(tmpdir, "ck")
    save_quantized(path, cfg, sharded, qcfg, None)
    _, canon, _, _ = load_quantized(path)
    out["saved_canonical"] = all(
        np.array_equal(np.asarray(a), np.asarray(c))
        for a, c in zip(jax.tree_util.tree_leaves(qparams), jax.tree_util.tree_leaves(canon))
    )
    _, restored, _, _ = load_quantized(path, mesh=mesh)
    out["restored_equal"] = restored.mesh is mesh and all(
        np.array_equal(np.asarray(a), np.asarray(c))
        and a.sharding.is_equivalent_to(c.sharding, a.ndim)
        for a, c in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(sharded))
    )

    # row-parallel float sums: prefill logits against one device (w4a16 and fp)
    ids = jnp.asarray(toks)
    for mode, params, q in (("w4a16", qparams, qcfg), ("fp", fparams, QuantConfig())):

        @jax.jit
        def logits(p, ids, c, q=q, mode=mode):
            return forward(p, ids, c, cfg, q, mode)[0]

        ref = np.asarray(logits(params, ids, KVCache.init(cfg, b, 16)))
        got = np.asarray(logits(placed[(id(mesh), id(params))], shard_batch(ids, mesh),
                                shard_cache(KVCache.init(cfg, b, 16), mesh)))  # fmt: skip
        out[f"{mode}_logits_max_abs_diff"] = float(np.max(np.abs(ref - got)))
        out[f"{mode}_logits_scale"] = float(np.max(np.abs(ref)))

    for args in [(6, 4), (7, 1)]:
        try:
            make_mesh(*args)
        except ValueError as e:
            out["errors"][str(args)] = str(e)
    try:
        shard_params(qparams, make_mesh(6, 6), cfg)
    except ValueError as e:
        out["errors"]["model6"] = str(e)
    out["total_s"] = round(time.perf_counter() - t_start, 1)
    return out


# --------------------------------------------------------------------------- tests (parent)
def _subprocess_env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NDEV}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """Runs the worker once on 6 emulated CPU devices; returns its JSON results."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tmp = str(tmp_path_factory.mktemp("sharding"))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), tmp], env=_subprocess_env(), cwd=root,
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_six_devices_visible(multi):
    assert multi["devices"] == NDEV


@pytest.mark.parametrize("name", [f"{m}/{mode}" for m, _, _, modes in PLAN[1:] for mode in modes])
def test_sharded_greedy_tokens_equal_one_device(multi, name):
    base = multi["tokens"]["1dev/w4a16"]  # greedy qspec / quantspec reproduce w4a16 exactly
    assert all(len(t) == MAX_NEW for t in base)
    assert len({tuple(t) for t in base}) > 1  # the prompts matter
    assert multi["tokens"][name] == base
    assert multi["n_devices"][name] == NDEV  # really partitioned over all 6 devices


@pytest.mark.parametrize("mode", HLO_MODES)
def test_compiled_program_gathers_no_weights(multi, mode):
    """The generation program's collectives, read from the compiled HLO on data 2 x model 3.

    Bounds: all-gathered bytes (every all-gather op in the program, each counted once) at most
    5% of the weight bytes; every all-reduce at most one prefill activation of a device's rows
    ([rows, prompt, hidden] float32); every all-gather at most a device's logits of one step
    ([rows, gamma + 1, vocab] float32); no all-to-all, collective-permute or reduce-scatter
    (what GSPMD inserted when it resharded weights or the cache).
    """
    cfg = tp_config()
    h = multi["hlo"][f"data2_model3/{mode}"]
    ops = h["ops"]
    rows = len(PROMPT_LENS) // 2
    assert {o["op"] for o in ops} <= {"all-reduce", "all-gather"}, ops
    gathered = sum(o["bytes"] for o in ops if o["op"] == "all-gather")
    assert 0 < gathered <= 0.05 * h["weight_bytes"]
    reduces = [o["bytes"] for o in ops if o["op"] == "all-reduce"]
    assert reduces and max(reduces) <= rows * 16 * cfg.hidden_size * 4
    assert max(o["bytes"] for o in ops if o["op"] == "all-gather") <= rows * 4 * cfg.vocab_size * 4
    # each device holds about a third of the weights (norms are replicated: within 2%)
    assert h["per_device_weight_bytes"] <= h["weight_bytes"] / 3 * 1.02


def test_checkpoints_stay_canonical(multi):
    assert multi["saved_canonical"]  # tensor-parallel params are saved in the canonical layout
    assert multi["restored_equal"]  # and restored onto the mesh exactly as shard_params places them


def test_row_parallel_logits_close(multi):
    """Row-parallel psums reassociate float32 sums of 3 partial products: logits agree to a few
    float32 ulps of their scale (measured differences are printed in the JSON)."""
    for mode in ("w4a16", "fp"):
        diff, scale = multi[f"{mode}_logits_max_abs_diff"], multi[f"{mode}_logits_scale"]
        assert diff <= 1e-5 * max(1.0, scale), (mode, diff, scale)


def test_mesh_and_split_errors(multi):
    assert (
        "model_parallel=4 must be a positive integer that divides the device count 6"
        in multi["errors"]["(6, 4)"]
    )
    assert "asked for 7 devices but only 6" in multi["errors"]["(7, 1)"]
    assert "model_parallel=6 does not divide the model's num_heads (9)" in multi["errors"]["model6"]


# --------------------------------------------------------------------------- in-process
def test_make_mesh_one_device():
    import jax

    from qspec_jax.sharding import make_mesh

    mesh = make_mesh(1)
    assert mesh.axis_names == ("data", "model") and mesh.devices.shape == (1, 1)
    with pytest.raises(ValueError, match="divides the device count"):
        make_mesh(1, model_parallel=2)
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        make_mesh(jax.device_count() + 1)


def test_param_specs_and_divisibility(tiny_cfg, tiny_params):
    """Column / row / vocabulary-parallel specs; splits that break heads, tiles or groups refused."""
    from jax.sharding import PartitionSpec as P

    from qspec_jax.model.params import unstack_layers
    from qspec_jax.quant import quantize_model
    from qspec_jax.sharding import check_tensor_parallel, param_specs

    qp, _ = quantize_model(tiny_params, tiny_cfg, "rtn", 64, progress=False)
    s = param_specs(qp, 2)
    assert s.layers.wqkv.packed == P(None, None, "model") == s.layers.wqkv.scales
    assert s.layers.wo.packed == P(None, "model", None) == s.layers.wo.scales
    assert s.layers.w_down.packed == P(None, "model", None)
    assert s.embed == P("model", None) and s.lm_head == P(None, "model")
    assert s.layers.attn_norm == P() and s.final_norm == P()
    check_tensor_parallel(tiny_cfg, qp, 2)  # 4 heads / 2 KV heads, K = 128 / 256: fine
    with pytest.raises(ValueError, match="num_kv_heads"):
        check_tensor_parallel(tiny_cfg, qp, 4)  # 2 KV heads
    qg, _ = quantize_model(tiny_params, tiny_cfg, "rtn", 128, progress=False)
    with pytest.raises(ValueError, match=r"wo \(K = 128, group size 128\) into shards of 32 rows"):
        check_tensor_parallel(tiny_cfg.replace(num_kv_heads=4), qg, 4)  # not whole 64-row tiles
    pc, _ = quantize_model(tiny_params, tiny_cfg, "rtn", 0, progress=False)  # per channel
    u = param_specs(unstack_layers(pc), 2).layers  # per-layer arrays: no layer axis
    assert u[0].wo.packed == P("model", None) and u[0].wo.scales == P()  # [1, N] replicated
    assert u[0].wqkv.scales == P(None, "model")


if __name__ == "__main__":
    print("RESULT " + json.dumps(_worker(sys.argv[1])))
    sys.exit(0)


_ENGINE_SCRIPT = r"""
import json, jax
from qspec_jax.engine import Engine
from qspec_jax.model.params import init_params
from qspec_jax.quant import quantize_model
from qspec_jax.sharding import make_mesh
from tests.test_sharding import tp_config
cfg = tp_config()
qp, qc = quantize_model(init_params(cfg, jax.random.PRNGKey(0)), cfg, "rtn", 32, progress=False)
prompts = [[5, 6, 7], [9] * 14, [11, 12, 13, 14, 15]]
out = {}
for name, mesh in (("one", None), ("data2_model3", make_mesh(6, 3))):
    eng = Engine(cfg, qp, qc, mesh=mesh)  # unrolled per-layer weights, the Q8 head if any
    out[name] = eng.generate(prompts, mode="quantspec", max_new_tokens=8).tokens
print(json.dumps(out))
"""


def test_engine_with_mesh_gives_the_same_tokens():
    """`load(..., mesh=)` / `--devices`: the Engine (unrolled per-layer weights, QuantSpec with
    the hierarchical cache) on data 2 x model 3 gives the tokens of one device."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT], capture_output=True, text=True,
                       env=_subprocess_env(), cwd=root, timeout=1800)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len({tuple(t) for t in out["one"]}) > 1
    assert out["data2_model3"] == out["one"]
