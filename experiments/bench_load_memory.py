"""Peak memory and time of loading + quantizing a Hugging Face checkpoint (issue 20, item 3).

Writes random Llamas with transformers in bfloat16 (sharded safetensors with an index, as real
checkpoints come) into a temporary directory, then measures each case in a fresh subprocess:

* ``streamed``: ``qspec_jax.load(dir, quant=method)``, which reads, rotates and quantizes one
  decoder block at a time (`qspec_jax.quant.streaming`);
* ``whole``: the whole-model path it replaces, ``quantize_model(*load_hf_dir(dir))`` (the float
  model stacked in memory, then quantized), as the baseline of the same run.

Per case: peak resident memory (VmHWM of the child, which includes everything the child mapped
and JAX's CPU "device" buffers), resident memory after the imports and before loading, bytes of
the loaded weights (`weight_bytes`: int4 blocks + float embedding / head / norms), and seconds.
The quantized-weights cache and the compilation cache are off, so each load quantizes.

Run: ``PYTHONPATH=. python experiments/bench_load_memory.py`` (``--sizes 0.5b`` for the small
model only, ``--methods rtn,quarot-rtn``; ``--whole-sizes`` limits the baseline, which needs
several times the checkpoint in memory).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

# name -> transformers LlamaConfig kwargs (vocab 32000, untied head, GQA 4:1).
SIZES = {
    # a few MB: checks the script end to end in seconds
    "smoke": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "0.5b": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=4,
    ),
    "1.5b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=30,
        num_attention_heads=16,
        num_key_value_heads=4,
    ),
}

WRITE = r"""
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
path, kw = sys.argv[1], json.loads(sys.argv[2])
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)  # initialise in bfloat16: half the memory
t0 = time.perf_counter()
model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, max_position_embeddings=4096,
                                     tie_word_embeddings=False, **kw))
model.save_pretrained(path, max_shard_size="500MB")
n = sum(p.numel() for p in model.parameters())
print(json.dumps({"params": n, "write_s": time.perf_counter() - t0}))
"""

MEASURE = r"""
import json, os, sys, time
def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
path, method, how = sys.argv[1], sys.argv[2], sys.argv[3]
import jax
from qspec_jax.engine import load
from qspec_jax.loading import load_hf_dir
from qspec_jax.model.params import weight_bytes
from qspec_jax.quant import quantize_model
from qspec_jax.quant.format import QuantizedWeight
rss_imports = status("VmRSS")
t0 = time.perf_counter()
if how == "streamed":
    eng = load(path, quant=method, dtype="float32", progress=False,
               compile_cache=False, quant_cache=False)
    params = eng.params
else:
    cfg, params, _ = load_hf_dir(path, dtype="float32")
    params, _ = quantize_model(params, cfg, method, 128, progress=False)
jax.block_until_ready(params)
seconds = time.perf_counter() - t0
int4 = sum(l.nbytes for l in jax.tree_util.tree_leaves(
    params.layers, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    if isinstance(l, QuantizedWeight))
print(json.dumps({"peak_rss": status("VmHWM"), "rss_after_imports": rss_imports,
                  "weight_bytes": weight_bytes(params), "int4_bytes": int4,
                  "seconds": seconds}))
"""


def _run(code: str, *args: str, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"subprocess failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _dir_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(path, f))
        for f in os.listdir(path)
        if f.endswith(".safetensors")
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.5b,1.5b")
    ap.add_argument("--methods", default="rtn,quarot-rtn,gptq")
    ap.add_argument("--whole-sizes", default="0.5b", help="sizes that also run the baseline")
    ap.add_argument("--whole-methods", default="rtn", help="methods the baseline runs")
    ap.add_argument(
        "--workdir", default=None, help="where the checkpoints go (default: a temp dir)"
    )
    ap.add_argument("--out", default="experiments/results/bench_load_memory.json")
    args = ap.parse_args(argv)

    env = dict(os.environ)
    env.update(
        QSPEC_JAX_QUANT_CACHE="0",
        QSPEC_JAX_COMPILE_CACHE="0",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    root = args.workdir or tempfile.mkdtemp(prefix="bench_load_memory_")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = {
        "command": "PYTHONPATH=. python experiments/bench_load_memory.py "
        + " ".join(argv or sys.argv[1:]),
        "started_utc": started,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU (JAX CPU backend); "
        "shared with other engineers' jobs during the run",
        "python": platform.python_version(),
        "cases": [],
    }
    try:
        for size in args.sizes.split(","):
            path = os.path.join(root, f"llama-{size}")
            if not os.path.isdir(path):
                info = _run(WRITE, path, json.dumps(SIZES[size]), env=env)
            else:
                info = {"params": None, "write_s": None}
            disk = _dir_bytes(path)
            print(f"{size}: {info['params']} params, {disk / 2**30:.2f} GiB on disk", flush=True)
            hows = ["streamed"]
            if size in args.whole_sizes.split(","):
                hows.append("whole")
            for method in args.methods.split(","):
                for how in hows:
                    if how == "whole" and method not in args.whole_methods.split(","):
                        continue
                    r = _run(MEASURE, path, method, how, env=env)
                    r.update(
                        size=size,
                        method=method,
                        how=how,
                        params=info["params"],
                        disk_bytes=disk,
                        peak_over_disk=r["peak_rss"] / disk,
                    )
                    record["cases"].append(r)
                    print(
                        f"  {method:11s} {how:8s} peak {r['peak_rss'] / 2**30:6.2f} GiB "
                        f"({r['peak_over_disk']:.2f}x disk; {r['rss_after_imports'] / 2**30:.2f} "
                        f"GiB after imports)  weights {r['weight_bytes'] / 2**30:.2f} GiB "
                        f"(int4 {r['int4_bytes'] / 2**30:.2f})  {r['seconds']:.1f} s",
                        flush=True,
                    )
                    _save(record, args.out)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    record["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    _save(record, args.out)
    return 0


def _save(record: dict, out: str) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as fh:
        json.dump(record, fh, indent=1)


if __name__ == "__main__":
    t = time.perf_counter()
    rc = main()
    print(f"total {time.perf_counter() - t:.0f} s")
    sys.exit(rc)
