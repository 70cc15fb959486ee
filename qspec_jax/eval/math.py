"""Grade-school math word problems: the project's own data, the prompt, answer extraction, scoring.

The problems (`data/math_problems.jsonl`) were written for this project (GSM8K is not packaged
anywhere reachable, and copying it is not wanted). Each has an ``id``, a ``question``, a numeric
``answer`` and a ``solution``: a Python arithmetic expression whose value is the answer, so the
answer key is checked by computation (tests/eval/test_math.py).

Scoring: the model is asked to reason step by step and end with ``The answer is N.``;
`extract_answer` takes the number from that line (or ``#### N``, ``\\boxed{N}``, ``answer: N``),
falling back to the last number in the text; `is_correct` compares numerically (exactly, up to
float representation of the decimal strings: relative and absolute tolerance 1e-9).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

__all__ = [
    "DATA_PATH",
    "extract_answer",
    "format_prompt",
    "is_correct",
    "load_problems",
    "parse_number",
    "score_math",
]

DATA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "math_problems.jsonl")

PROMPT_TEMPLATE = (
    "Solve the following math word problem. Reason step by step, showing each calculation. "
    'Finish with a final line of the form "The answer is N." where N is just the number.\n\n'
    "Problem: {question}"
)


def load_problems(path: str | None = None) -> list[dict[str, Any]]:
    """The math problems as dicts with id, question, answer (a number) and solution."""
    path = path or DATA_PATH
    problems = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                problems.append(json.loads(line))
    return problems


def format_prompt(question: str) -> str:
    """The user message for one problem (the chat template is applied by the engine)."""
    return PROMPT_TEMPLATE.format(question=question.strip())


# A number as people and models write it: optional sign (ASCII hyphen or Unicode minus), optional
# currency sign, digits with or without thousands commas (or thin spaces / underscores not
# accepted: ambiguous), optional decimal part; also ".5". A trailing sentence period is not a
# decimal point because a digit must follow it.
_NUM = r"[-−–]?[$€£]?\s?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_NUM_RE = re.compile(rf"(?<![\w.])({_NUM})(?:\s*/\s*(\d+)(?![\d.,]\d))?")

# Markers of the final answer, strongest first. Each captures the rest of the line after the
# marker (in a lookahead, so a later marker on the same line is found too); its first number is
# the answer.
_MARKERS = [
    re.compile(r"####[ \t]*(?=([-−–$€£.\d][^\n]*))"),  # not a markdown heading "#### Step 1"
    re.compile(r"\\boxed\{([^}]*)\}"),
    re.compile(r"(?:final\s+answer|the\s+answer)\s*(?:is|=|:)\s*:?\s*(?=([^\n]*))", re.IGNORECASE),
    re.compile(r"\banswer\s*(?:is|=|:)\s*:?\s*(?=([^\n]*))", re.IGNORECASE),
]


def parse_number(s: str) -> float | None:
    """The value of one number token matched by `_NUM` ("$1,234.50" -> 1234.5, "−3" -> -3.0)."""
    t = s.strip()
    neg = t[:1] in "-−–"
    if neg:
        t = t[1:].strip()
    t = t.lstrip("$€£").strip().replace(",", "")
    if not t:
        return None
    try:
        v = float(t)
    except ValueError:
        return None
    return -v if neg else v


def _numbers(text: str) -> list[float]:
    out = []
    for m in _NUM_RE.finditer(text):
        v = parse_number(m.group(1))
        if v is None:
            continue
        if m.group(2) is not None and float(m.group(2)) != 0:  # a fraction "3/4"
            v = v / float(m.group(2))
        out.append(v)
    return out


def extract_answer(text: str) -> float | None:
    """The model's final numeric answer, or None when the text holds no number.

    Order: the last "#### N", the last "\\boxed{N}", the last "The answer is N" / "final answer:
    N" / "answer: N" (the first number after the marker on the same line, so "The answer is
    $1,234.50 dollars." gives 1234.5 and "The answer is **72** apples." gives 72), else the last
    number anywhere in the text. Thousands commas, currency signs, a sign, decimals and simple
    fractions ("3/4") are understood; trailing units and punctuation are ignored.
    """
    if not text:
        return None
    for marker in _MARKERS:
        found = None
        for m in marker.finditer(text):
            nums = _numbers(m.group(1))
            if nums:
                found = nums[0]
        if found is not None:
            return found
    nums = _numbers(text)
    return nums[-1] if nums else None


def is_correct(pred: float | None, answer: float) -> bool:
    """Exact numeric comparison (tolerance 1e-9 relative and absolute, for float rounding only)."""
    if pred is None or not math.isfinite(pred):
        return False
    return math.isclose(pred, float(answer), rel_tol=1e-9, abs_tol=1e-9)


def score_math(text: str, answer: float) -> tuple[float | None, bool]:
    """(extracted answer, correct) for one generation."""
    pred = extract_answer(text)
    return pred, is_correct(pred, answer)
