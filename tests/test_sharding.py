"""Sharding on 8 emulated CPU devices: greedy generation under GSPMD equals one device.

XLA's host device count must be set before jax initialises, and other tests in the same pytest
process have already imported jax, so the multi-device checks run this file as a script in a
subprocess (XLA_FLAGS=--xla_force_host_platform_device_count=8) that prints JSON results; the
test functions assert on them. The single-process tests cover the mesh / spec logic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

NDEV = 8
MAX_NEW = 12
PROMPT_LENS = [3, 16, 9, 12, 5, 7, 16, 1]
# (name, data, model, modes); "1dev" is the unsharded baseline on one device
PLAN = [
    ("1dev", 1, 1, ("fp", "w4a16", "qspec")),
    ("data8", 8, 1, ("w4a16", "qspec")),
    ("data4_model2", 4, 2, ("fp", "w4a16", "qspec")),
    ("model8", 1, 8, ("w4a16",)),
]


# --------------------------------------------------------------------------- worker (subprocess)
def _worker(tmpdir: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qspec_jax.cache import KVCache
    from qspec_jax.checkpoint import load_quantized, save_quantized
    from qspec_jax.config import QuantConfig, preset
    from qspec_jax.decoding import DecodeConfig, generate
    from qspec_jax.model.llama import forward
    from qspec_jax.model.params import init_params, unstack_layers
    from qspec_jax.quant import quantize_model
    from qspec_jax.sharding import make_mesh, param_specs, shard_batch, shard_cache, shard_params

    t_start = time.perf_counter()
    out: dict = {"devices": jax.device_count(), "tokens": {}, "times": {}, "specs": {},
                 "out_spec": {}, "n_devices": {}, "errors": {}}
    cfg = preset("tiny")
    fparams = init_params(cfg, jax.random.PRNGKey(0))
    qparams, qcfg = quantize_model(fparams, cfg, "rtn", 32, progress=False)

    toks = np.array(jax.random.randint(jax.random.PRNGKey(3), (len(PROMPT_LENS), 16), 3, 250), np.int32)
    for i, n in enumerate(PROMPT_LENS):
        toks[i, n:] = 0
    lens = np.asarray(PROMPT_LENS, np.int32)
    key = jax.random.PRNGKey(0)

    def run(name, mesh, mode, params=None):
        if params is None:
            params = fparams if mode == "fp" else qparams
        q = QuantConfig() if mode == "fp" else qcfg
        dc = DecodeConfig(mode=mode, max_new_tokens=MAX_NEW, gamma=3 if mode == "qspec" else 0)
        cache = KVCache.init(cfg, len(PROMPT_LENS), 64)
        if mesh is None:
            args = (params, cache, jnp.asarray(toks), jnp.asarray(lens))
        else:
            if not isinstance(params.embed.sharding, jax.sharding.NamedSharding):
                params = shard_params(params, mesh)
            args = (params, shard_cache(cache, mesh), shard_batch(toks, mesh),
                    shard_batch(lens, mesh))
            layers = param_specs(params, mesh).layers
            out["specs"][name] = str(layers[-1] if isinstance(layers, tuple) else layers)
        t0 = time.perf_counter()
        st = generate(*args, key, cfg=cfg, qcfg=q, dc=dc)
        ntok, toks_out = jax.device_get((st.num_generated, st.out_tokens))
        out["times"][name] = round(time.perf_counter() - t0, 2)
        out["tokens"][name] = [toks_out[b, : ntok[b]].tolist() for b in range(len(PROMPT_LENS))]
        sh = st.out_tokens.sharding
        out["out_spec"][name] = str(getattr(sh, "spec", sh))
        out["n_devices"][name] = len(sh.device_set)

    meshes = {}
    for mesh_name, data, model, modes in PLAN:
        mesh = None if mesh_name == "1dev" else make_mesh(data * model, model_parallel=model)
        meshes[mesh_name] = mesh
        for mode in modes:
            run(f"{mesh_name}/{mode}", mesh, mode)

    # a checkpoint restored straight into the data4_model2 shardings generates the same tokens
    mesh = meshes["data4_model2"]
    path = os.path.join(tmpdir, "ck")
    save_quantized(path, cfg, qparams, qcfg, None)
    _, restored, _, _ = load_quantized(path, mesh=mesh)
    want = shard_params(qparams, mesh)
    out["restored_shardings_match"] = all(
        a.sharding.is_equivalent_to(b.sharding, a.ndim)
        for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(want))
    )
    run("restored_data4_model2/w4a16", mesh, "w4a16", restored)
    # the engine's CPU layout: a tuple of per-layer weights (unrolled layers)
    run("unstacked_data4_model2/qspec", mesh, "qspec", unstack_layers(qparams))

    # asymmetric int4 (mins sharded with the scales), row-parallel: logits close to one device
    aparams, aqcfg = quantize_model(fparams, cfg, "rtn", 64, symmetric=False, progress=False)
    ids = jnp.asarray(toks)

    @jax.jit
    def logits(p, ids):
        return forward(p, ids, KVCache.init(cfg, ids.shape[0], ids.shape[1]), cfg, aqcfg, "w4a16")[0]

    ref = np.asarray(logits(aparams, ids))
    got = np.asarray(logits(shard_params(aparams, mesh), shard_batch(ids, mesh)))
    out["asym_logits_max_abs_diff"] = float(np.max(np.abs(ref - got)))
    out["asym_logits_scale"] = float(np.max(np.abs(ref)))
    out["asym_specs"] = str(param_specs(aparams, mesh).layers)

    for args in [(8, 3), (9, 1), (0, 1)]:
        try:
            make_mesh(*args)
        except ValueError as e:
            out["errors"][str(args)] = str(e)
    out["total_s"] = round(time.perf_counter() - t_start, 1)
    return out


# --------------------------------------------------------------------------- tests (parent)
@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """Runs the worker once on 8 emulated CPU devices; returns its JSON results."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NDEV}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    tmp = str(tmp_path_factory.mktemp("sharding"))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), tmp], env=env, cwd=root,
        capture_output=True, text=True, timeout=600,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_eight_devices_visible(multi):
    assert multi["devices"] == NDEV


