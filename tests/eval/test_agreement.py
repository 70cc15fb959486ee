"""qspec_jax/eval/agreement.py and its command line qspec_jax/eval/agreement_cli.py
(`python -m experiments.bench_agreement`).

The metric functions are checked on hand-made token sequences and logits with hand-computed
answers; the command line runs end to end on the tiny random-weight model (float engine for fp,
RTN int4 engine for the rest), with token-id prompts since the tiny preset has no tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from qspec_jax.eval import agreement_cli as bench
from qspec_jax.eval.agreement import (
    MODES,
    cut_at_eos,
    even_batches,
    greedy_agreement,
    kl_divergence,
    load_prompts,
    log_softmax64,
    markdown_table,
    match_counts,
    mode_spec,
    prefix_match_length,
    qspec_equality,
    summarize_agreement,
    teacher_forced_compare,
    teacher_forced_positions,
)
from qspec_jax.eval.harness import EvalUsageError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EOS = (2,)


# ------------------------------------------------------------------------------ greedy metrics
def test_cut_at_eos_keeps_the_first_eos_and_cuts_to_n():
    assert cut_at_eos([5, 6, 2, 9, 2], EOS, 10) == [5, 6, 2]
    assert cut_at_eos([5, 6, 7, 8], EOS, 3) == [5, 6, 7]
    assert cut_at_eos([5, 7, 6], (6, 7), 10) == [5, 7]  # any of several EOS ids
    assert cut_at_eos([2], EOS, 4) == [2]
    assert cut_at_eos([], EOS, 4) == []


def test_prefix_match_length():
    assert prefix_match_length([1, 3, 4, 5], [1, 3, 4, 5], EOS, 8) == 4  # identical: full length
    assert prefix_match_length([1, 3, 4, 5], [9, 3, 4, 5], EOS, 8) == 0
    assert prefix_match_length([1, 3, 4, 5], [1, 3, 7, 5], EOS, 8) == 2
    # tokens after both EOS do not count: identical up to and including EOS
    assert prefix_match_length([1, 3, 2, 9, 9], [1, 3, 2, 7], EOS, 8) == 3
    # one stops (EOS) where the other goes on: they differ at the EOS position
    assert prefix_match_length([1, 3, 2], [1, 3, 4, 5], EOS, 8) == 2
    # only the first n positions are compared
    assert prefix_match_length([1, 3, 4, 5], [1, 3, 4, 6], EOS, 3) == 3


def test_match_counts_eos_handling():
    # ref stops at position 3 (EOS), hyp goes on to 6 tokens: counted = 6 positions;
    # matches at 0 and 2; 1 differs, 3 is EOS vs 8, 4-5 are past ref's EOS (mismatches)
    assert match_counts([5, 6, 7, 2], [5, 9, 7, 8, 8, 8], EOS, 128) == (2, 6)
    # symmetric in which sequence stops first
    assert match_counts([5, 9, 7, 8, 8, 8], [5, 6, 7, 2], EOS, 128) == (2, 6)
    # both stop at the same position: the positions after are not counted (not 128)
    assert match_counts([5, 2], [5, 2], EOS, 128) == (2, 2)
    assert match_counts([5, 2], [6, 2], EOS, 128) == (1, 2)  # both chose to stop at 1
    # tokens after the first EOS are ignored
    assert match_counts([5, 2, 5, 5], [5, 2, 6, 6], EOS, 128) == (2, 2)
    # no EOS: cut to n positions
    assert match_counts(list(range(3, 13)), list(range(3, 13)), EOS, 4) == (4, 4)
    assert match_counts([3, 4, 5, 6], [3, 9, 5, 9], EOS, 4) == (2, 4)


def test_greedy_agreement_fields():
    g = greedy_agreement([5, 6, 7, 2], [5, 6, 8, 8, 8], EOS, 128)
    assert g == {
        "prefix": 2,
        "matches": 2,
        "counted": 5,
        "match_fraction": 2 / 5,
        "identical": False,
        "ref_len": 4,
        "hyp_len": 5,
    }
    g = greedy_agreement([5, 2, 9], [5, 2], EOS, 128)
    assert g["identical"] and g["prefix"] == 2 and g["match_fraction"] == 1.0
    assert greedy_agreement([], [], EOS, 4)["match_fraction"] is None


def test_even_batches():
    assert even_batches(68, 32) == [(0, 22), (22, 45), (45, 68)]
    assert even_batches(5, 8) == [(0, 5)]
    assert even_batches(8, 4) == [(0, 4), (4, 8)]
    for n, b in ((1, 1), (7, 3), (64, 32), (65, 32)):
        r = even_batches(n, b)
        sizes = [e - s for s, e in r]
        assert r[0][0] == 0 and r[-1][1] == n and max(sizes) <= b and max(sizes) - min(sizes) <= 1
        assert all(r[i][1] == r[i + 1][0] for i in range(len(r) - 1))


# ------------------------------------------------------------------------------ teacher-forced
def test_kl_zero_for_identical_logits():
    rng = np.random.default_rng(0)
    lg = rng.normal(size=(7, 300)).astype(np.float32) * 5
    kl = kl_divergence(lg, lg)
    assert kl.dtype == np.float64 and kl.shape == (7,)
    assert np.all(kl == 0.0)  # lp - lq is exactly 0 in every term


def test_kl_matches_hand_computation():
    # p = softmax([0, ln 3]) = (1/4, 3/4), q = uniform (1/2, 1/2):
    # KL(p||q) = 1/4 ln(1/2) + 3/4 ln(3/2); KL(q||p) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    # float64 inputs and float64 arithmetic: agreement to ~1e-16 is expected, 1e-12 allowed.
    p = np.array([[0.0, math.log(3.0)]])
    q = np.array([[0.0, 0.0]])
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert want == pytest.approx(0.130812, abs=1e-6)
    assert kl_divergence(p, q)[0] == pytest.approx(want, abs=1e-12)
    assert kl_divergence(q, p)[0] == pytest.approx(0.5 * math.log(4 / 3), abs=1e-12)  # direction
    # invariant to a constant shift of either row's logits, stable for large logits
    assert kl_divergence(p + 1000.0, q - 700.0)[0] == pytest.approx(want, abs=1e-12)


def test_kl_float32_logits_against_scipy_free_reference():
    # random float32 logits: compare with a direct float64 formula from probabilities
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 50)).astype(np.float32)
    b = a + rng.normal(scale=0.3, size=a.shape).astype(np.float32)
    pa = np.exp(a.astype(np.float64)) / np.exp(a.astype(np.float64)).sum(-1, keepdims=True)
    pb = np.exp(b.astype(np.float64)) / np.exp(b.astype(np.float64)).sum(-1, keepdims=True)
    want = (pa * np.log(pa / pb)).sum(-1)
    got = kl_divergence(a, b)
    assert np.all(got > 0)
    np.testing.assert_allclose(got, want, rtol=1e-10)  # same float64 math, different order
    np.testing.assert_allclose(np.exp(log_softmax64(a)).sum(-1), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        kl_divergence(a, b[:, :10])


def test_teacher_forced_positions_and_top1():
    # prompt of 3 tokens, 2 generated: logits at 2 and 3 predict sequence positions 3 and 4
    assert teacher_forced_positions(3, 2).tolist() == [2, 3]
    assert teacher_forced_positions(1, 0).tolist() == []
    with pytest.raises(ValueError):
        teacher_forced_positions(0, 2)
    ref = np.array([[0.0, 1.0, 0.5], [2.0, 1.0, 0.0]])
    hyp = np.array([[0.0, 2.0, 0.5], [0.0, 1.0, 0.0]])
    c = teacher_forced_compare(ref, hyp)
    assert c["top1"].tolist() == [True, False]
    assert c["kl"][0] > 0 and c["kl"][1] > 0


def test_mode_spec_and_qspec_equality():
    assert mode_spec("qspec-w4a4") == {
        "generate_mode": "qspec",
        "draft": "w4a4",
        "tf_precision": "w4a16",
        "weights": "int4",
    }
    assert mode_spec("fp")["weights"] == "float" and mode_spec("w4a8")["tf_precision"] == "w4a8"
    assert set(MODES) == {"fp", "w4a16", "w4a4", "w4a8", "qspec-w4a8", "qspec-w4a4"}
    with pytest.raises(EvalUsageError, match="unknown mode 'qspec'"):
        mode_spec("qspec")
    eq = qspec_equality({"w4a16": [[1, 2], [3]], "qspec-w4a8": [[1, 2], [4]], "fp": [[0], [0]]})
    assert eq == {"qspec-w4a8": {"per_prompt": [True, False], "all_equal": False, "mismatch": [1]}}


def test_summarize_pools_over_positions():
    rows = [
        {
            "modes": {
                "w4a4": {
                    "prefix": 2,
                    "matches": 2,
                    "counted": 4,
                    "match_fraction": 0.5,
                    "identical": False,
                    "hyp_len": 4,
                    "tf_precision": "w4a4",
                    "tf_positions": 1,
                    "tf_kl_sum": 3.0,
                    "tf_kl_max": 3.0,
                    "tf_top1_matches": 0,
                }
            }
        },
        {
            "modes": {
                "w4a4": {
                    "prefix": 6,
                    "matches": 3,
                    "counted": 3,
                    "match_fraction": 1.0,
                    "identical": True,
                    "hyp_len": 3,
                    "tf_precision": "w4a4",
                    "tf_positions": 3,
                    "tf_kl_sum": 1.0,
                    "tf_kl_max": 0.5,
                    "tf_top1_matches": 3,
                }
            }
        },
    ]
    s = summarize_agreement(rows, ["w4a4"])["w4a4"]
    assert s["prefix_mean"] == 4 and s["prefix_median"] == 4 and s["identical_to_fp"] == 1
    assert s["match_fraction_mean"] == 0.75 and s["match_fraction_pooled"] == 5 / 7
    assert s["kl_mean"] == 1.0  # (3 + 1) / 4 positions, every position weighs the same
    assert s["kl_prompt_mean"] == (3.0 + 1 / 3) / 2 and s["kl_max"] == 3.0
    assert s["tf_top1"] == 3 / 4


def test_load_prompts_errors(tmp_path):
    good = tmp_path / "p.json"
    good.write_text(json.dumps({"prompts": ["hi", [1, 5, 7]]}))
    prompts, sha = load_prompts(str(good))
    assert prompts == ["hi", [1, 5, 7]] and len(sha) == 16
    for text, match in [
        ("{", "not valid JSON"),
        (json.dumps({"prompts": []}), "non-empty list"),
        (json.dumps(["a"]), "non-empty list"),
        (json.dumps({"prompts": ["ok", 3]}), "prompt 1"),
        (json.dumps({"prompts": [[1, True]]}), "prompt 0"),
        (json.dumps({"prompts": ["  "]}), "prompt 0"),
    ]:
        good.write_text(text)
        with pytest.raises(EvalUsageError, match=match):
            load_prompts(str(good))
    with pytest.raises(EvalUsageError, match="cannot read"):
        load_prompts(str(tmp_path / "missing.json"))


def test_project_prompt_set():
    prompts, _ = load_prompts(bench.PROMPTS_FILE)
    with open(os.path.join(ROOT, "experiments", "data", "heldout_prompts.json")) as f:
        heldout = json.load(f)["prompts"]
    assert len(prompts) >= 64 and len(set(prompts)) == len(prompts)
    assert prompts[: len(heldout)] == heldout  # the 24 held-out prompts, then new ones


# ------------------------------------------------------------------------------ command line
def _must_not_load(args):
    raise AssertionError("the model must not be loaded for a bad command line")


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--modes", "fp,w9"], "unknown mode 'w9'"),
        (["--modes", "w4a16,w4a4"], "must include fp"),
        (["--modes", "fp,qspec-w4a4"], "needs w4a16"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
        (["--limit", "-1"], "--limit must be a positive integer"),
        (["--quant", "int3"], "argument --quant: invalid choice"),
        (["--group-size", "-2"], "--group-size must be >= 0"),
        (["--prompts", "/nonexistent/p.json"], "cannot read the prompts file"),
        (["--out", "x.txt"], "--out must name a .json file"),
        (["--bogus"], "unrecognized arguments"),
        (["--replot", "/nonexistent/a.json"], "cannot read results"),
    ],
)
def test_bad_arguments_exit_2_one_line(capsys, argv, match):
    rc = bench.main(argv, load_engines=_must_not_load)
    err = capsys.readouterr().err
    assert rc == 2
    assert match in err and err.count("\n") == 1 and "Traceback" not in err


def test_subprocess_bad_input_exit_2_no_traceback(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.bench_agreement",
            "--modes",
            "w4a16",
            "--out",
            str(tmp_path / "a.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "must include fp" in p.stderr


@pytest.fixture(scope="module")
def tiny_engines():
    import qspec_jax

    fp = qspec_jax.load("tiny", compile_cache=False, quant_cache=False)
    q = qspec_jax.load(
        "tiny", quant="rtn", group_size=64, progress=False, compile_cache=False, quant_cache=False
    )
    return fp, q


@pytest.fixture()
def tiny_prompts(tmp_path):
    rng = np.random.default_rng(3)
    prompts = [[1] + rng.integers(3, 256, size=n).tolist() for n in (4, 9, 6, 12, 7)]
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"prompts": prompts}))
    return str(path), prompts


N_NEW = 12
TINY_ARGS = [
    "--model",
    "tiny",
    "--quant",
    "rtn",
    "--modes",
    "fp,w4a16,qspec-w4a4",
    "--max-new-tokens",
    str(N_NEW),
    "--batch-size",
    "4",
    "--tf-batch-size",
    "2",
]


def test_cli_end_to_end_on_tiny(tmp_path, tiny_engines, tiny_prompts, capsys):
    path, prompts = tiny_prompts
    out = tmp_path / "res" / "agree.json"
    argv = TINY_ARGS + ["--prompts", path, "--out", str(out)]
    assert bench.main(argv, load_engines=lambda a: tiny_engines) == 0
    stdout = capsys.readouterr().out
    assert (
        "| mode | identical to fp |" in stdout
        and "qspec-w4a4 tokens == w4a16 tokens on 5/5" in stdout
    )
    assert sorted(os.listdir(out.parent)) == ["agree.json", "agree.png"]
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["ok"] and doc["started_utc"] and doc["finished_utc"]
    assert doc["command"].startswith("python -m experiments.bench_agreement --model tiny")
    assert doc["config"]["n_prompts"] == 5 and doc["config"]["max_new_tokens"] == N_NEW
    assert doc["machine"]["cores"] == os.cpu_count()
    assert doc["qspec_equality"]["qspec-w4a4"]["per_prompt"] == [True] * 5
    s = doc["summary"]
    assert list(s) == ["fp", "w4a16", "qspec-w4a4"]
    # fp against itself: everything agrees, KL exactly 0
    assert s["fp"]["identical_to_fp"] == 5 and s["fp"]["match_fraction_mean"] == 1.0
    assert s["fp"]["tf_top1"] == 1.0 and s["fp"]["kl_mean"] == 0.0
    # int4 weights move the random tiny model's distribution: KL > 0, top-1 below 1
    assert s["w4a16"]["kl_mean"] > 0 and s["w4a16"]["tf_top1"] < 1.0
    # QSpec: W4A16's tokens, so W4A16's greedy numbers; its teacher-forced numbers are W4A16's
    for k in ("prefix_mean", "match_fraction_mean", "identical_to_fp", "tf_top1", "kl_mean"):
        assert s["qspec-w4a4"][k] == s["w4a16"][k]
    assert s["qspec-w4a4"]["tf_precision"] == "w4a16"
    # the decode path and one full forward pick the same tokens for fp (random tiny weights:
    # a near-tie could flip one position, hence >= 0.95 rather than == 1)
    assert doc["fp_self_consistency"] >= 0.95
    eos = doc["config"]["eos_token_ids"]
    fp_engine, q_engine = tiny_engines
    for r in doc["rows"]:
        fp_t, w_t = r["modes"]["fp"]["tokens"], r["modes"]["w4a16"]["tokens"]
        assert r["modes"]["w4a16"]["prefix"] == prefix_match_length(fp_t, w_t, eos, N_NEW)
        assert len(r["modes"]["fp"]["tokens"]) <= N_NEW
        assert r["modes"]["fp"]["tf_positions"] == len(cut_at_eos(fp_t, eos, N_NEW))

    # teacher-forced numbers recomputed independently: one unpadded row at a time, batch 1.
    # XLA:CPU results depend on the batch / row count (README: ~1e-6 on logits), so the sums
    # agree to rtol 1e-3, far tighter than an off-by-one position would give (KL varies by
    # O(1) relative from position to position on this model: checked below).
    i = 3  # the longest prompt: in the CLI run it sat in a padded batch of 2
    r = doc["rows"][i]
    fp_t = cut_at_eos(r["modes"]["fp"]["tokens"], eos, N_NEW)
    seq = np.asarray([prompts[i] + fp_t], np.int32)
    pos = teacher_forced_positions(len(prompts[i]), len(fp_t))
    c = teacher_forced_compare(
        fp_engine.logits(seq, "fp")[0][pos], q_engine.logits(seq, "w4a16")[0][pos]
    )
    got = r["modes"]["w4a16"]
    assert got["tf_positions"] == len(pos) > 0
    assert got["tf_kl_sum"] == pytest.approx(float(c["kl"].sum()), rel=1e-3)
    assert got["tf_top1_matches"] == int(c["top1"].sum())
    # and the tolerance separates: the same sums one position early are far off
    early = teacher_forced_compare(
        fp_engine.logits(seq, "fp")[0][pos - 1], q_engine.logits(seq, "w4a16")[0][pos - 1]
    )
    assert abs(float(early["kl"].sum()) - got["tf_kl_sum"]) > 1e-2 * got["tf_kl_sum"]

    # --replot redraws the plot from the JSON alone and prints the same table
    os.remove(out.parent / "agree.png")
    assert bench.main(["--replot", str(out)], load_engines=_must_not_load) == 0
    assert os.path.exists(out.parent / "agree.png")
    assert markdown_table(doc["summary"], doc["generation"]) in capsys.readouterr().out


class _QSpecDiffers:
    """The tiny int4 engine, but QSpec's last token for one prompt is changed (a simulated bug)."""

    def __init__(self, engine, prompt):
        self._e, self._prompt = engine, list(prompt)

    def __getattr__(self, name):
        return getattr(self._e, name)

    def generate(self, prompts, mode="fp", **kw):
        res = self._e.generate(prompts, mode=mode, **kw)
        for k, p in enumerate(prompts):
            if mode == "qspec" and list(p) == self._prompt:
                res.tokens[k] = res.tokens[k][:-1] + [(res.tokens[k][-1] + 1) % 256]
        return res


