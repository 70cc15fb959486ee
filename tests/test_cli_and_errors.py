"""Bad input: one clear line, exit status 2, no traceback (CLI) / UsageError or LoadError (API)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import qspec_jax
from qspec_jax.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "give a command"),
        (["generate", "--mode", "turbo", "--prompt", "x"], "invalid choice: 'turbo'"),
        (["generate", "--mode", "qspec", "--draft", "w4a16", "--prompt", "x"], "invalid choice: 'w4a16'"),
        (["generate", "--quant", "magic", "--prompt", "x"], "invalid choice: 'magic'"),
        (["generate", "--max-new-tokens", "many", "--prompt", "x"], "invalid int value"),
        (["generate"], "no prompts"),
        (["generate", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["generate", "--prompts-file", "/nonexistent/p.jsonl"], "does not exist"),
        (["generate", "--model", "/nonexistent/model.gguf", "--prompt", "x"], "no such GGUF file"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(capsys, argv, needle):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out == ""


def test_cli_bad_prompts_file_names_the_line(capsys, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": \n')
    code, _, err = _run(capsys, "generate", "--prompts-file", str(f))
    assert code == 2 and f"{f} line 2 is not valid JSON" in err
    f.write_text('{"text": "no prompt key"}\n')
    code, _, err = _run(capsys, "generate", "--prompts-file", str(f))
    assert code == 2 and 'line 1 has no "prompt" string' in err


def test_cli_mode_not_available_for_loaded_model(capsys):
    # a random-init preset holds float weights: w4a16 needs quantization (here explicitly off)
    code, _, err = _run(capsys, "generate", "--model", "tiny", "--quant", "none", "--mode", "qspec",
                        "--prompt", "x")
    assert code == 2 and "mode 'qspec' is not available" in err


def test_cli_subprocess_exit_code_and_no_traceback():
    r = subprocess.run([sys.executable, "-m", "qspec_jax.cli", "generate", "--gamma", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--gamma" in r.stderr


def test_api_errors_are_one_sentence():
    eng = qspec_jax.load("tiny")
    with pytest.raises(qspec_jax.UsageError, match="unknown mode 'turbo'"):
        eng.generate([[5, 6]], mode="turbo")
    with pytest.raises(qspec_jax.UsageError, match="holds float weights"):
        eng.generate([[5, 6]], mode="w4a16")
    with pytest.raises(qspec_jax.UsageError, match="no tokenizer"):
        eng.generate(["text"], mode="fp")
    with pytest.raises(qspec_jax.UsageError, match="outside the vocabulary"):
        eng.generate([[5, 100000]], mode="fp")
    with pytest.raises(qspec_jax.UsageError, match="prompt 1 is empty"):
        eng.generate([[5], []], mode="fp")
    with pytest.raises(qspec_jax.UsageError, match="max_new_tokens"):
        eng.generate([[5]], mode="fp", max_new_tokens=0)
    with pytest.raises(qspec_jax.UsageError, match="top_p"):
        eng.generate([[5]], mode="fp", temperature=1.0, top_p=0.0)
    with pytest.raises(qspec_jax.UsageError, match="unknown quantization"):
        qspec_jax.load("tiny", quant="magic")
    with pytest.raises(qspec_jax.UsageError, match="does not fit"):
        eng.generate([[5] * 600], mode="fp")


def test_api_rejects_unknown_draft_precision():
    eng = qspec_jax.load("tiny", quant="rtn", group_size=32, progress=False)
    with pytest.raises(qspec_jax.UsageError, match="unknown draft precision 'fp'"):
        eng.generate([[5, 6]], mode="qspec", draft="fp")


def test_cli_string_prompt_on_tokenizerless_model(capsys):
    code, out, err = _run(capsys, "generate", "--model", "tiny", "--prompt", "unused", "--json")
    # the tiny preset has no tokenizer: a string prompt is a usage error, not a crash
    assert code == 2 and "no tokenizer" in err and out == ""
