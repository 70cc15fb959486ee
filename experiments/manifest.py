"""Writes experiments/results/MANIFEST.md: every result file, the script and command that made
it, and when.

    python -m experiments.manifest            # rewrite the manifest
    python -m experiments.manifest --check    # exit 1 if it is out of date (nothing written)

The files are those git tracks under experiments/results plus the new ones it does not ignore
(partial JSONL records and run logs are ignored: the final JSON holds the results). The command
and time come from the file itself (`meta.command` / `meta.date` as `run_meta` writes them, or
the older fields `command`, `argv`, `date`, `started_utc`, `invocations`); a plot, table or
per-run record takes them from the JSON it belongs to (same stem, or the table whose `.runs/`
folder holds it). Where a file recorded no command the script is named from the file's name
and the time is its last commit's ("committed ...").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

from qspec_jax.bench.common import EXPERIMENTS_DIR, REPO_ROOT, RESULTS_DIR

MANIFEST = RESULTS_DIR / "MANIFEST.md"
# Result names that do not start with their script's name: (regex on the path under results/,
# script).
NAME_RULES = (
    (r"^eval/eval_table_.*_diag_", "diag_qspec_mismatch"),
    (r"^eval/eval_table_", "eval_table"),
    (r"^eval/(math|humaneval|perplexity)_", "run_eval"),
    (r"^quality/agreement_", "bench_agreement"),
    (r"^quality/acceptance_", "bench_acceptance"),
    (r"^quality/probe_", "quant_probe"),
    (r"^gpu_check/", "gpu_check"),
)
SCRIPT_IN_COMMAND = re.compile(r"(?:-m\s+experiments\.(\w+))|(?:experiments/(\w+)\.py)")


def result_files() -> list[str]:
    """Paths under experiments/results (relative to it), tracked or new and not ignored."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", "."],
            cwd=RESULTS_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        names = [n for n in out.splitlines() if n and os.path.exists(RESULTS_DIR / n)]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file
        names = [
            os.path.relpath(os.path.join(d, f), RESULTS_DIR)
            for d, _, fs in os.walk(RESULTS_DIR)
            for f in fs
            if not f.endswith((".partial.jsonl", ".log", ".tmp"))
        ]
    return sorted(n for n in names if n != MANIFEST.name)


def _read_json(path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def recorded(doc: dict | None) -> tuple[str | None, str | None]:
    """(command, time) a result JSON recorded, in any of the formats the scripts have written."""
    if doc is None:
        return None, None
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
    last = (doc.get("invocations") or [{}])[-1]
    cmd = meta.get("command") or doc.get("command") or last.get("command")
    argv = meta.get("argv") or doc.get("argv")
    if cmd is None and isinstance(argv, list):
        cmd = "python " + " ".join(argv)
    when = (
        meta.get("date")
        or doc.get("date")
        or last.get("finished_utc")
        or doc.get("finished_utc")
        or doc.get("started_utc")
    )
    return cmd, when


def _source_json(name: str) -> str | None:
    """The JSON a non-JSON result (plot, table, output) or a per-run record belongs to."""
    runs = re.match(r"^(.*)\.runs/", name)
    if runs:
        return runs.group(1) + ".json"
    stem, ext = os.path.splitext(name)
    if ext != ".json" and os.path.exists(RESULTS_DIR / (stem + ".json")):
        return stem + ".json"
    return None


def script_of(name: str, command: str | None) -> str | None:
    """The experiments/ script that wrote results/`name` (from its command, else its name)."""
    if command:
        m = SCRIPT_IN_COMMAND.search(command)
        if m:
            return m.group(1) or m.group(2)
    for pattern, script in NAME_RULES:
        if re.search(pattern, name):
            return script
    base = os.path.basename(name)
    stems = sorted((p[:-3] for p in os.listdir(EXPERIMENTS_DIR) if p.endswith(".py")), key=len)
    return next((s for s in reversed(stems) if base.startswith(s)), None)


def _committed(name: str) -> str | None:
    try:
        out = subprocess.run(
            [
                "git",
                "log",
                "-1",
                "--format=%cd",
                "--date=format-local:%Y-%m-%d %H:%M UTC",
                "--",
                name,
            ],
            cwd=RESULTS_DIR,
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, TZ="UTC"),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"committed {out}" if out else None


def rows() -> list[dict]:
    """One dict per result file: file, script, command, when."""
    out = []
    for name in result_files():
        cmd, when = recorded(_read_json(RESULTS_DIR / name) if name.endswith(".json") else None)
        src = _source_json(name)
        if cmd is None and src is not None:
            cmd, src_when = recorded(_read_json(RESULTS_DIR / src))
            when = when or src_when
        script = script_of(name, cmd)
        out.append(
            dict(
                file=name,
                script=f"experiments/{script}.py" if script else None,
                command=cmd,
                when=when or _committed(name) or "not recorded",
            )
        )
    return out


def render(table: list[dict]) -> str:
    """The manifest as markdown."""

    def cell(text):
        return str(text).replace("|", "\\|")

    lines = [
        "# Results manifest",
        "",
        "Generated by `python -m experiments.manifest` from the files themselves; do not edit by "
        "hand. Commands are as each run recorded them (older runs: `python experiments/X.py`, now "
        "`python -m experiments.X` from the repository root). Machine and load are in each JSON's "
        "`meta`.",
        "",
        "| file | script | command | when |",
        "|---|---|---|---|",
    ]
    for r in table:
        cmd = f"`{cell(r['command'])}`" if r["command"] else "not recorded"
        script = f"`{r['script']}`" if r["script"] else "?"
        lines.append(f"| `{cell(r['file'])}` | {script} | {cmd} | {cell(r['when'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if MANIFEST.md is out of date")
    args = ap.parse_args(argv)
    table = rows()
    text = render(table)
    if args.check:
        old = MANIFEST.read_text(encoding="utf-8") if MANIFEST.exists() else ""
        if old != text:
            print(f"{os.path.relpath(MANIFEST, REPO_ROOT)} is out of date: run "
                  "python -m experiments.manifest", file=sys.stderr)  # fmt: skip
            return 1
        return 0
    MANIFEST.write_text(text, encoding="utf-8")
    print(f"wrote {os.path.relpath(MANIFEST, REPO_ROOT)} ({len(table)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
