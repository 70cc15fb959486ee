"""Where the kernels keep what they build on disk (the CPU kernels' shared library).

One root in the user's cache home, never inside the repository, read from the environment on
every call (so tests and users can change it per process):

    $QSPEC_JAX_CACHE_DIR                       (if set), else
    $XDG_CACHE_HOME/qspec-jax                  (if set), else
    ~/.cache/qspec-jax

``QSPEC_JAX_COMPILE_CACHE=0`` (or off / false / no) asks for no compilation cache on disk.

`qspec_jax.disk_cache` uses these functions for its own caches (compiled programs, quantized
weights, tokenizers): the kernels own the definition, the application reuses it, so
`pallas_kernels` imports nothing from `qspec_jax`.
"""

from __future__ import annotations

import os

ENV_DIR = "QSPEC_JAX_CACHE_DIR"
ENV_COMPILE = "QSPEC_JAX_COMPILE_CACHE"
OFF = ("0", "off", "false", "no")


def cache_root() -> str:
    """The cache root directory (not created)."""
    root = os.environ.get(ENV_DIR)
    if root:
        return os.path.abspath(os.path.expanduser(root))
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(home), "qspec-jax")


def switch_on(name: str) -> bool:
    """False when environment variable `name` is one of 0 / off / false / no (any case)."""
    return os.environ.get(name, "1").strip().lower() not in OFF


def compile_cache_enabled() -> bool:
    """False when ``QSPEC_JAX_COMPILE_CACHE`` turns the compilation cache off."""
    return switch_on(ENV_COMPILE)