def test_cli_fails_loudly_when_qspec_differs(tmp_path, tiny_engines, tiny_prompts, capsys):
    path, prompts = tiny_prompts
    out = tmp_path / "agree.json"
    argv = TINY_ARGS + ["--prompts", path, "--out", str(out), "--no-plot"]
    fp, q = tiny_engines
    assert bench.main(argv, load_engines=lambda a: (fp, _QSpecDiffers(q, prompts[1]))) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "qspec-w4a4 differs on prompts [1]" in err
    doc = json.loads(out.read_text())  # the results are still written, marked not ok
    assert doc["ok"] is False and doc["complete"]
    assert doc["qspec_equality"]["qspec-w4a4"]["per_prompt"] == [True, False, True, True, True]


def test_cli_string_prompts_on_a_model_without_tokenizer(tmp_path, tiny_engines, capsys):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"prompts": ["hello"]}))
    argv = TINY_ARGS + ["--prompts", str(path), "--out", str(tmp_path / "a.json")]
    assert bench.main(argv, load_engines=lambda a: tiny_engines) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer" in err and err.count("\n") == 1


class _CountingEngine:
    """Delegates to an engine and records the modes `generate` was called with."""

    def __init__(self, engine):
        self._e, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self._e, name)

    def generate(self, prompts, mode="fp", **kw):
        self.calls.append(mode)
        return self._e.generate(prompts, mode=mode, **kw)


