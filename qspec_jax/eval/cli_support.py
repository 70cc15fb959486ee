"""Command-line plumbing shared by the evaluation commands (`run_cli`, `table_cli`,
`agreement_cli`: `python -m experiments.run_eval`, `.eval_table`, `.bench_agreement`).

Bad input ends as one line on stderr and exit status 2, never a traceback: argparse errors and
the scripts' own checks raise `UsageProblem`; the library's usage errors (`EvalUsageError`,
the engine's `UsageError`, `LoadError`, a missing file) are caught by `run_cli` too.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageProblem(Exception):
    """A bad command line: one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise `UsageProblem` instead of exiting."""

    def error(self, message):
        raise UsageProblem(f"{self.prog}: {message} (see --help)")


def is_usage_error(e: BaseException) -> bool:
    """True for the library's errors that mean "bad input" rather than a bug."""
    from qspec_jax.engine import UsageError  # noqa: PLC0415
    from qspec_jax.eval.harness import EvalUsageError  # noqa: PLC0415
    from qspec_jax.loading.errors import LoadError  # noqa: PLC0415

    return isinstance(e, (EvalUsageError, UsageError, LoadError, FileNotFoundError))


def run_cli(prog: str, body: Callable[[], int], *, resumable: bool = False) -> int:
    """Runs a script's `body` and turns usage errors into one stderr line and exit status 2.

    Args:
        prog: the script name the messages start with.
        body: the script's work; returns its exit status.
        resumable: on Ctrl-C, say that rerunning the same command resumes (exit 130) instead
            of letting KeyboardInterrupt propagate.
    """
    try:
        return body()
    except UsageProblem as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if not resumable:
            raise
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if not is_usage_error(e):
            raise
        msg = " ".join(str(e).split())
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
