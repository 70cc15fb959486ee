"""The run_eval command line (qspec_jax/eval/run_cli.py, `python -m experiments.run_eval`): argument
errors (exit 2, one line) and a full run on the fake engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from eval_fake_engine import FakeEngine

from qspec_jax.eval import run_cli as run_eval_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _must_not_load(args):
    raise AssertionError("the model must not be loaded for a bad command line")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--task", "gsm8k"], "argument --task: invalid choice"),
        (["--modes", "w4a16,w9"], "unknown mode 'w9'"),
        (["--limit", "0"], "limit must be a positive integer"),
        (["--limit", "-2"], "limit must be a positive integer"),
        (["--limit", "many"], "expected a positive integer or 'all'"),
        (["--gamma", "0", "--modes", "qspec"], "gamma must be a positive integer"),
        (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
        (["--modes", "fp"], "mode fp needs float weights"),
        (["--quant", "none", "--modes", "w4a16"], "need int4 weights"),
        (["--quant", "int3"], "argument --quant: invalid choice"),
        (["--group-size", "-1"], "--group-size must be >= 0"),
        (["--process-index", "3", "--process-count", "2"], "process_index must be an integer in"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2_one_line(tmp_path, capsys, argv, match):
    rc = run_eval_script.main(argv + ["--out", str(tmp_path / "o")], load_engine=_must_not_load)
    err = capsys.readouterr().err
    assert rc == 2
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_unwritable_out(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc = run_eval_script.main(["--out", str(f / "sub")], load_engine=_must_not_load)
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write results to" in err and err.count("\n") == 1


def test_engine_usage_error_is_one_line(tmp_path, capsys):
    rc = run_eval_script.main(["--out", str(tmp_path), "--modes", "w4a16"],
                              load_engine=lambda a: FakeEngine(modes=("fp",)))
    err = capsys.readouterr().err
    assert rc == 2 and "not available on this engine" in err and err.count("\n") == 1


def test_subprocess_exit_status_and_no_traceback(tmp_path):
    cmd = [sys.executable, "-m", "experiments.run_eval", "--limit", "0", "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "limit must be a positive integer" in p.stderr
    assert p.stdout == ""


def test_full_run_on_fake_engine(tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["--task", "math", "--modes", "w4a16,w4a4,qspec", "--limit", "5", "--batch-size", "2",
            "--max-new-tokens", "200", "--out", str(out), "--no-progress"]
    assert run_eval_script.main(argv, load_engine=lambda a: FakeEngine()) == 0
    stdout = capsys.readouterr().out
    name = "math_smollm2-135m_gguf_n5"
    assert sorted(os.listdir(out)) == [f"{name}.json", f"{name}.partial.jsonl", f"{name}.png"]
    with open(out / f"{name}.json") as f:
        s = json.load(f)
    assert s["results"]["qspec"]["score"] == 1.0 and s["comparisons"]["qspec_equals_w4a16_tokens"] == 1.0
    assert "| mode | accuracy | items |" in stdout and "| qspec | 1.000 (5/5) |" in stdout

    # merge of two shards through the CLI equals the single run
    for i in range(2):
        a = argv + ["--process-index", str(i), "--process-count", "2"]
        assert run_eval_script.main(a, load_engine=lambda a: FakeEngine()) == 0
    shards = [str(out / f"{name}_shard{i}of2.json") for i in range(2)]
    assert run_eval_script.main(["--merge", *shards, "--out", str(out), "--name", "merged", "--no-plot"]) == 0
    with open(out / "merged.json") as f:
        assert json.load(f)["results"] == s["results"]


def test_perplexity_defaults(tmp_path, capsys):
    argv = ["--task", "perplexity", "--modes", "w4a16,w4a4", "--out", str(tmp_path), "--no-progress",
            "--seq-len", "512"]
    assert run_eval_script.main(argv, load_engine=lambda a: FakeEngine()) == 0
    stdout = capsys.readouterr().out
    assert "| mode | perplexity | items | tokens scored | tokens/s |" in stdout
    assert os.path.exists(tmp_path / "perplexity_smollm2-135m_gguf_all.json")
