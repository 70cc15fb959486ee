"""run_eval on a fake engine: scoring, summaries, resume, atomic writes, bad input, shards and merge."""

from __future__ import annotations

import json
import os

import pytest
from eval_fake_engine import EngineCrash, FakeEngine
from hypothesis import given, settings
from hypothesis import strategies as st

from qspec_jax import atomic_io
from qspec_jax.eval import (
    EvalUsageError,
    markdown_table,
    merge_results,
    partial_path,
    plot_summary,
    run_eval,
    shard_items,
)
from qspec_jax.eval.math import load_problems
from qspec_jax.eval.perplexity import perplexity

MODES = ["w4a16", "w4a4", "qspec"]
KW = dict(max_new_tokens=512, gamma=3, progress=False)


def _math_run(tmp_path, name="math.json", engine=None, modes=MODES, limit=10, batch_size=4, **kw):
    engine = engine or FakeEngine()
    path = str(tmp_path / name)
    s = run_eval(engine, "math", modes, limit, results_path=path, batch_size=batch_size, **{**KW, **kw})
    return engine, path, s


def _core(summary):
    """The parts of a summary that must not depend on batching, resuming or sharding."""
    items = [{k: v for k, v in r.items()} for r in summary["items"]]
    return summary["results"], summary["comparisons"], items


# ------------------------------------------------------------------------------- scoring
def test_math_scores_and_summary(tmp_path):
    eng, path, s = _math_run(tmp_path)
    probs = load_problems()[:10]
    r = s["results"]
    assert r["w4a16"]["score"] == 1.0 and r["qspec"]["score"] == 1.0
    # the fake's w4a4 is wrong unless the problem number is a multiple of 3
    right = sum(int(p["id"].split("-")[1]) % 3 == 0 for p in probs)
    assert r["w4a4"]["n_correct"] == right and r["w4a4"]["score"] == right / 10
    assert all(r[m]["n_items"] == 10 and r[m]["score_name"] == "accuracy" for m in MODES)
    comp = s["comparisons"]
    assert comp["qspec_equals_w4a16_tokens"] == 1.0 and comp["qspec_equals_w4a16_items"] == "10/10"
    assert comp["recovered"] == pytest.approx(1.0)
    assert comp["qspec_greedy_equality_violated"] is False
    # tokens and speed: the fake's wall time is 1 ms per token (0.6 ms in qspec)
    toks = r["w4a16"]["tokens_generated"]
    assert toks == sum(len(x["tokens"]) for x in s["items"] if x["mode"] == "w4a16")
    assert r["w4a16"]["tokens_per_s"] == pytest.approx(1000.0)
    assert comp["qspec_speedup_vs_w4a16"] == pytest.approx(1 / 0.6)
    # acceptance statistics are the sums of the per-batch engine stats
    bs = [b for b in s["batches"] if b["mode"] == "qspec"]
    assert r["qspec"]["draft_tokens_proposed"] == sum(b["draft_tokens_proposed"] for b in bs)
    assert r["qspec"]["acceptance_rate"] == pytest.approx(
        sum(b["draft_tokens_accepted"] for b in bs) / sum(b["draft_tokens_proposed"] for b in bs))
    committed = sum(b["tokens_generated"] - b["n"] for b in bs)
    assert r["qspec"]["mean_tokens_per_step"] == pytest.approx(committed / sum(b["verify_steps"] for b in bs))
    assert r["qspec"]["gamma"] == 3
    # batching: 10 items in batches of 4 -> 3 calls per mode
    assert eng.generate_calls == [(m, n) for m in MODES for n in (4, 4, 2)]
    # the file holds what was returned, per item: id, mode, tokens, correct, text
    with open(path) as f:
        on_disk = json.load(f)
    assert on_disk["results"] == json.loads(json.dumps(s["results"]))
    item = on_disk["items"][0]
    assert {"id", "mode", "tokens", "correct", "text", "pred", "answer"} <= set(item)
    assert item["text"].endswith(f"The answer is {probs[0]['answer']}.")


