"""What the benchmark scripts in experiments/ share: run metadata, atomic JSON, timing, prompts.

A script records how it ran with `run_meta` (the reproducing command, UTC time, machine, load
average, plus its own settings), writes with `write_json` (atomic: the old file or the whole new
one, never half of each), times with `median_time` / `median_wall`, and takes its prompts from
one of the named lists below, cut or repeated to a batch by `batch_prompts`. Bad command lines end
with `usage_error` (one line on stderr, exit status 2).
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from qspec_jax.eval.harness import write_json_atomic

# The benchmarks read the embedded model and never download: no Hugging Face Hub calls.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENTS_DIR = REPO_ROOT / "experiments"
DATA_DIR = EXPERIMENTS_DIR / "data"
RESULTS_DIR = EXPERIMENTS_DIR / "results"
EXIT_USAGE = 2

# ----------------------------------------------------------------------------- prompts
# Each benchmark keeps the prompts it was measured with: changing a list changes its figures.

# bench_qspec, bench_tree: math, code and short-answer chat prompts.
QSPEC_PROMPTS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether? Think step by step.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in a few sentences why the sky is blue.",
    "A train travels 60 km per hour for 3 hours and then 40 km per hour for 2 hours. "
    "How far does it go?",
    "List three differences between lists and tuples in Python.",
    "What is the boiling point of water at sea level, in Celsius and Fahrenheit?",
    "Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many are left?",
    "Write a haiku about autumn leaves.",
)

# bench_compare (all eight), bench_cpu_kernels (the first four).
COMPARE_PROMPTS = (
    "Explain in a few sentences why the sky is blue.",
    "Write a Python function that checks whether a string is a palindrome.",
    "List three differences between lists and tuples in Python.",
    "Write a haiku about autumn leaves.",
    "Describe the water cycle for a ten-year-old.",
    "Why do cats purr?",
    "Summarize the plot of Romeo and Juliet.",
    "How do vaccines train the immune system?",
)

# bench_decode: open-ended chat prompts.
DECODE_PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle for a ten-year-old.",
    "Give three tips for writing clean Python code.",
    "Why do cats purr?",
    "Summarize the plot of Romeo and Juliet.",
    "How do vaccines train the immune system?",
)

# quant_probe: twelve varied chat prompts (stories, reasoning, code, instructions).
PROBE_PROMPTS = (
    "Write a short story about a fox who finds a lost key in the forest.",
    "Explain how a refrigerator keeps food cold, in simple terms.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May? Think step by step.",
    "Write a Python function that checks whether a string is a valid IPv4 address.",
    "What are the main differences between a democracy and a monarchy?",
    "Give me a recipe for a vegetable soup, with a list of ingredients and steps.",
    "A train leaves at 3:15 pm and the trip takes 2 hours and 50 minutes. When does it arrive? "
    "Explain your reasoning.",
    "Write a JavaScript function that removes duplicate values from an array.",
    "Describe the life cycle of a butterfly.",
    "Write a polite email to a landlord asking for a broken heater to be repaired.",
    "Why is the sky blue? Give a short explanation for a ten-year-old.",
    "List five tips for learning a new language and explain each one briefly.",
)


def batch_prompts(prompts: Sequence[str], batch: int) -> list[str]:
    """The first `batch` prompts of `prompts` repeated end to end (a batch larger than the list
    reuses it from the start)."""
    prompts = list(prompts)
    return (prompts * (batch // len(prompts) + 1))[:batch]


# ----------------------------------------------------------------------------- run metadata
def utc_stamp(t: float | None = None, seconds: bool = False) -> str:
    """UTC time as "2026-12-02 10:40 UTC" (with ":SS" when `seconds`); `t` is a time.time()."""
    fmt = "%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC"
    return time.strftime(fmt, time.gmtime(time.time() if t is None else t))


def utc_iso() -> str:
    """UTC time now as ISO 8601 to the second ("2026-12-02T10:40:00+00:00")."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line(module: str | None = None, argv: Sequence[str] | None = None) -> str:
    """The shell command that reproduces this run from the repository root.

    Args:
        module: the script as a module ("experiments.bench_qspec"); default: the running
            `__main__` module's name when started with `python -m`, else the script's path.
        argv: its arguments (default `sys.argv[1:]`).

    Returns:
        "python -m experiments.bench_qspec --batches 1" (arguments shell-quoted).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if module is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = getattr(spec, "name", None)
    if module:
        head = ["python", "-m", module]
    else:
        script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else "?"
        rel = os.path.relpath(script, REPO_ROOT)
        head = ["python", script if rel.startswith("..") else rel]
    return shlex.join(head + args)


def _cpu_model() -> dict[str, Any]:
    """The CPU's model name, family/model and the vector extensions the CPU kernels care about
    (`pallas_kernels.cpu_kernels.cpu_info`; empty off Linux). The shared machines differ, and a
    kernel's speed depends on which."""
    from pallas_kernels.cpu_kernels import cpu_info  # noqa: PLC0415

    info = cpu_info()
    if not info:
        return {}
    flags = set(info.get("flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16")
    return {
        "cpu_model": info.get("model name"),
        # e.g. AMD family 25 model 17 (Zen 4) when the name is only "AMD EPYC"
        "cpu_family_model": f"{info.get('cpu family')}/{info.get('model')}",
        "cpu_flags": [f for f in wanted if f in flags],
    }


def machine_info() -> dict[str, Any]:
    """The machine a run measured: platform, CPU model and vector extensions, cores, Python,
    JAX, backend and devices."""
    import jax  # noqa: PLC0415

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        **_cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def run_meta(
    started: float | None = None, *, module: str | None = None, argv=None, **extra
) -> dict[str, Any]:
    """The metadata every result file carries, then the script's own fields.

    Args:
        started: time.time() at the start of the measurement: `date` and `seconds` (elapsed)
            come from it; default: now, and no `seconds`.
        module, argv: see `command_line`.
        **extra: the script's settings and context (quant, kernels, rounds...).

    Returns:
        dict(command, date, [seconds,] machine, load_average, **extra); load_average is read now
        (call this at the end of the run: it is the load the measurement ran under).
    """
    meta: dict[str, Any] = {
        "command": command_line(module, argv),
        "date": utc_stamp(started),
    }
    if started is not None:
        meta["seconds"] = round(time.time() - started, 1)
    meta["machine"] = machine_info()
    meta["load_average"] = load_average()
    meta.update(extra)
    return meta


def describe(meta: dict[str, Any]) -> str:
    """One line for the top of a printed table: when, where, under what load, which command."""
    m = meta.get("machine")
    where = (
        f"{m['machine']}, {m['cores']} cores, {m['backend']}, jax {m['jax']}"
        if isinstance(m, dict)
        else str(m)
    )
    load = meta.get("load_average")
    load = " ".join(f"{x:.2f}" for x in load) if load else "unknown"
    return f"{meta['date']}, {where}, load {load}: `{meta['command']}`"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes `obj` as JSON at `path` atomically (`write_json_atomic`), creating the directory.

    NaN and infinities become null and tuples lists (strict JSON)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, obj)


