"""The one exception every checkpoint loader raises for a bad or unsupported checkpoint."""

from __future__ import annotations

import os


class LoadError(ValueError):
    """A checkpoint could not be loaded.

    The message is one sentence naming the file, what is wrong with it, and what to do.
    """


def load_error(path: str | os.PathLike, problem: str, fix: str) -> LoadError:
    """Builds a `LoadError` reading "<path>: <problem>; <fix>."."""
    return LoadError(f"{os.fspath(path)}: {problem}; {fix}.")