@pytest.mark.parametrize("name", [f"{m}/{mode}" for m, _, _, modes in PLAN[1:] for mode in modes])
def test_sharded_greedy_tokens_equal_one_device(multi, name):
    mode = name.split("/")[1]
    base = multi["tokens"][f"1dev/{mode}"]
    assert all(len(t) == MAX_NEW for t in base)
    assert len({tuple(t) for t in base}) > 1  # the prompts matter
    assert multi["tokens"][name] == base
    assert multi["n_devices"][name] == NDEV  # really partitioned over all 8 devices
    if not name.startswith("model8"):
        assert multi["out_spec"][name] == "P('data',)"  # outputs stay batch-sharded


def test_qspec_equals_w4a16_sharded(multi):
    assert multi["tokens"]["data4_model2/qspec"] == multi["tokens"]["1dev/w4a16"]


def test_specs_recorded(multi):
    s = multi["specs"]["data4_model2/w4a16"]
    # column parallel (split N) for wqkv / w_gate_up, row parallel (split packed K/2) for wo / w_down
    assert "wqkv=QuantizedWeight(packed=P(None, None, 'model'), scales=P(None, None, 'model')" in s
    assert "wo=QuantizedWeight(packed=P(None, 'model', None), scales=P(None, 'model', None)" in s
    assert "w_down=QuantizedWeight(packed=P(None, 'model', None)" in s
    assert "attn_norm=P()" in s
    # model = 8: wo (K = 128) and w_down (K = 256) cannot hold whole 64-row tiles: replicated
    s8 = multi["specs"]["model8/w4a16"]
    assert "wo=QuantizedWeight(packed=P(), scales=P()" in s8
    assert "w_down=QuantizedWeight(packed=P(), scales=P()" in s8
    assert "w_gate_up=QuantizedWeight(packed=P(None, None, 'model')" in s8


def test_unstacked_layers_sharded(multi):
    assert multi["tokens"]["unstacked_data4_model2/qspec"] == multi["tokens"]["1dev/w4a16"]
    s = multi["specs"]["unstacked_data4_model2/qspec"]  # one layer: [K/2, N], no layer axis
    assert "wo=QuantizedWeight(packed=P('model', None), scales=P('model', None)" in s
    assert "wqkv=QuantizedWeight(packed=P(None, 'model'), scales=P(None, 'model')" in s


