"""A float target with its own 4-bit draft copy (`load(..., draft_quant=...)`): QuantSpec as
published and QSpec with a float verifier. Greedy output equals float autoregressive decoding on
the same cache format, token for token (no tolerance: every committed token is the float
verifier's argmax given verified K/V)."""

import pytest

import qspec_jax
from qspec_jax import AR, QSpec, QuantSpec

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20]]


@pytest.fixture(scope="module")
def two():
    return qspec_jax.load("tiny", draft_quant="rtn", group_size=32, progress=False)


def test_both_weight_sets_are_held_and_reported(two):
    sizes = two.weight_bytes_by_set
    assert 0 < sizes["draft"] < sizes["target"]  # int4 copy smaller than float32
    assert two.weight_bytes == sizes["target"] + sizes["draft"]
    assert two.modes == ("fp", "w4a16", "w4a4", "w4a8", "qspec", "quantspec", "hspec")


def test_quantspec_float_target_equals_float_ar_on_the_hier_cache(two):
    ref = two.generate(PROMPTS, AR("fp"), max_new_tokens=14, kv_cache="hier")
    got = two.generate(PROMPTS, QuantSpec(gamma=3, verify="fp"), max_new_tokens=14)
    assert got.tokens == ref.tokens and got.finish_reasons == ref.finish_reasons
    assert got.stats["draft"] == "w4a16" and got.stats["kv_cache"] == "hier"
    assert 0 < got.stats["acceptance_rate"] <= 1
    # the shorthand of the issue: mode="quantspec", verify="fp"
    short = two.generate(PROMPTS, mode="quantspec", gamma=3, verify="fp", max_new_tokens=14)
    assert short.tokens == ref.tokens


@pytest.mark.parametrize("draft", ["w4a16", "w4a8"])
def test_qspec_with_float_verifier_equals_float_ar(two, draft):
    ref = two.generate(PROMPTS, AR("fp"), max_new_tokens=14)
    got = two.generate(PROMPTS, QSpec(gamma=2, draft=draft, verify="fp"), max_new_tokens=14)
    assert got.tokens == ref.tokens


def test_one_weight_set_refuses_in_one_sentence():
    eng = qspec_jax.load("tiny", quant="rtn", group_size=32, progress=False)
    with pytest.raises(qspec_jax.UsageError, match="holds only int4 weights"):
        eng.generate(PROMPTS, QuantSpec(verify="fp"))
    with pytest.raises(qspec_jax.UsageError, match="do not pass quant='rtn' too"):
        qspec_jax.load("tiny", quant="rtn", draft_quant="rtn")
