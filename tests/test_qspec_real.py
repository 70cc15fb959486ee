"""QSpec on the real SmolLM2-135M with one int4 weight copy: exact against W4A16 greedy."""

from __future__ import annotations

import json

import pytest

from qspec_jax.cli import main

pytestmark = pytest.mark.real

PROMPTS = [
    "What is 12 times 7?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May? Think step by step.",
    "Write a Python function that reverses a string.",
    "Name three planets.",
    "Explain in two sentences what photosynthesis is, for a child who is eight years old and "
    "curious about plants in the garden.",
    "Translate 'good morning' into French.",
    "A shop sells pens at 3 dollars each. Tom buys 4 pens and pays with a 20 dollar bill. "
    "How much change does he get?",
    "Why do we have seasons?",
]
NEW = 40


def test_qspec_greedy_equals_w4a16_batch_8_mixed_lengths(smollm2_int4):
    eng = smollm2_int4
    assert len({len(i) for i in eng.encode(PROMPTS)}) >= 6  # mixed prompt lengths
    ref = eng.generate(PROMPTS, mode="w4a16", max_new_tokens=NEW)
    got = eng.generate(PROMPTS, mode="qspec", gamma=3, max_new_tokens=NEW)
    assert got.tokens == ref.tokens
    assert got.finish_reasons == ref.finish_reasons
    s = got.stats
    assert 0.0 < s["acceptance_rate"] < 1.0  # real drafts, really rejected sometimes
    assert s["draft_tokens_accepted"] < s["draft_tokens_proposed"]
    assert 1.0 < s["mean_tokens_per_step"] <= 4.0


# Two prompts of one prompt-length bucket (64): three programs (w4a16, qspec γ 2 and 5) serve both
# (compiling the real model's programs is most of this file's time)
BATCH_1 = [PROMPTS[6], PROMPTS[2]]


def test_qspec_greedy_equals_w4a16_batch_1(smollm2_int4):
    eng = smollm2_int4
    for p in BATCH_1:
        ref = eng.generate([p], mode="w4a16", max_new_tokens=NEW)
        for gamma in (2, 5):
            got = eng.generate([p], mode="qspec", gamma=gamma, max_new_tokens=NEW)
            assert got.tokens == ref.tokens, (p, gamma)


def test_one_weight_copy_serves_every_mode(smollm2_int4):
    """No mode keeps a second (e.g. dequantized) weight copy alive after it ran."""
    import jax

    eng = smollm2_int4
    # The batch-1 test's prompt and length: its w4a16 and qspec programs are reused, not compiled
    # again (compiling the real model's programs is most of this file's time).
    run = dict(max_new_tokens=NEW)
    eng.generate(BATCH_1[:1], mode="w4a4", **run)
    before = sum(a.nbytes for a in jax.live_arrays())
    for mode, opts in (("w4a16", {}), ("w4a4", {}), ("w4a8", {}), ("qspec", dict(gamma=2))):
        eng.generate(BATCH_1[:1], mode=mode, **run, **opts)
    assert sum(a.nbytes for a in jax.live_arrays()) == before


def test_cli_reports_qspec_statistics(smollm2_int4, capsys, monkeypatch):
    import qspec_jax.engine

    monkeypatch.setattr(qspec_jax.engine, "load", lambda *a, **k: smollm2_int4)
    code = main(["generate", "--mode", "qspec", "--gamma", "3", "--max-new-tokens", "16",
                 "--prompt", PROMPTS[0], "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    for key in ("draft_tokens_proposed", "draft_tokens_accepted", "acceptance_rate",
                "mean_tokens_per_step", "steps", "tokens_per_s", "wall_s", "tokens_generated"):
        assert key in res["stats"], key
    assert res["texts"] and res["tokens"] and res["finish_reasons"]
    code = main(["generate", "--mode", "qspec", "--gamma", "99", "--prompt", "x"])
    assert code == 2 and "gamma must be an integer in 1..16" in capsys.readouterr().err