def test_checkpoint_restored_onto_mesh(multi):
    assert multi["restored_shardings_match"]
    assert multi["tokens"]["restored_data4_model2/w4a16"] == multi["tokens"]["1dev/w4a16"]


def test_asymmetric_row_parallel_logits(multi):
    assert "mins=P(None, 'model', None)" in multi["asym_specs"]
    assert multi["asym_logits_max_abs_diff"] <= 1e-5 * max(1.0, multi["asym_logits_scale"])


def test_make_mesh_errors_multi(multi):
    assert "model_parallel=3 must be a positive integer that divides the device count 8" in multi["errors"]["(8, 3)"]
    assert "asked for 9 devices but only 8" in multi["errors"]["(9, 1)"]
    assert "positive integer" in multi["errors"]["(0, 1)"]


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


def test_param_specs_divisibility(tiny_cfg, tiny_params):
    """Row-parallel int4 needs K / model to hold whole 64-row tiles and whole groups."""
    from jax.sharding import PartitionSpec as P

    from qspec_jax.quant import quantize_model
    from qspec_jax.sharding import param_specs

    qp, _ = quantize_model(tiny_params, tiny_cfg, "rtn", 128, progress=False)
    s2, s4 = param_specs(qp, 2).layers, param_specs(qp, 4).layers
    # w_down K = 256, groups of 128: 2 shards of 128 rows hold whole groups; 4 shards of 64 do not
    assert s2.w_down.packed == P(None, "model", None) == s2.w_down.scales
    assert s4.w_down.packed == P() == s4.w_down.scales
    # wo K = 128 is one group (per channel): codes split in whole tiles, [L, 1, N] scales replicated
    assert s2.wo.packed == P(None, "model", None) and s2.wo.scales == P()
    assert s2.wqkv.packed == P(None, None, "model") == s2.wqkv.scales
    pc, _ = quantize_model(tiny_params, tiny_cfg, "rtn", 0, progress=False)  # per channel
    s4 = param_specs(pc, 4).layers  # w_down K = 256 = 4 x 64: codes split, [L, 1, N] scales not
    assert s4.w_down.packed == P(None, "model", None) and s4.w_down.scales == P()
    assert s4.wo.packed == P()  # K = 128 = 4 x 32: not whole tiles
    f2 = param_specs(tiny_params, 2).layers  # float weights
    assert f2.wqkv == P(None, None, "model") and f2.wo == P(None, "model", None)
    assert param_specs(tiny_params, 2).lm_head == P() and param_specs(tiny_params, 2).embed == P()
    assert f2.bqkv is None
    from qspec_jax.model.params import unstack_layers

    u = param_specs(unstack_layers(qp), 2).layers  # per-layer arrays: same rules, no layer axis
    assert isinstance(u, tuple) and len(u) == tiny_cfg.num_layers
    assert u[0].w_down.packed == P("model", None) and u[0].wqkv.scales == P(None, "model")


if __name__ == "__main__":
    print("RESULT " + json.dumps(_worker(sys.argv[1])))
    sys.exit(0)


_ENGINE_SCRIPT = r"""
import json, jax
from qspec_jax.config import preset
from qspec_jax.engine import Engine
from qspec_jax.model.params import init_params
from qspec_jax.quant import quantize_model
from qspec_jax.sharding import make_mesh
cfg = preset("tiny")
qp, qc = quantize_model(init_params(cfg, jax.random.PRNGKey(0)), cfg, "rtn", 32, progress=False)
prompts = [[5, 6, 7], [9] * 14, [11, 12, 13, 14, 15], [3], [40, 41, 42, 43], [7] * 9]
out = {}
for name, mesh in (("one", None), ("data8", make_mesh(8, 1)), ("data4_model2", make_mesh(8, 2))):
    eng = Engine(cfg, qp, qc, mesh=mesh)
    out[name] = {m: eng.generate(prompts, mode=m, max_new_tokens=10).tokens for m in ("w4a16", "qspec")}
print(json.dumps(out))
"""


def test_engine_with_mesh_gives_the_same_tokens():
    """`load(..., mesh=)` / `--devices`: the Engine's batches split over 8 emulated devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["one"]["qspec"] == out["one"]["w4a16"]
    for name in ("data8", "data4_model2"):
        assert out[name] == out["one"], name
