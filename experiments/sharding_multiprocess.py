"""Tensor + data parallel generation over several processes (`jax.distributed`), on one machine.

Launcher (no flags but the model): starts `--num-processes` worker processes of this script on
127.0.0.1, each with `--devices-per-process` CPU devices and gloo CPU collectives, forming one
global mesh of data = num_processes x model = devices_per_process (the "model" axis inside a
process, data parallel across processes: process i feeds row i of the batch). It also runs
the same greedy generation in one plain process on one device, and checks the tokens are equal.

    python -m experiments.sharding_multiprocess [--model smollm2-135m] [--num-processes 2]
        [--devices-per-process 3] [--max-new-tokens 16] [--out experiments/results/sharding_multiprocess.json]

Worker (what the launcher runs; also how to run it by hand, e.g. on several hosts):

    python -m experiments.sharding_multiprocess --coordinator HOST:PORT --num-processes N
        --process-id I [--devices-per-process 3]

Each worker loads the model itself (every process holds the same full host copy and places
its own shards: `qspec_jax.sharding.shard_params`), builds its batch rows with
`shard_batch` (`jax.make_array_from_process_local_data`) and reads the tokens back with
`multihost_utils.process_allgather`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

PROMPTS = ["def fibonacci(n):", "The capital of France is"]
MODES = (("w4a16", "float"), ("qspec", "float"), ("quantspec", "hier"))


def _generate(mesh, model: str, max_new: int) -> dict:
    """Greedy tokens of PROMPTS per mode; with a mesh, this process's rows are its data slice."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    import qspec_jax  # noqa: PLC0415
    from qspec_jax.cache import make_cache  # noqa: PLC0415
    from qspec_jax.decoding import DecodeConfig, generate  # noqa: PLC0415
    from qspec_jax.model.params import stack_layers  # noqa: PLC0415
    from qspec_jax.sharding import shard_batch, shard_cache, shard_params  # noqa: PLC0415

    eng = qspec_jax.load(model, quant="gguf" if model == "smollm2-135m" else "rtn")
    cfg, qcfg = eng.config, eng.qconfig
    params = stack_layers(eng.params)  # one scanned layer body: compiles fast
    ids = eng.encode(PROMPTS) if eng.tokenizer is not None else [[5, 6, 7], [9, 10, 11, 12]]
    t = 16 * -(-max(map(len, ids)) // 16)
    toks = np.zeros((len(ids), t), np.int32)
    for i, row in enumerate(ids):
        toks[i, : len(row)] = row
    lens = np.asarray([len(r) for r in ids], np.int32)
    key = np.asarray(jax.random.PRNGKey(0))  # host value: replicated on every process
    if mesh is not None:
        params = shard_params(params, mesh, cfg)
        rows = len(ids) // jax.process_count()
        mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
        toks, lens = shard_batch(toks[mine], mesh), shard_batch(lens[mine], mesh)
    out = {}
    for mode, kind in MODES:
        dc = DecodeConfig(mode=mode, max_new_tokens=max_new, gamma=0 if mode == "w4a16" else 3)
        cache = make_cache(kind, cfg, len(ids), 128, residual=32, step_tokens=dc.tokens_per_step)
        if mesh is not None:
            cache = shard_cache(cache, mesh)
        t0 = time.perf_counter()
        st = generate(params, cache, toks, lens, key, cfg=cfg, qcfg=qcfg, dc=dc)
        n, o = st.num_generated, st.out_tokens
        if mesh is not None:
            n, o = (multihost_utils.process_allgather(a, tiled=True) for a in (n, o))
        n, o = np.asarray(n), np.asarray(o)
        out[mode] = {
            "tokens": [o[r, : n[r]].tolist() for r in range(len(ids))],
            "seconds_with_compile": round(time.perf_counter() - t0, 1),
        }
    return out


def worker(args) -> int:
    import jax  # noqa: PLC0415

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", args.devices_per_process)
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    from qspec_jax.sharding import make_mesh  # noqa: PLC0415

    mesh = make_mesh(model_parallel=args.devices_per_process)  # global: data = processes
    res = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "global_devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "mesh": dict(mesh.shape),
        "modes": _generate(mesh, args.model, args.max_new_tokens),
    }
    print("RESULT " + json.dumps(res), flush=True)
    jax.distributed.shutdown()
    return 0


def single(args) -> int:
    res = {"modes": _generate(None, args.model, args.max_new_tokens)}
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def _result(proc_out: str) -> dict:
    lines = [ln for ln in proc_out.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :]) if lines else {}


def launch(args) -> int:
    from qspec_jax.bench.common import command_line, run_meta, write_json  # noqa: PLC0415

    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = [sys.executable, "-m", "experiments.sharding_multiprocess", "--model", args.model,
            "--max-new-tokens", str(args.max_new_tokens)]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the device count comes from --devices-per-process
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                *base,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(args.num_processes),
                "--process-id",
                str(i),
                "--devices-per-process",
                str(args.devices_per_process),
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for i in range(args.num_processes)
    ]
    outs = [p.communicate(timeout=1800) for p in procs]
    multi_s = time.perf_counter() - t0
    for p, (_, e) in zip(procs, outs):
        if p.returncode:
            print(e[-3000:], file=sys.stderr)
            return 1
    ref = subprocess.run([*base, "--single"], capture_output=True, text=True, env=env, timeout=1800)
    if ref.returncode:
        print(ref.stderr[-3000:], file=sys.stderr)
        return 1
    workers = [_result(o) for o, _ in outs]
    single_res = _result(ref.stdout)
    equal = {
        mode: all(
            w["modes"][mode]["tokens"] == single_res["modes"][mode]["tokens"] for w in workers
        )
        for mode, _ in MODES
    }
    result = {
        "meta": run_meta(),
        "command": command_line("experiments.sharding_multiprocess"),
        "model": args.model,
        "workers": workers,
        "single_process_one_device": single_res,
        "tokens_equal_single_process": equal,
        "multi_process_wall_s": round(multi_s, 1),
    }
    write_json(args.out, result)
    print(json.dumps({"tokens_equal_single_process": equal, "mesh": workers[0]["mesh"]}))
    return 0 if all(equal.values()) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-processes", type=int, default=2)
    ap.add_argument("--devices-per-process", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--coordinator", help="HOST:PORT: run as a worker of a multi-process run")
    ap.add_argument("--process-id", type=int)
    ap.add_argument("--single", action="store_true", help="(internal) the one-device reference")
    ap.add_argument("--out", default="experiments/results/sharding_multiprocess.json")
    args = ap.parse_args(argv)
    if args.single:
        return single(args)
    if args.coordinator is not None:
        if args.process_id is None:
            ap.error("--coordinator needs --process-id")
        return worker(args)
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
