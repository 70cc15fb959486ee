"""The evaluation table: every task in every mode, QSpec with both draft precisions, one summary.

`plan_runs` turns (tasks, limits, quantization) into `run_eval` runs, each with its own results
file (so each resumes on its own):

* ``fp``: the float model (an engine loaded without quantization), mode "fp".
* ``main``: the int4 engine, modes w4a16, w4a4, w4a8 and qspec with a W4A8 draft.
* ``draft-w4a4``: the int4 engine, mode qspec with a W4A4 draft (math and HumanEval only: a
  perplexity run scores QSpec teacher-forced, which is its W4A16 verifier's distribution whatever
  the draft, so both QSpec rows take the ``main`` run's qspec record).

`combine` reads the runs' summaries into one table of ROWS x tasks and compares, per item, QSpec's
output with W4A16's: generated tokens (math, HumanEval) or the chunk's summed NLL (perplexity).
At temperature 0 they must be equal on every item. `table_markdown` and `plot_table` report it;
``table_cli`` is the command line (``python -m experiments.eval_table``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "ROWS",
    "TABLE_TASKS",
    "TableRun",
    "check_resume",
    "combine",
    "parse_limits",
    "parse_per_task",
    "plan_runs",
    "plot_table",
    "row_label",
    "summary_from_partial",
    "table_markdown",
]

TABLE_TASKS = ("perplexity", "math", "humaneval")
ROWS = ("fp", "w4a16", "w4a4", "w4a8", "qspec-w4a4", "qspec-w4a8")
MAIN_MODES = ("w4a16", "w4a4", "w4a8", "qspec")
MAIN_DRAFT = "w4a8"
TASK_TITLES = {"perplexity": "perplexity", "math": "math", "humaneval": "HumanEval"}
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class TableRun:
    """One `run_eval` call: a task on one engine ("fp" or "int4") in some modes, one results file."""

    task: str
    engine: str  # "fp" (float weights) or "int4"
    modes: tuple[str, ...]
    draft: str
    key: str  # "fp", "main" or "draft-w4a4"
    path: str


def row_label(row: str) -> str:
    return {"qspec-w4a4": "qspec (draft w4a4)", "qspec-w4a8": "qspec (draft w4a8)"}.get(row, row)


def limit_tag(limit: int | None) -> str:
    return "all" if limit is None else f"n{limit}"


def plan_runs(
    tasks: Sequence[str],
    limits: dict[str, int | None],
    max_new_tokens: dict[str, int],
    runs_dir: str,
) -> list[TableRun]:
    """The runs that fill the table for `tasks`, in the order they are run.

    File names carry the task, its item limit and (for generation) max_new_tokens, so a quick run
    with a smaller limit never resumes into, or overwrites, a larger run's files.
    """
    out = []
    for task in tasks:
        tag = limit_tag(limits.get(task))
        if task != "perplexity":
            tag += f"_new{max_new_tokens[task]}"

        def path(key, task=task, tag=tag):
            return os.path.join(runs_dir, f"{task}_{tag}_{key}.json")

        out.append(TableRun(task, "fp", ("fp",), MAIN_DRAFT, "fp", path("fp")))
        if task == "perplexity":
            out.append(TableRun(task, "int4", MAIN_MODES, MAIN_DRAFT, "main", path("main")))
            continue
        # both QSpec drafts before W4A8, so that a run cut short still checks QSpec == W4A16 for
        # each draft; the second "main" call resumes the same file (only w4a8 is left to do) and
        # its summary holds every mode
        early = tuple(m for m in MAIN_MODES if m != "w4a8")
        out.append(TableRun(task, "int4", early, MAIN_DRAFT, "main", path("main")))
        out.append(TableRun(task, "int4", ("qspec",), "w4a4", "draft-w4a4", path("draft-w4a4")))
        out.append(TableRun(task, "int4", MAIN_MODES, MAIN_DRAFT, "main", path("main")))
    return out


def check_resume(run: TableRun, expected: dict[str, Any]) -> None:
    """Fails early (EvalUsageError) when `run`'s partial file was written with other options.

    `run_eval` checks the whole configuration when it starts a run; this checks the keys known
    before any model is loaded, so a bad resume fails before earlier runs spend time.
    """
    from qspec_jax.eval.harness import EvalUsageError, load_partial, partial_path  # noqa: PLC0415

    ppath = partial_path(run.path)
    cfg, _, _ = load_partial(ppath)
    if cfg is None:
        return
    for k, v in expected.items():
        if k in cfg and cfg[k] != v:
            raise EvalUsageError(
                f"the partial results file {ppath} was written with {k} {cfg[k]!r}, not {v!r}: "
                "pass the same options to resume, or delete the file to start over"
            )


def summary_from_partial(run: TableRun) -> dict | None:
    """The `run_eval` summary of what `run`'s partial file holds so far (None if nothing).

    For tables of an unfinished evaluation (``--report-only``): modes with no item yet are left
    out, and each row counts only the items recorded (its ``n_items``).
    """
    from qspec_jax.eval.harness import load_partial, partial_path, summarize  # noqa: PLC0415

    cfg, items, batches = load_partial(partial_path(run.path))
    if cfg is None:
        return None
    modes = [m for m in run.modes if any(r["mode"] == m for r in items)]
    if not modes:
        return None
    return summarize(cfg, modes, items, batches)


def _items(summary: dict, mode: str) -> dict[str, dict]:
    return {r["id"]: r for r in summary["items"] if r["mode"] == mode}


def _compare(task: str, qspec: dict[str, dict], w4a16: dict[str, dict]) -> dict[str, Any]:
    """Per item: does QSpec's output equal W4A16's? (tokens; the chunk NLL for perplexity)."""
    field = "nll" if task == "perplexity" else "tokens"
    common = sorted(set(qspec) & set(w4a16), key=lambda i: qspec[i]["index"])
    per_item = {i: qspec[i][field] == w4a16[i][field] for i in common}
    equal = sum(per_item.values())
    return {
        "compared": field,
        "equal": equal,
        "n": len(common),
        "text": f"{equal}/{len(common)}",
        "all_equal": bool(common) and equal == len(common),
        "mismatch_ids": [i for i, ok in per_item.items() if not ok],
        "items": per_item,
    }


_ROW_FIELDS = (
    "score",
    "score_name",
    "n_items",
    "n_correct",
    "tokens_generated",
    "tokens_scored",
    "mean_new_tokens",
    "truncated",
    "precision",
    "draft_tokens_proposed",
    "draft_tokens_accepted",
    "acceptance_rate",
    "mean_tokens_per_step",
    "gamma",
)


def combine(
    task_summaries: dict[str, dict[str, dict]],
    config: dict,
    skipped: dict[str, str] | None = None,
) -> dict:
    """The table from run summaries: ``task_summaries[task][run key]`` = a `run_eval` summary.

    Returns a JSON-able dict: config, rows, per task the row scores (with the run file each came
    from) and, per draft, how many items QSpec's output equals W4A16's on.
    """
    tasks: dict[str, Any] = {}
    for task, runs in task_summaries.items():
        source = {
            "fp": ("fp", "fp"),
            "w4a16": ("main", "w4a16"),
            "w4a4": ("main", "w4a4"),
            "w4a8": ("main", "w4a8"),
            "qspec-w4a8": ("main", "qspec"),
            "qspec-w4a4": ("draft-w4a4", "qspec"),
        }
        if task == "perplexity":  # teacher-forced QSpec = its W4A16 verifier, whatever the draft
            source["qspec-w4a4"] = ("main", "qspec")
        rows: dict[str, Any] = {}
        for row in ROWS:
            key, mode = source[row]
            s = runs.get(key)
            if s is None or mode not in s["results"]:
                continue
            r = s["results"][mode]
            rows[row] = {k: r[k] for k in _ROW_FIELDS if k in r}
            rows[row]["mode"] = mode
            rows[row]["run"] = key
            if mode == "qspec":
                rows[row]["draft"] = "w4a4" if row == "qspec-w4a4" else "w4a8"
        eq = {}
        main = runs.get("main")
        if main is not None and "w4a16" in main["results"]:
            w16 = _items(main, "w4a16")
            for row in ("qspec-w4a4", "qspec-w4a8"):
                key, mode = source[row]
                s = runs.get(key)
                if s is not None and mode in s["results"]:
                    eq[row.split("-")[1]] = _compare(task, _items(s, mode), w16)
        score_name = next((r.get("score_name") for r in rows.values()), None)
        tasks[task] = {
            "score_name": score_name,
            "rows": rows,
            "qspec_equals_w4a16": eq,
            "temperature": next((s["config"].get("temperature") for s in runs.values()), None),
        }
    violated = [
        f"{t} (draft {d})"
        for t, v in tasks.items()
        for d, c in v["qspec_equals_w4a16"].items()
        if c["n"] and not c["all_equal"]
    ]
    return {
        "format": FORMAT,
        "kind": "qspec-jax eval table",
        "config": config,
        "rows": list(ROWS),
        "tasks": tasks,
        "skipped": dict(skipped or {}),
        "qspec_equals_w4a16_everywhere": not violated
        if any(v["qspec_equals_w4a16"] for v in tasks.values())
        else None,
        "qspec_equality_violations": violated,
    }


def _f(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def _score_cell(task: str, r: dict | None) -> str:
    if r is None:
        return ""
    if task == "perplexity":
        return _f(r.get("score"), ".3f")
    if r.get("score") is None:
        return "-"
    return f"{r['score']:.3f} ({r['n_correct']}/{r['n_items']})"


def table_markdown(table: dict) -> str:
    """A markdown table (one row per mode, one score column per task) plus the QSpec checks."""
    tasks = [t for t in TABLE_TASKS if t in table["tasks"]]
    gen = [t for t in tasks if t != "perplexity"]
    head = ["mode"]
    for t in tasks:
        name = table["tasks"][t]["score_name"] or "score"
        head.append(name if name == TASK_TITLES[t] else f"{TASK_TITLES[t]} {name}")
    head += [f"acceptance {TASK_TITLES[t]}" for t in gen]
    head += [f"tokens/step {TASK_TITLES[t]}" for t in gen]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "|".join("---:" for _ in head[1:]) + "|"]
    for row in table["rows"]:
        cells = [row_label(row)]
        for t in tasks:
            cells.append(_score_cell(t, table["tasks"][t]["rows"].get(row)))
        for field, spec in (("acceptance_rate", ".3f"), ("mean_tokens_per_step", ".2f")):
            for t in gen:
                r = table["tasks"][t]["rows"].get(row) or {}
                cells.append(_f(r.get(field), spec) if row.startswith("qspec") else "")
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for t in tasks:
        for d, c in sorted(table["tasks"][t]["qspec_equals_w4a16"].items()):
            what = "tokens" if c["compared"] == "tokens" else "chunk NLLs"
            notes.append(
                f"{TASK_TITLES[t]}, draft {d}: QSpec == W4A16 ({what}) on {c['text']} items"
            )
    cfg = table["config"]
    setup = [f"model {cfg.get('model')}", f"weights {cfg.get('quant')}"]
    if cfg.get("quant") not in ("gguf", None):
        setup[-1] += f" group {cfg.get('group_size')}"
    setup.append("fp = float weights")
    limits = cfg.get("limits", {})
    setup.append(
        "items: "
        + ", ".join(
            f"{TASK_TITLES[t]} {table['tasks'][t]['rows'].get('w4a16', {}).get('n_items', '?')}"
            f" ({'all' if limits.get(t) is None else 'first ' + str(limits[t])})"
            for t in tasks
        )
    )
    if gen:
        mnt = cfg.get("max_new_tokens") or {}
        setup.append(
            "greedy (temperature 0), max new tokens "
            + ", ".join(f"{TASK_TITLES[t]} {mnt.get(t)}" for t in gen)
            + f", QSpec gamma {cfg.get('gamma')}"
        )
    if "perplexity" in tasks:
        setup.append(
            f"perplexity in chunks of {cfg.get('seq_len')} tokens; QSpec's is its W4A16 "
            "verifier's (teacher-forced), for both drafts"
        )
    if cfg.get("report_only"):
        setup.append("REPORT OF AN UNFINISHED RUN: each cell counts the items done so far")
    text = "\n".join(lines) + "\n\n" + "; ".join(setup) + "."
    if notes:
        text += "\n\n" + "; ".join(notes) + "."
    if table.get("qspec_equality_violations"):
        text += (
            "\n\nWARNING: greedy QSpec must equal W4A16 on every item; it does not in "
            + ", ".join(table["qspec_equality_violations"])
            + "."
        )
    for t, why in table.get("skipped", {}).items():
        text += f"\n\n{TASK_TITLES.get(t, t)} not run: {why}"
    return text


def plot_table(table: dict, png_path: str) -> None:
    """One bar panel per task (score per mode), QSpec bars annotated with acceptance and equality."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    tasks = [t for t in TABLE_TASKS if t in table["tasks"]]
    fig, axes = plt.subplots(
        1, max(len(tasks), 1), figsize=(5.2 * max(len(tasks), 1), 4.2), squeeze=False
    )
    colors = {
        "fp": "#7f7f7f",
        "w4a16": "#1f77b4",
        "w4a4": "#d62728",
        "w4a8": "#ff7f0e",
        "qspec-w4a4": "#98df8a",
        "qspec-w4a8": "#2ca02c",
    }
    for ax, t in zip(axes[0], tasks):
        info = table["tasks"][t]
        rows = [r for r in table["rows"] if r in info["rows"]]
        scores = [info["rows"][r].get("score") for r in rows]
        vals = [s if s is not None else 0.0 for s in scores]
        bars = ax.bar(range(len(rows)), vals, color=[colors.get(r, "#9467bd") for r in rows])
        top = max(vals + [1e-9])
        for b, r, s in zip(bars, rows, scores):
            rec = info["rows"][r]
            label = _f(s, ".3f" if t == "perplexity" else ".3f")
            if t != "perplexity" and rec.get("n_correct") is not None:
                label += f"\n{rec['n_correct']}/{rec['n_items']}"
            if r.startswith("qspec"):
                if rec.get("acceptance_rate") is not None:
                    label += f"\nacc {rec['acceptance_rate']:.2f}"
                c = info["qspec_equals_w4a16"].get(r.split("-")[1])
                if c is not None:
                    label += f"\n=w4a16 {c['text']}"
            ax.text(
                b.get_x() + b.get_width() / 2,
                b.get_height() + 0.02 * top,
                label,
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([row_label(r).replace(" (", "\n(") for r in rows], fontsize=7)
        ax.set_ylim(0, top * 1.45 if t == "perplexity" else max(0.1, top * 1.6))
        ax.set_ylabel(info["score_name"] or "score")
        n = max((info["rows"][r].get("n_items", 0) for r in rows), default=0)
        ax.set_title(
            f"{TASK_TITLES[t]} ({n} items)" + (", lower is better" if t == "perplexity" else ""),
            fontsize=10,
        )
    cfg = table["config"]
    mnt = cfg.get("max_new_tokens") or {}
    gen = [t for t in tasks if t != "perplexity"]
    fig.suptitle(
        f"{cfg.get('model')}, int4 weights {cfg.get('quant')}, greedy"
        + (
            "; max new tokens " + ", ".join(f"{TASK_TITLES[t]} {mnt.get(t)}" for t in gen)
            if gen
            else ""
        ),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def parse_per_task(
    spec: str | None,
    tasks: Iterable[str],
    option: str = "--limit",
    allow_all: bool = True,
    default: int | None = None,
) -> dict[str, int | None]:
    """``"all"``, ``"8"`` or ``"8,perplexity=all,humaneval=40"`` -> {task: value (None = all)}.

    A bare value applies to every task; ``task=value`` overrides it for one task (given in any
    order). Values are positive integers, or "all" when `allow_all`. Raises ValueError (one
    sentence naming `option`) for anything else.
    """
    tasks = list(tasks)
    out: dict[str, int | None] = {t: default for t in tasks}
    if spec is None:
        return out
    want = "a positive integer or 'all'" if allow_all else "a positive integer"

    def value(v: str) -> int | None:
        v = v.strip().lower()
        if v == "all" and allow_all:
            return None
        try:
            n = int(v)
        except ValueError:
            raise ValueError(f"{option}: expected {want}, got {v!r}") from None
        if n < 1:
            raise ValueError(f"{option}: expected {want}, got {n}")
        return n

    parts = [p.strip() for p in str(spec).split(",")]
    overrides = {}
    for p in parts:
        if not p:
            raise ValueError(f"{option} {spec!r} has an empty entry: give N or task=N pairs")
        if "=" in p:
            t, v = p.split("=", 1)
            t = t.strip()
            if t not in TABLE_TASKS:
                raise ValueError(
                    f"{option}: unknown task {t!r}: choose from {', '.join(TABLE_TASKS)}"
                )
            overrides[t] = value(v)
        else:
            n = value(p)
            out = {t: n for t in tasks}
    for t, n in overrides.items():
        if t in out:
            out[t] = n
    return out


def parse_limits(spec: str | None, tasks: Iterable[str]) -> dict[str, int | None]:
    """Item limits per task (None = all items); see `parse_per_task`."""
    return parse_per_task(spec, tasks, "--limit", allow_all=True)