# ----------------------------------------------------------------------------- timing
def median_time(fn: Callable, *args, reps: int = 10, feed: Callable | None = None) -> float:
    """Median seconds of a JAX call `fn(*args)` over `reps` host-synchronized calls.

    One untimed call first (compilation, warm-up). `feed(args, out) -> args` threads donated
    buffers from one call into the next.
    """
    import jax  # noqa: PLC0415

    out = fn(*args)
    jax.block_until_ready(out)
    if feed is not None:
        args = feed(args, out)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t0)
        if feed is not None:
            args = feed(args, out)
    return statistics.median(ts)


def median_wall(call: Callable[[], Any], reps: int) -> float:
    """Median wall seconds of `reps` calls of `call()` (no warm-up call; `call` synchronizes)."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ----------------------------------------------------------------------------- arguments
def int_list(text: str) -> list[int]:
    """Comma-separated integers ("1,4,16"); empty items are skipped; ValueError if malformed."""
    return [int(x) for x in text.split(",") if x.strip()]


def usage_error(message: str) -> int:
    """Prints "error: <message>" as one line on stderr; returns the exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


# ----------------------------------------------------------------------------- transformers
def left_padded(ids: Sequence[Sequence[int]], pad: int):
    """Token-id prompts as a left-padded torch batch for transformers' generate.

    Returns:
        (input_ids [batch, longest] int64, attention_mask [batch, longest] int64, longest).
    """
    import torch  # noqa: PLC0415

    longest = max(len(i) for i in ids)
    x = torch.full((len(ids), longest), pad, dtype=torch.long)  # [batch, longest]
    mask = torch.zeros((len(ids), longest), dtype=torch.long)  # [batch, longest]
    for r, i in enumerate(ids):
        x[r, longest - len(i) :] = torch.tensor(i)
        mask[r, longest - len(i) :] = 1
    return x, mask, longest