def test_qspec_mismatch_is_reported(tmp_path):
    eng = FakeEngine(qspec_differs={"math-002"})
    _, _, s = _math_run(tmp_path, engine=eng, limit=4)
    assert s["comparisons"]["qspec_equals_w4a16_tokens"] == 0.75
    assert s["comparisons"]["qspec_mismatch_ids"] == ["math-002"]
    assert s["comparisons"]["qspec_greedy_equality_violated"] is True
    assert "WARNING: greedy QSpec must equal W4A16" in markdown_table(s)
    _, _, s = _math_run(tmp_path, name="t.json", engine=FakeEngine(qspec_differs={"math-002"}),
                        limit=4, temperature=0.7)
    assert s["comparisons"]["qspec_greedy_equality_violated"] is None


def test_continuous_batching_groups_items_and_keeps_every_result(tmp_path):
    static = _math_run(tmp_path, "static.json", limit=20, batch_size=2)[2]
    eng, path, cont = _math_run(tmp_path, "cont.json", limit=20, batch_size=2, continuous=True)
    # 20 items in groups of CONTINUOUS_GROUP * 2 = 16: two generate_many calls per mode, 2 rows
    assert eng.many_calls == [(m, n, 2) for m in MODES for n in (16, 4)]
    assert _core(cont)[0] == _core(static)[0] and _core(cont)[2] == _core(static)[2]
    assert cont["config"]["continuous"] is True and "continuous" not in static["config"]


def test_recovered_undefined_without_gap_or_modes(tmp_path):
    _, _, s = _math_run(tmp_path, modes=["w4a16", "qspec"], limit=3)
    assert s["comparisons"]["recovered"] is None
    assert set(s["results"]) == {"w4a16", "qspec"}
    # math-003 (the third shard of three items) is one the fake's w4a4 gets right: no gap
    _, _, s = _math_run(tmp_path, name="b.json", limit=3, process_index=2, process_count=3)
    assert [r["score"] for r in s["results"].values()] == [1.0, 1.0, 1.0]
    assert s["comparisons"]["recovered"] is None


def test_truncation_counted(tmp_path):
    _, _, s = _math_run(tmp_path, max_new_tokens=20, limit=3, modes=["w4a16"])
    assert s["results"]["w4a16"]["truncated"] == 3
    assert s["results"]["w4a16"]["mean_new_tokens"] == 20


def test_humaneval_pass_at_1(tmp_path):
    eng = FakeEngine()
    s = run_eval(eng, "humaneval", MODES, 4, results_path=str(tmp_path / "he.json"), batch_size=4,
                 exec_timeout=10, **KW)
    r = s["results"]
    assert r["w4a16"]["score"] == 1.0 and r["qspec"]["score"] == 1.0
    assert r["w4a4"]["score"] == 0.5  # odd task ids get a wrong body
    assert r["w4a16"]["score_name"] == "pass@1"
    it = next(x for x in s["items"] if x["mode"] == "w4a4" and x["id"] == "HumanEval/1")
    assert not it["correct"] and it["result"].startswith("failed")
    it = next(x for x in s["items"] if x["mode"] == "w4a16" and x["id"] == "HumanEval/0")
    assert "unrelated_helper" in it["text"] and "unrelated_helper" not in it["completion"]
    assert s["config"]["humaneval_style"] == "completion"


def test_humaneval_chat_style(tmp_path):
    s = run_eval(FakeEngine(), "humaneval", ["w4a16"], 2, results_path=str(tmp_path / "hc.json"),
                 humaneval_style="chat", **{**KW, "max_new_tokens": 4096})
    assert s["results"]["w4a16"]["score"] == 1.0
    assert s["results"]["w4a16"]["truncated"] == 0


