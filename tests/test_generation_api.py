"""Per-request settings, stop strings, logprobs, streaming and continuous batching, every method.

The tiny random-init preset has no tokenizer: its "text" is the ids joined by spaces
(`Engine.decode`), which is enough to put a stop string across token boundaries.

Compiling dominates this file on two cores, so every request of a method uses the same static
settings (new-token bucket 16, one stop id per prompt, logprobs=2): the runs alone share one
batch-1 program (`alone`), the chunked generate and the stream share theirs.
"""

import numpy as np
import pytest

import qspec_jax
from qspec_jax import AR, HSpec, QSpec, QuantSpec

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20], [30, 31]]
LIMITS = [5, 12, 9, 1]
# continuous batching takes these too, so that its 3 rows are refilled more than once
EXTRA = [[40, 41, 42, 43], [50]]
EXTRA_LIMITS = [11, 7]
METHODS = {
    "w4a16": (AR("w4a16"), None),
    "qspec": (QSpec(gamma=3, draft="w4a4"), None),
    "quantspec": (QuantSpec(gamma=2), "hier"),
    "hspec": (HSpec(tree=(2, 1)), None),
}
# float32 reduction order differs between a one-row step, a (gamma + 1)-row verification and
# other batch shapes: log-probabilities agree to 1e-4 nats, token ids exactly
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def engine():
    return qspec_jax.load("tiny", quant="rtn", group_size=32, progress=False)


@pytest.fixture(scope="module")
def free(engine):
    """W4A16 greedy, 16 tokens per prompt, no stops: the reference every mode must match."""
    return engine.generate(PROMPTS, AR("w4a16"), max_new_tokens=16, logprobs=2)


@pytest.fixture(scope="module")
def never(engine, free):
    """A token id W4A16 never produces for PROMPTS: a stop id that must not fire."""
    seen = {t for toks in free.tokens for t in toks}
    return next(v for v in range(engine.config.vocab_size - 1, 0, -1) if v not in seen)


@pytest.fixture(scope="module")
def stop_ids(free, never):
    """One stop id per prompt: prompt 1 stops at its 4th free token (included)."""
    return [[never], [free.tokens[1][3]], [never], [never], [never], [never]]


@pytest.fixture(scope="module")
def alone(engine, stop_ids):
    """Each prompt of PROMPTS + EXTRA run alone, per method (computed on first use)."""
    runs = {}

    def get(name):
        if name not in runs:
            method, kv = METHODS[name]
            runs[name] = [
                engine.generate(
                    [p],
                    method,
                    max_new_tokens=n,
                    stop_token_ids=stop_ids[i],
                    logprobs=2,
                    kv_cache=kv,
                )  # fmt: skip
                for i, (p, n) in enumerate(zip(PROMPTS + EXTRA, LIMITS + EXTRA_LIMITS))
            ]
        return runs[name]

    return get


def _same_logprobs(got, ref):
    assert [d["token_id"] for d in got] == [d["token_id"] for d in ref]
    np.testing.assert_allclose(
        [d["logprob"] for d in got], [d["logprob"] for d in ref], atol=LOGPROB_ATOL
    )
    assert [d["top"][0][0] for d in got] == [d["top"][0][0] for d in ref]


