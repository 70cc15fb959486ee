"""Perplexity: the exact definition on fake logits, and the held-out text's independence."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from eval_fake_engine import VOCAB, FakeEngine

from qspec_jax.eval.perplexity import (
    HELDOUT_TEXT,
    chunk_nll,
    heldout_chunks,
    perplexity,
    split_chunks,
)
from qspec_jax.quant.calibration import CALIBRATION_CHATS, CALIBRATION_DOCUMENTS


def test_split_chunks():
    toks = list(range(10))
    assert split_chunks(toks, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_chunks(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 1-token rest dropped
    assert split_chunks([], 4) == []
    with pytest.raises(ValueError):
        split_chunks(toks, 1)


def test_uniform_logits_give_vocab_size():
    eng = FakeEngine(logits_kind="uniform")
    assert perplexity(eng, "w4a16", seq_len=64) == pytest.approx(VOCAB, rel=1e-9)


def _brute_force(eng, precision, seq_len):
    ids = eng.encode([HELDOUT_TEXT], chat=False)[0]
    total, count = 0.0, 0
    for s in range(0, len(ids), seq_len):
        c = ids[s : s + seq_len]
        if len(c) < 2:
            continue
        lg = eng.logits(np.asarray([c]), precision)[0].astype(np.float64)
        for t in range(len(c) - 1):
            row = lg[t]
            total += math.log(sum(math.exp(x) for x in row)) - row[c[t + 1]]
            count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("seq_len", [32, 100])
def test_matches_brute_force_definition(seq_len):
    eng = FakeEngine()
    for precision in ("w4a16", "w4a4"):
        assert perplexity(eng, precision, seq_len=seq_len) == pytest.approx(
            _brute_force(eng, precision, seq_len), rel=1e-9)
    assert perplexity(eng, "w4a4", seq_len=seq_len) != perplexity(eng, "w4a16", seq_len=seq_len)


def test_batching_does_not_change_result():
    eng = FakeEngine()
    chunks = heldout_chunks(eng, 64)
    assert len({len(c) for c in chunks}) == 2  # full chunks and a remainder
    a = chunk_nll(eng, "w4a16", chunks, batch_size=1)
    b = chunk_nll(eng, "w4a16", chunks, batch_size=5)
    assert [k for _, k in a] == [len(c) - 1 for c in chunks]
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], rtol=1e-12)


def _words(text):
    return re.findall(r"[a-z']+", text.lower())


def test_heldout_text_is_not_calibration_text():
    calib = " ".join(list(CALIBRATION_DOCUMENTS) + [str(c) for c in CALIBRATION_CHATS])
    w = _words(calib)
    shingles = {tuple(w[i : i + 6]) for i in range(len(w) - 5)}
    h = _words(HELDOUT_TEXT)
    shared = [tuple(h[i : i + 6]) for i in range(len(h) - 5) if tuple(h[i : i + 6]) in shingles]
    assert shared == []
    assert 1000 <= len(h) <= 1600  # about 1,500 SmolLM2 tokens (1,502 measured)
