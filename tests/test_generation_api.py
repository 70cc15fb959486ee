"""Per-request settings, stop strings, logprobs and streaming through the engine, every method.

The tiny random-init preset has no tokenizer: its "text" is the ids joined by spaces
(`Engine.decode`), which is enough to put a stop string across token boundaries.
"""

import numpy as np
import pytest

import qspec_jax
from qspec_jax import AR, HSpec, QSpec, QuantSpec

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20], [30, 31]]
LIMITS = [5, 12, 9, 1]
METHODS = {
    "w4a16": (AR("w4a16"), None),
    "qspec": (QSpec(gamma=3, draft="w4a4"), None),
    "quantspec": (QuantSpec(gamma=2), "hier"),
    "hspec": (HSpec(tree=(2, 1)), None),
}


@pytest.fixture(scope="module")
def engine():
    return qspec_jax.load("tiny", quant="rtn", group_size=32, progress=False)


@pytest.fixture(scope="module")
def free(engine):
    """W4A16 greedy, 16 tokens per prompt, no stops: the reference every mode must match."""
    return engine.generate(PROMPTS, AR("w4a16"), max_new_tokens=16, logprobs=2)


@pytest.mark.parametrize("name", list(METHODS))
def test_mixed_batch_rows_equal_their_runs_alone(engine, free, name):
    method, kv = METHODS[name]
    # per-prompt limits and stop ids: prompt 1 stops at its 4th free token (included)
    stop_ids = [[], [free.tokens[1][3]], [], []]
    got = engine.generate(
        PROMPTS, method, max_new_tokens=LIMITS, stop_token_ids=stop_ids, logprobs=2, kv_cache=kv
    )
    for i, p in enumerate(PROMPTS):
        alone = engine.generate(
            [p], method, max_new_tokens=LIMITS[i], stop_token_ids=stop_ids[i], logprobs=2,
            kv_cache=kv,
        )  # fmt: skip
        assert got.tokens[i] == alone.tokens[0], (name, i)
        assert got.finish_reasons[i] == alone.finish_reasons[0]
        ids = [d["token_id"] for d in got.logprobs[i]]
        assert ids == got.tokens[i]
        # logprobs are the verifier's: W4A16's, to float32 reduction-order differences
        # between a one-row step and a (gamma + 1)-row verification (1e-4 nats)
        ref = free.logprobs[i][: len(ids)]
        np.testing.assert_allclose(
            [d["logprob"] for d in got.logprobs[i]], [d["logprob"] for d in ref], atol=1e-4
        )
        assert [d["top"][0][0] for d in got.logprobs[i]] == [d["top"][0][0] for d in ref]
    # what W4A16 alone would give: the free tokens cut at the limit or the stop id
    want = [free.tokens[i][: LIMITS[i]] for i in range(len(PROMPTS))]
    want[1] = free.tokens[1][:4]
    assert got.tokens == want
    assert got.finish_reasons == ["length", "stop", "length", "length"]


def _expected_stop(engine, tokens, stop):
    text = engine.decode(tokens)
    pos = text.find(stop)
    k = next(k for k in range(1, len(tokens) + 1) if stop in engine.decode(tokens[:k]))
    return tokens[:k], text[:pos]


@pytest.mark.parametrize("name", list(METHODS))
def test_stop_string_across_tokens_and_inside_a_block(engine, free, name):
    method, kv = METHODS[name]
    toks = free.tokens[1]
    stop = f"{toks[5]} {toks[6]}"[1:]  # spans two tokens, starts inside one
    want_tokens, want_text = _expected_stop(engine, toks, stop)
    got = engine.generate([PROMPTS[1]], method, max_new_tokens=16, stop=stop, kv_cache=kv)
    assert got.tokens[0] == want_tokens and got.texts[0] == want_text
    assert got.finish_reasons == ["stop"] and stop not in got.texts[0]


@pytest.mark.parametrize("name", list(METHODS))
def test_stream_concatenates_to_generate(engine, name):
    method, kv = METHODS[name]
    ref = engine.generate(PROMPTS, method, max_new_tokens=LIMITS, kv_cache=kv)
    toks = [[] for _ in PROMPTS]
    text = ["" for _ in PROMPTS]
    reasons = [None] * len(PROMPTS)
    for ev in engine.stream(PROMPTS, method, max_new_tokens=LIMITS, kv_cache=kv, chunk_steps=2):
        assert reasons[ev.index] is None, "an event after the finishing one"
        toks[ev.index] += ev.token_ids
        text[ev.index] += ev.text
        reasons[ev.index] = ev.finish_reason
    assert toks == ref.tokens and text == ref.texts and reasons == ref.finish_reasons


def test_bad_per_request_options_are_one_sentence(engine):
    with pytest.raises(qspec_jax.UsageError, match="max_new_tokens has 2 values for 4 prompts"):
        engine.generate(PROMPTS, "w4a16", max_new_tokens=[3, 4])
    with pytest.raises(qspec_jax.UsageError, match="stop_token_ids for prompt 0 has 99999"):
        engine.generate(PROMPTS, "w4a16", stop_token_ids=[99999])
    with pytest.raises(qspec_jax.UsageError, match="stop strings for prompt 0 must be non-empty"):
        engine.generate(PROMPTS, "w4a16", stop=[""])
    with pytest.raises(qspec_jax.UsageError, match="logprobs must be a non-negative integer"):
        engine.generate(PROMPTS, "w4a16", logprobs=-1)


MANY = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20], [30, 31], [40, 41, 42, 43], [50], [60, 61]]
MANY_LIMITS = [6, 11, 3, 9, 1, 12, 7]


@pytest.mark.parametrize("name", list(METHODS))
def test_continuous_batching_equals_each_prompt_alone(engine, name):
    method, kv = METHODS[name]
    got = engine.generate_many(
        MANY, method, max_new_tokens=MANY_LIMITS, batch_size=3, kv_cache=kv, chunk_steps=2
    )
    for i, p in enumerate(MANY):
        alone = engine.generate([p], method, max_new_tokens=MANY_LIMITS[i], kv_cache=kv)
        assert got.tokens[i] == alone.tokens[0], (name, i)
        assert got.finish_reasons[i] == alone.finish_reasons[0]
    assert got.stats["tokens_generated"] == sum(len(t) for t in got.tokens)
    if name != "w4a16":
        assert 0 <= got.stats["draft_tokens_accepted"] <= got.stats["draft_tokens_proposed"]


def test_cli_stream_prints_the_text_as_it_comes(engine, capsys):
    from qspec_jax.cli import _stream

    kw = dict(max_new_tokens=6, chat=False)
    ref = engine.generate([PROMPTS[1]], AR("w4a16"), **kw)
    assert _stream(engine, [PROMPTS[1]], AR("w4a16"), kw) == 0
    out = capsys.readouterr().out
    assert out == ref.texts[0] + f"\n--- [0] {ref.finish_reasons[0]}\n"
