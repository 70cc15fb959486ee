"""The project's math problems (answers checked by computation) and answer extraction."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qspec_jax.eval.math import (
    extract_answer,
    format_prompt,
    is_correct,
    load_problems,
    parse_number,
    score_math,
)

PROBLEMS = load_problems()


def test_dataset_shape():
    assert len(PROBLEMS) >= 60
    ids = [p["id"] for p in PROBLEMS]
    assert len(set(ids)) == len(ids)
    assert len({p["question"] for p in PROBLEMS}) == len(PROBLEMS)
    for p in PROBLEMS:
        assert set(p) == {"id", "question", "answer", "solution"}
        assert isinstance(p["answer"], (int, float)) and not isinstance(p["answer"], bool)
        assert p["question"].rstrip().endswith("?")
        # multi-step: every solution uses at least two operations
        assert len(re.findall(r"[-+*/]", p["solution"].replace("//", "/"))) >= 2, p["id"]


@pytest.mark.parametrize("p", PROBLEMS, ids=[p["id"] for p in PROBLEMS])
def test_answer_equals_solution(p):
    value = eval(p["solution"], {"__builtins__": {}})  # arithmetic only
    assert math.isclose(value, p["answer"], rel_tol=1e-9, abs_tol=1e-9), (p["id"], value)
    # the stored answer survives the extraction round trip of a model's final line
    assert is_correct(extract_answer(f"... so the total is that. The answer is {p['answer']}."), p["answer"])


def test_prompt_asks_for_final_line():
    s = format_prompt(PROBLEMS[0]["question"])
    assert PROBLEMS[0]["question"] in s
    assert "The answer is N." in s and "step by step" in s


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 1,234.", 1234),
        ("#### 72", 72),
        ("Reasoning...\n#### 1,000,000", 1_000_000),
        ("It costs $5.50 in total.", 5.5),
        ("The answer is $5.50.", 5.5),
        ("The answer is 18 apples.", 18),
        ("The answer is **72** apples.", 72),
        ("The final answer is: 12.5%", 12.5),
        ("Answer: 42", 42),
        ("The answer is −7.", -7),
        ("The temperature is -4 degrees, then 14 degrees. The answer is -4 + 18 = 14.", -4),
        ("First 3 * 4 = 12, then 12 + 5 = 17.", 17),  # last-number fallback
        ("5 + 3 = 8\nSo she has 8 left", 8),
        ("The answer is 3/4.", 0.75),
        ("She pays .5 dollars", 0.5),
        ("The answer is 7. Let me double check: 3 + 4 = 7, and 100 more words 99.", 7),
        ("The answer is 10. Wait, recheck. The answer is 12.", 12),  # last marker wins
        ("#### Step 1: add\n20 + 30 = 50\nThe answer is 50.", 50),  # markdown heading is not ####
        ("\\boxed{96}", 96),
        ("The answer is\n42", 42),
        ("10-4=6", 6),
        ("Costs were 1,2 and 3", 3),
    ],
)
def test_extract_answer_cases(text, expected):
    assert extract_answer(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "no numbers here", "The answer is unclear."])
def test_extract_answer_none(text):
    assert extract_answer(text) is None


def _format(value: int, cents: int | None, commas: bool, dollar: bool) -> tuple[str, float]:
    body = f"{abs(value):,}" if commas else str(abs(value))
    v = float(abs(value))
    if cents is not None:
        body += f".{cents:02d}"
        v += cents / 100
    s = ("-" if value < 0 else "") + ("$" if dollar else "") + body
    return s, (-v if value < 0 else v)


number_parts = st.tuples(
    st.integers(-10**9, 10**9), st.one_of(st.none(), st.integers(0, 99)), st.booleans(), st.booleans()
)


@settings(max_examples=300, deadline=None)
@given(parts=number_parts, unit=st.sampled_from(["", " dollars", " km", "%", " apples in total"]),
       end=st.sampled_from([".", "", "!", " .", ".\n"]),
       lead=st.sampled_from(["The answer is ", "The final answer is: ", "#### ", "Answer: "]))
def test_extract_formats_property(parts, unit, end, lead):
    s, v = _format(*parts)
    text = f"We add 17 and 25 to get 42, then subtract 3.\n{lead}{s}{unit}{end}"
    got = extract_answer(text)
    assert got is not None and math.isclose(got, v, rel_tol=1e-12, abs_tol=1e-9), (text, got, v)


@settings(max_examples=200, deadline=None)
@given(parts=number_parts, unit=st.sampled_from(["", " dollars", " cm"]), end=st.sampled_from([".", ""]))
def test_extract_last_number_fallback_property(parts, unit, end):
    s, v = _format(*parts)
    text = f"First 12 + 30 = 42. Then 42 * 2 = 84. So she ends with {s}{unit}{end}"
    got = extract_answer(text)
    assert got is not None and math.isclose(got, v, rel_tol=1e-12, abs_tol=1e-9), (text, got, v)


@settings(max_examples=200, deadline=None)
@given(x=st.integers(0, 10**12))
def test_parse_number_commas(x):
    assert parse_number(f"{x:,}") == x
    assert parse_number(f"${x:,}.25") == x + 0.25


def test_is_correct_exact():
    assert is_correct(5.75, 5.75)
    assert is_correct(9.000000000000002, 9)  # float rounding of 3.60 / 12 * 30
    assert not is_correct(5.7, 5.75)
    assert not is_correct(None, 3)
    assert not is_correct(float("nan"), 3)
    assert not is_correct(1234.0, 1235)


def test_score_math():
    assert score_math("... The answer is 1,752.", 1752) == (1752.0, True)
    assert score_math("I think 17.", 18) == (17.0, False)
    assert score_math("nothing", 18) == (None, False)