def test_perplexity_task(tmp_path):
    eng = FakeEngine()
    s = run_eval(eng, "perplexity", ["w4a16", "w4a4", "qspec"], None, max_new_tokens=1, gamma=3,
                 results_path=str(tmp_path / "ppl.json"), progress=False, seq_len=128, batch_size=3)
    r = s["results"]
    assert r["w4a16"]["score"] == pytest.approx(perplexity(eng, "w4a16", seq_len=128), rel=1e-12)
    assert r["w4a4"]["score"] == pytest.approx(perplexity(eng, "w4a4", seq_len=128), rel=1e-12)
    assert r["qspec"]["score"] == r["w4a16"]["score"] and r["qspec"]["precision"] == "w4a16"
    assert r["w4a16"]["score_name"] == "perplexity"
    assert s["comparisons"]["higher_is_better"] is False
    assert s["comparisons"]["recovered"] == pytest.approx(1.0)
    assert s["comparisons"]["qspec_equals_w4a16_tokens"] is None
    # limit counts chunks
    s2 = run_eval(eng, "perplexity", ["w4a16"], 2, max_new_tokens=1, gamma=3,
                  results_path=str(tmp_path / "ppl2.json"), progress=False, seq_len=128)
    assert s2["results"]["w4a16"]["n_items"] == 2 and s2["results"]["w4a16"]["tokens_scored"] == 2 * 127


# ------------------------------------------------------------------------------- resume
def test_resume_after_interruption_equals_clean_run(tmp_path):
    _, _, clean = _math_run(tmp_path, name="clean.json", limit=10, batch_size=3)
    path = str(tmp_path / "run.json")
    crashing = FakeEngine(fail_after=5)  # w4a16: 4 batches, w4a4: 1 batch, then a crash
    with pytest.raises(EngineCrash):
        run_eval(crashing, "math", MODES, 10, results_path=path, batch_size=3, **KW)
    assert not os.path.exists(path)  # no final file from an interrupted run
    with open(partial_path(path)) as f:
        lines = [json.loads(x) for x in f]
    assert lines[0]["type"] == "config"
    assert sum(x["type"] == "item" for x in lines) == 10 + 3
    resumed = FakeEngine()
    s = run_eval(resumed, "math", MODES, 10, results_path=path, batch_size=3, **KW)
    # only the missing items were generated: 7 of w4a4 and all 10 of qspec
    assert resumed.generate_calls == [("w4a4", 3), ("w4a4", 3), ("w4a4", 1),
                                      ("qspec", 3), ("qspec", 3), ("qspec", 3), ("qspec", 1)]
    assert _core(s) == _core(clean)
    # a third run generates nothing and rewrites the same summary
    again = FakeEngine()
    assert _core(run_eval(again, "math", MODES, 10, results_path=path, batch_size=3, **KW)) == _core(clean)
    assert again.generate_calls == []


def test_resume_with_different_batch_size_and_added_mode(tmp_path):
    _, path, _ = _math_run(tmp_path, modes=["w4a16"], limit=6, batch_size=4)
    eng = FakeEngine()
    s = run_eval(eng, "math", ["w4a16", "qspec"], 6, results_path=path, batch_size=6, **KW)
    assert eng.generate_calls == [("qspec", 6)]
    assert s["comparisons"]["qspec_equals_w4a16_tokens"] == 1.0


