"""What qspec-jax computes once and keeps on disk: compiled programs and quantized weights.

Both live under one root in the user's cache home, never inside the repository:

    $QSPEC_JAX_CACHE_DIR                       (if set), else
    $XDG_CACHE_HOME/qspec-jax                  (if set), else
    ~/.cache/qspec-jax
        jax-cache/                             JAX's persistent compilation cache
        quantized/<key>/                       orbax checkpoints of quantized models
        tokenizers/<key>/                      tokenizers converted from GGUF files

Environment switches (read when used, so tests and users can flip them per process):

* ``QSPEC_JAX_CACHE_DIR``: the root above.
* ``QSPEC_JAX_COMPILE_CACHE=0`` (or off / false / no): do not turn on the compilation cache.
* ``QSPEC_JAX_QUANT_CACHE=0`` (or off / false / no): quantize and convert the tokenizer on
  every load, write nothing.

The compilation cache is JAX's own (``jax_compilation_cache_dir``); JAX documents it as
trusted content, so it lives in a directory only this user writes. If the process already
set ``jax_compilation_cache_dir`` itself, that choice is kept.

The root and the compile switch are defined in `pallas_kernels.cache_dir` (the CPU kernels build
their library under the same root; the kernels never import the application).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Any

# The root and the compile switch are the kernels' (re-exported here for the application).
from pallas_kernels.cache_dir import (  # noqa: F401
    ENV_COMPILE,
    ENV_DIR,
    cache_root,
    compile_cache_enabled,
)
from pallas_kernels.cache_dir import switch_on as _switch

ENV_QUANT = "QSPEC_JAX_QUANT_CACHE"

_lock = threading.Lock()
_enabled_dir: str | None = None
_hits = 0
_listening = False


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


# ============================================================================ quantized weights
def _code_digest() -> str:
    """sha256 of the loader, quantizer and packing sources (a code change never reuses weights)."""
    import pallas_kernels  # noqa: PLC0415
    import qspec_jax  # noqa: PLC0415

    pkg = os.path.dirname(qspec_jax.__file__)
    files = [os.path.join(pkg, "config.py"), os.path.join(pkg, "model", "params.py")]
    qdir = os.path.join(pkg, "quant")
    files += sorted(os.path.join(qdir, f) for f in os.listdir(qdir) if f.endswith(".py"))
    ldir = os.path.join(pkg, "loading")  # the float weights and the "gguf" int4 codes
    files += sorted(os.path.join(ldir, f) for f in os.listdir(ldir) if f.endswith(".py"))
    files.append(os.path.join(os.path.dirname(pallas_kernels.__file__), "int4.py"))
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.relpath(f, os.path.dirname(pkg)).encode())
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def model_identity(source: str) -> dict[str, Any] | None:
    """What identifies a model source's weights, or None when it cannot be cached.

    A file (GGUF) is identified by its absolute path, size and modification time in
    nanoseconds; a directory (Hugging Face) by those of every file in it, recursively.
    (Hashing the contents would read gigabytes for 7B models on every start.)
    """
    from qspec_jax.loading import EMBEDDED_NAME, embedded_gguf_path  # noqa: PLC0415

    path = embedded_gguf_path() if source == EMBEDDED_NAME else os.fspath(source)
    if os.path.isfile(path):
        files = [os.path.abspath(path)]
    elif os.path.isdir(path):
        files = sorted(
            os.path.abspath(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs
        )
    else:
        return None
    out = []
    for f in files:
        st = os.stat(f)
        out.append([f, st.st_size, st.st_mtime_ns])
    return {"source": str(source), "files": out}


def quant_cache_key(identity: dict[str, Any], settings: dict[str, Any]) -> tuple[str, dict]:
    """A hex key (and the description it hashes) for a model identity and quantizer settings.

    Args:
        identity: `model_identity(...)`, or any JSON description of the float weights.
        settings: every argument that shapes the quantized weights (method, group size, seed,
            dtype, quantizer options); values must be JSON-serialisable.

    Returns:
        (key, description): the sha256 of the canonical JSON of the description, which also
        holds the digest of the quantizer source code.
    """
    desc = json.loads(canonical({"model": identity, "settings": settings, "code": _code_digest()}))
    return hashlib.sha256(canonical(desc).encode()).hexdigest()[:32], desc


def quant_cache_path(key: str) -> str:
    """Where the quantized checkpoint of `key` lives."""
    return os.path.join(cache_root(), "quantized", key)


def canonical(obj: Any) -> str:
    """The canonical JSON text of a description (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def array_digest(a) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    import numpy as np  # noqa: PLC0415

    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def discard(path: str) -> None:
    """Removes a cache entry: renamed aside first (atomic), so no reader sees half of it."""
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    parent, name = os.path.split(path)
    try:
        aside = tempfile.mkdtemp(prefix=f".{name}.discard-", dir=parent)
        os.rename(path, os.path.join(aside, name))
    except OSError:
        aside = path  # already gone, or not renameable: delete in place
    shutil.rmtree(aside, ignore_errors=True)


# ============================================================================ tokenizers
_TOKENIZER_MANIFEST = "qspec_tokenizer.json"


def _dir_digests(path: str) -> dict[str, str]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f != _TOKENIZER_MANIFEST and os.path.isfile(os.path.join(path, f)):
            with open(os.path.join(path, f), "rb") as fh:
                out[f] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _read_tokenizer(path: str):
    """A saved tokenizer; the generic fast class directly when that is what was saved.

    `AutoTokenizer` imports transformers' whole tokenizer registry first (a second or more on a
    2-core machine; `experiments/profile_first_call.py` shows the read); a converted GGUF
    tokenizer is the generic fast class (`TokenizersBackend` in transformers 5), which loads
    without it.
    """
    import transformers  # noqa: PLC0415

    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            cls = json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        cls = None
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def load_cached_tokenizer(source: str, load_tokenizer):
    """`load_tokenizer(source)`, converted once per model file and then read from the cache.

    Keyed by the model file's identity (`model_identity`) and the transformers / tokenizers
    versions. The entry holds `save_pretrained`'s files and a manifest of their sha256, written
    last; an entry whose files do not match it, or that transformers cannot read, is discarded
    and converted again. Sources that are not files or directories are loaded directly.
    """
    import tokenizers  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    identity = model_identity(source)
    if identity is None:
        return load_tokenizer(source)
    versions = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    desc = json.loads(canonical({"model": identity, "versions": versions}))
    path = os.path.join(
        cache_root(), "tokenizers", hashlib.sha256(canonical(desc).encode()).hexdigest()[:32]
    )
    manifest = os.path.join(path, _TOKENIZER_MANIFEST)
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                recorded = json.load(f)
            if recorded != {"desc": desc, "files": _dir_digests(path)}:
                raise ValueError("files do not match their manifest")
            return _read_tokenizer(path)
        except Exception:  # noqa: BLE001 (any unreadable entry is rebuilt, never used)
            discard(path)
    tok = load_tokenizer(source)
    import tempfile  # noqa: PLC0415

    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tok-", dir=os.path.dirname(path))
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, _TOKENIZER_MANIFEST), "w") as f:
            json.dump({"desc": desc, "files": _dir_digests(tmp)}, f)  # last: marks it complete
        if os.path.lexists(path):
            discard(path)
        os.rename(tmp, path)
    except OSError:  # read-only home, another process won the rename: the cache is optional
        if tmp is not None:
            discard(tmp)
    return tok
