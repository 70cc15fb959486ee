"""What qspec-jax computes once and keeps on disk: compiled programs and quantized weights.

Both live under one root in the user's cache home, never inside the repository:

    $QSPEC_JAX_CACHE_DIR                       (if set), else
    $XDG_CACHE_HOME/qspec-jax                  (if set), else
    ~/.cache/qspec-jax
        jax-cache/                             JAX's persistent compilation cache
        quantized/<key>/                       orbax checkpoints of quantized models

Environment switches (read when used, so tests and users can flip them per process):

* ``QSPEC_JAX_CACHE_DIR``: the root above.
* ``QSPEC_JAX_COMPILE_CACHE=0`` (or off / false / no): do not turn on the compilation cache.
* ``QSPEC_JAX_QUANT_CACHE=0`` (or off / false / no): quantize on every load, write nothing.

The compilation cache is JAX's own (``jax_compilation_cache_dir``); JAX documents it as
trusted content, so it lives in a directory only this user writes. If the process already
set ``jax_compilation_cache_dir`` itself, that choice is kept.
"""

from __future__ import annotations

import os
import threading
from typing import Any

ENV_DIR = "QSPEC_JAX_CACHE_DIR"
ENV_COMPILE = "QSPEC_JAX_COMPILE_CACHE"
ENV_QUANT = "QSPEC_JAX_QUANT_CACHE"
_OFF = ("0", "off", "false", "no")

_lock = threading.Lock()
_enabled_dir: str | None = None
_hits = 0
_listening = False


def cache_root() -> str:
    """The cache root directory (not created)."""
    root = os.environ.get(ENV_DIR)
    if root:
        return os.path.abspath(os.path.expanduser(root))
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(home), "qspec-jax")


def _switch(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in _OFF


def compile_cache_enabled() -> bool:
    """False when ``QSPEC_JAX_COMPILE_CACHE`` turns the compilation cache off."""
    return _switch(ENV_COMPILE)


def quant_cache_enabled() -> bool:
    """False when ``QSPEC_JAX_QUANT_CACHE`` turns the quantized-weights cache off."""
    return _switch(ENV_QUANT)


def _on_event(event: str, **_: Any) -> None:
    global _hits
    if event == "/jax/compilation_cache/cache_hits":
        _hits += 1


def persistent_cache_hits() -> int:
    """Compilations served from the persistent cache in this process so far."""
    return _hits


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache (idempotent).

    Every executable is written, however small or quick to compile (min compile time 0 s,
    no minimum entry size): the engine's generation programs are few and large, and the
    small ones cost nothing to keep.

    Returns:
        The cache directory in use, or None when turned off by ``QSPEC_JAX_COMPILE_CACHE``.
    """
    global _enabled_dir, _listening
    import jax  # noqa: PLC0415

    with _lock:
        if not _listening:  # counts persistent-cache hits, reported in generate stats
            jax.monitoring.register_event_listener(_on_event)
            _listening = True
        current = jax.config.jax_compilation_cache_dir
        if current and current != _enabled_dir:
            return current  # the process chose its own cache: keep it
        if not compile_cache_enabled():
            if _enabled_dir is not None:  # turned off after we turned it on
                jax.config.update("jax_compilation_cache_dir", None)
                _enabled_dir = None
            return None
        path = os.path.join(cache_root(), "jax-cache")
        if _enabled_dir == path:
            return path
        os.makedirs(path, mode=0o700, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        from jax.experimental.compilation_cache import compilation_cache as cc  # noqa: PLC0415

        cc.reset_cache()  # re-read the directory if another one was initialized before
        _enabled_dir = path
        return path