def test_torn_last_line_is_dropped(tmp_path):
    _, path, clean = _math_run(tmp_path, limit=5, batch_size=2)
    ppath = partial_path(path)
    with open(ppath) as f:
        lines = f.readlines()
    # drop the last batch line and tear the line before it (a crash during the final write)
    with open(ppath, "w") as f:
        f.writelines(lines[:-2])
        f.write(lines[-2][: len(lines[-2]) // 2])
    eng = FakeEngine()
    s = run_eval(eng, "math", MODES, 5, results_path=path, batch_size=2, **KW)
    assert eng.generate_calls == [("qspec", 1)]  # the last qspec batch held one item
    assert _core(s) == _core(clean)
    with open(ppath) as f:
        assert all(json.loads(x) for x in f)  # the torn piece was cut off before appending


def test_config_mismatch_is_a_clear_error(tmp_path):
    _, path, _ = _math_run(tmp_path, limit=3, modes=["w4a16"])
    with pytest.raises(EvalUsageError, match=r"different configuration \(max_new_tokens: 512 there, 256 now\)"):
        run_eval(FakeEngine(), "math", ["w4a16"], 3, results_path=path, progress=False,
                 max_new_tokens=256, gamma=3)
    with pytest.raises(EvalUsageError, match="limit: 3 there, 4 now"):
        run_eval(FakeEngine(), "math", ["w4a16"], 4, results_path=path, **KW)
    with pytest.raises(EvalUsageError, match="engine"):
        run_eval(FakeEngine(source="other-model"), "math", ["w4a16"], 3, results_path=path, **KW)


def test_foreign_partial_file_is_rejected(tmp_path):
    path = str(tmp_path / "x.json")
    with open(partial_path(path), "w") as f:
        f.write("hello\n")
    with pytest.raises(EvalUsageError, match="not a qspec-jax partial results file"):
        run_eval(FakeEngine(), "math", ["w4a16"], 1, results_path=path, **KW)


# ------------------------------------------------------------------------------- atomic write
def _dir_files(d):
    return sorted(os.listdir(d))


def test_final_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "atomic.json")

    def broken_fsync(fd):  # the bytes reached the temp file, then the disk "fails"
        raise OSError("disk full")

    monkeypatch.setattr(atomic_io.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        run_eval(FakeEngine(), "math", ["w4a16"], 2, results_path=path, **KW)
    assert not os.path.exists(path)
    assert _dir_files(tmp_path) == ["atomic.partial.jsonl"]  # no temp file left behind
    monkeypatch.undo()

    good = run_eval(FakeEngine(), "math", ["w4a16"], 2, results_path=path, **KW)
    with open(path) as f:
        before = f.read()
    monkeypatch.setattr(atomic_io.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        run_eval(FakeEngine(), "math", ["w4a16"], 2, results_path=path, **KW)
    with open(path) as f:
        assert f.read() == before  # the old summary is intact
    assert json.loads(before)["results"] == json.loads(json.dumps(good["results"]))
    assert _dir_files(tmp_path) == ["atomic.json", "atomic.partial.jsonl"]


def test_summary_json_is_strict(tmp_path):
    # NaN never reaches the file (e.g. acceptance with nothing proposed)
    _, path, _ = _math_run(tmp_path, limit=1, max_new_tokens=1, modes=["qspec"])
    with open(path) as f:
        data = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["results"]["qspec"]["acceptance_rate"] is None


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(task="gsm8k"), "unknown task 'gsm8k'"),
        (dict(modes=["w4a16", "w2a2"]), "unknown mode 'w2a2'"),
        (dict(modes=[]), "no modes given"),
        (dict(modes="fp"), "mode 'fp' is not available on this engine"),
        (dict(limit=0), "limit must be a positive integer"),
        (dict(limit=-3), "limit must be a positive integer"),
        (dict(limit=2.5), "limit must be a positive integer"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(gamma=0), "gamma must be a positive integer"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(temperature=-1.0), "temperature must be a number >= 0"),
        (dict(process_index=2, process_count=2), "process_index must be an integer in"),
        (dict(humaneval_style="fim"), "unknown HumanEval prompt style"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = dict(task="math", modes=["w4a16"], limit=2, max_new_tokens=8, gamma=3,
                results_path=str(tmp_path / "r.json"), progress=False)
    args.update(kwargs)
    eng = FakeEngine()
    with pytest.raises(ValueError, match=match) as e:
        run_eval(eng, **args)
    msg = str(e.value)
    assert "\n" not in msg and msg.count(". ") == 0  # one sentence
    assert eng.generate_calls == [] and os.listdir(tmp_path) == []


def test_unwritable_paths(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    for bad, match in [(str(f / "r.json"), "cannot write results to"),
                       (str(tmp_path), "is a directory"),
                       ("", "must be a file path"),
                       (None, "must be a file path")]:
        with pytest.raises(EvalUsageError, match=match):
            run_eval(FakeEngine(), "math", ["w4a16"], 1, results_path=bad, **KW)
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(EvalUsageError, match="cannot write results to"):
            run_eval(FakeEngine(), "math", ["w4a16"], 1, results_path=str(ro / "r.json"), **KW)


def test_modes_as_comma_string_and_duplicates(tmp_path):
    s = run_eval(FakeEngine(), "math", "w4a16, qspec,w4a16", 1, results_path=str(tmp_path / "r.json"), **KW)
    assert s["modes"] == ["w4a16", "qspec"]


# ------------------------------------------------------------------------------- shards
@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 60), k=st.integers(1, 9))
def test_shard_items_partition(n, k):
    items = list(range(n))
    shards = [shard_items(items, i, k) for i in range(k)]
    assert sum(shards, []) == items
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert shard_items(items, 0, k) == shards[0]  # deterministic


def test_shard_items_bad():
    with pytest.raises(ValueError):
        shard_items([1], 0, 0)
    with pytest.raises(ValueError):
        shard_items([1], -1, 2)


@pytest.mark.parametrize("use_partial", [False, True])
def test_merge_equals_single_run(tmp_path, use_partial):
    _, _, single = _math_run(tmp_path, name="single.json", limit=11, batch_size=4)
    paths = []
    for i in range(3):
        p = str(tmp_path / f"shard{i}.json")
        s = run_eval(FakeEngine(), "math", MODES, 11, results_path=p, batch_size=2,
                     process_index=i, process_count=3, **KW)
        assert s["results"]["w4a16"]["n_items"] == len(shard_items(list(range(11)), i, 3))
        paths.append(partial_path(p) if use_partial else p)
    merged = merge_results(paths[::-1], str(tmp_path / "merged.json"))
    assert _core(merged) == _core(single)
    assert merged["config"]["process_count"] == 3 and merged["config"]["process_index"] is None
    with open(tmp_path / "merged.json") as f:
        assert json.load(f)["results"] == json.loads(json.dumps(single["results"]))


def test_merge_errors(tmp_path):
    paths = []
    for i in range(2):
        p = str(tmp_path / f"s{i}.json")
        run_eval(FakeEngine(), "math", ["w4a16"], 4, results_path=p, process_index=i, process_count=2, **KW)
        paths.append(p)
    with pytest.raises(EvalUsageError, match=r"shards \[1\] of 2 are missing"):
        merge_results(paths[:1])
    with pytest.raises(EvalUsageError, match="same shard"):
        merge_results([paths[0], paths[0]])
    other = str(tmp_path / "other.json")
    run_eval(FakeEngine(), "math", ["w4a16"], 4, results_path=other, process_index=1, process_count=2,
             max_new_tokens=99, gamma=3, progress=False)
    with pytest.raises(EvalUsageError, match="different configuration"):
        merge_results([paths[0], other])
    with pytest.raises(EvalUsageError, match="does not exist"):
        merge_results([str(tmp_path / "nope.json")])
    with pytest.raises(EvalUsageError, match="no result files"):
        merge_results([])


# ------------------------------------------------------------------------------- report
def test_markdown_table_and_plot(tmp_path):
    _, path, s = _math_run(tmp_path, limit=4)
    table = markdown_table(s)
    lines = table.splitlines()
    assert lines[0].startswith("| mode | accuracy | items |") and lines[1].startswith("|---|")
    assert sum(line.startswith("| qspec |") for line in lines) == 1
    assert "QSpec tokens equal W4A16 tokens on 4/4 items" in table
    png = str(tmp_path / "plot.png")
    plot_summary(s, png)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_draft_precision_reaches_qspec_and_is_part_of_the_configuration(tmp_path):
    class Recording(FakeEngine):
        def generate(self, prompts, mode="fp", *args, **kw):
            self.seen = getattr(self, "seen", []) + [(mode, kw.get("draft"))]
            return super().generate(prompts, mode, *args, **kw)

    eng, path, s = _math_run(tmp_path, engine=Recording(), limit=2, draft="w4a4")
    assert set(eng.seen) == {("w4a16", None), ("w4a4", None), ("qspec", "w4a4")}
    assert s["config"]["draft"] == "w4a4"
    with pytest.raises(EvalUsageError, match=r"draft: \"w4a4\" there, \"w4a8\" now"):
        run_eval(FakeEngine(), "math", MODES, 2, results_path=path, **KW)
    with pytest.raises(EvalUsageError, match="unknown draft precision 'w4a2'"):
        run_eval(FakeEngine(), "math", MODES, 2, results_path=str(tmp_path / "y.json"), draft="w4a2", **KW)