def test_cli_resumes_an_unfinished_file(tmp_path, tiny_engines, tiny_prompts, capsys):
    path, _ = tiny_prompts
    out = tmp_path / "agree.json"
    argv = TINY_ARGS + ["--prompts", path, "--out", str(out), "--no-plot"]
    assert bench.main(argv, load_engines=lambda a: tiny_engines) == 0
    full = json.loads(out.read_text())
    # an unfinished file as a stop during the QSpec stage leaves it
    part = json.loads(out.read_text())
    part["complete"] = False
    del part["generation"]["qspec-w4a4"]
    for r in part["rows"]:
        del r["modes"]["qspec-w4a4"]
    out.write_text(json.dumps(part))
    fp, q = (_CountingEngine(e) for e in tiny_engines)
    assert bench.main(argv, load_engines=lambda a: (fp, q)) == 0
    assert "resuming from the partial results" in capsys.readouterr().out
    assert fp.calls == [] and q.calls == ["qspec"] * 2  # only the missing mode (2 batches)
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["ok"] and doc["summary"] == full["summary"]
    assert (
        doc["generation"]["w4a16"]["resumed"] and "resumed" not in doc["generation"]["qspec-w4a4"]
    )
    assert doc["resumed_from"]["modes_done"] == ["fp", "w4a16"]
    # an unfinished file of another configuration is not silently mixed in
    part["config"]["max_new_tokens"] = 99
    out.write_text(json.dumps(part))
    assert bench.main(argv, load_engines=lambda a: tiny_engines) == 2
    err = capsys.readouterr().err
    assert "unfinished results of another configuration" in err and err.count("\n") == 1