@pytest.mark.parametrize("name", list(METHODS))
def test_mixed_batch_rows_equal_their_runs_alone(engine, free, stop_ids, alone, name):
    method, kv = METHODS[name]
    got = engine.generate(PROMPTS, method, max_new_tokens=LIMITS, stop_token_ids=stop_ids[:4],
                          logprobs=2, kv_cache=kv)  # fmt: skip
    for i, one in enumerate(alone(name)[:4]):
        assert got.tokens[i] == one.tokens[0], (name, i)
        assert got.finish_reasons[i] == one.finish_reasons[0]
        assert [d["token_id"] for d in got.logprobs[i]] == got.tokens[i]
        # logprobs are the verifier's: W4A16's
        _same_logprobs(got.logprobs[i], free.logprobs[i][: len(got.tokens[i])])
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
def test_stop_string_across_tokens_and_stream_concatenates_to_generate(
    engine, free, never, alone, name
):
    method, kv = METHODS[name]
    toks = free.tokens[1]
    stop = f"{toks[5]} {toks[6]}"[1:]  # spans two tokens, starts inside one
    want_tokens, want_text = _expected_stop(engine, toks, stop)
    kw = dict(max_new_tokens=LIMITS, stop=[[], [stop], [], []], stop_token_ids=[[never]] * 4,
              logprobs=2, kv_cache=kv)  # fmt: skip
    got = engine.generate(PROMPTS, method, **kw)
    assert got.tokens[1] == want_tokens and got.texts[1] == want_text
    assert got.finish_reasons[1] == "stop" and stop not in got.texts[1]
    for i in (0, 2, 3):  # the rows without a stop string: as the whole loop gives them alone
        assert got.tokens[i] == alone(name)[i].tokens[0], (name, i)
        assert got.texts[i] == alone(name)[i].texts[0]
    toks_s = [[] for _ in PROMPTS]
    text = ["" for _ in PROMPTS]
    lps = [[] for _ in PROMPTS]
    reasons = [None] * len(PROMPTS)
    for ev in engine.stream(PROMPTS, method, chunk_steps=2, **kw):
        assert reasons[ev.index] is None, "an event after the finishing one"
        toks_s[ev.index] += ev.token_ids
        text[ev.index] += ev.text
        lps[ev.index] += ev.logprobs
        reasons[ev.index] = ev.finish_reason
    assert toks_s == got.tokens and text == got.texts and reasons == got.finish_reasons
    assert lps == got.logprobs


def test_bad_per_request_options_are_one_sentence(engine):
    with pytest.raises(qspec_jax.UsageError, match="max_new_tokens has 2 values for 4 prompts"):
        engine.generate(PROMPTS, "w4a16", max_new_tokens=[3, 4])
    with pytest.raises(qspec_jax.UsageError, match="stop_token_ids for prompt 0 has 99999"):
        engine.generate(PROMPTS, "w4a16", stop_token_ids=[99999])
    with pytest.raises(qspec_jax.UsageError, match="stop strings for prompt 0 must be non-empty"):
        engine.generate(PROMPTS, "w4a16", stop=[""])
    with pytest.raises(qspec_jax.UsageError, match="logprobs must be a non-negative integer"):
        engine.generate(PROMPTS, "w4a16", logprobs=-1)
    # generate_many checks its request in the same place (it once skipped the logprobs check)
    with pytest.raises(qspec_jax.UsageError, match="logprobs must be a non-negative integer"):
        engine.generate_many(PROMPTS, "w4a16", logprobs=True)
    with pytest.raises(qspec_jax.UsageError, match="max_new_tokens has 2 values for 4 prompts"):
        engine.generate_many(PROMPTS, "w4a16", max_new_tokens=[3, 4])


@pytest.mark.parametrize("name", list(METHODS))
def test_continuous_batching_equals_each_prompt_alone(engine, stop_ids, alone, name):
    method, kv = METHODS[name]
    got = engine.generate_many(
        PROMPTS + EXTRA, method, max_new_tokens=LIMITS + EXTRA_LIMITS, stop_token_ids=stop_ids,
        logprobs=2, batch_size=3, kv_cache=kv, chunk_steps=2,
    )  # fmt: skip
    for i, one in enumerate(alone(name)):
        assert got.tokens[i] == one.tokens[0], (name, i)
        assert got.finish_reasons[i] == one.finish_reasons[0]
        _same_logprobs(got.logprobs[i], one.logprobs[0])
    assert got.stats["tokens_generated"] == sum(len(t) for t in got.tokens)
    if name != "w4a16":
        assert 0 <= got.stats["draft_tokens_accepted"] <= got.stats["draft_tokens_proposed"]


def test_cli_stream_prints_the_text_as_it_comes(engine, stop_ids, alone, capsys):
    from qspec_jax.cli import _stream

    ref = alone("w4a16")[1]
    kw = dict(max_new_tokens=LIMITS[1], stop_token_ids=stop_ids[1], logprobs=2, chat=False)
    assert _stream(engine, [PROMPTS[1]], AR("w4a16"), kw) == 0
    out = capsys.readouterr().out
    assert out == ref.texts[0] + f"\n--- [0] {ref.finish_reasons[0]}\n"
