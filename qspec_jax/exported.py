"""Decoding programs kept on disk as `jax.export` artifacts, so a new process does not trace them.

JAX's persistent compilation cache (`qspec_jax.disk_cache`) is keyed by the *lowered* program,
so a process that finds its executable there has still traced and lowered the whole decoding
loop first (about 3.6 s of a warm SmolLM2 process's 5.7 s first `generate`, profiled in
docs/results.md#where-a-warm-processs-time-goes). This module serializes the lowered program
itself (StableHLO, `jax.export.Exported.serialize`) under the cache root:

    <cache root>/exported/<sha256 key>.bin

and a later process with the same key deserializes it and compiles `Exported.call` instead of
tracing; that compilation is itself served by the persistent compilation cache, so a warm
process neither traces, lowers nor compiles its generation program.

The key covers everything that decides the traced program: the argument leaves' shapes and
dtypes, the argument tree (its static fields included), the static configs, the donated
arguments, the compiler options, the jax / jaxlib versions, a digest of every source file of
`qspec_jax` and `pallas_kernels` (a code change never reuses a program), the backend and its
devices, the CPU's feature flags (the CPU kernels pick AVX-512 variants by them) and the
``QSPEC_JAX_*`` / ``XLA_FLAGS`` / ``JAX_*`` environment. Programs placed on several devices (a
`Params.mesh`) are not exported.

Exporting is an optimisation only: when exporting, serializing or reading fails, the caller
compiles the program the usual way (`Program.source` says which happened). The files are
trusted content like JAX's own cache (the output tree is stored with `pickle`), in the
directory only this user writes. ``QSPEC_JAX_EXPORT_CACHE=0`` turns the export cache off.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from typing import Any

import jax

from pallas_kernels.cache_dir import cache_root
from pallas_kernels.cache_dir import switch_on as _switch
from qspec_jax.atomic_io import write_atomic

ENV_EXPORT = "QSPEC_JAX_EXPORT_CACHE"
_MAGIC = b"QSPECEXP2"


def export_cache_enabled() -> bool:
    """False when ``QSPEC_JAX_EXPORT_CACHE`` turns the exported-program cache off."""
    return _switch(ENV_EXPORT)


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over every source file of qspec_jax and pallas_kernels (paths and contents)."""
    import pallas_kernels  # noqa: PLC0415
    import qspec_jax  # noqa: PLC0415

    h = hashlib.sha256()
    for pkg in (qspec_jax, pallas_kernels):
        root = os.path.dirname(pkg.__file__)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith((".py", ".cc", ".c", ".h", ".cpp")):
                    path = os.path.join(dirpath, name)
                    h.update(os.path.relpath(path, os.path.dirname(root)).encode())
                    with open(path, "rb") as f:
                        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _platform() -> str:
    """The jax versions, devices and CPU flags (fixed for the process)."""
    import jaxlib  # noqa: PLC0415

    from pallas_kernels import cpu_kernels  # noqa: PLC0415

    parts = [
        jax.__version__,
        jaxlib.__version__,
        jax.default_backend(),
        repr([(d.platform, d.device_kind) for d in jax.devices()]),
        repr(sorted(cpu_kernels.cpu_flags())),
    ]
    return "\n".join(parts)


def _platform_digest() -> str:
    """The platform and the environment switches the trace may depend on (read per call)."""
    env = sorted(
        (k, v)
        for k, v in os.environ.items()
        if (k.startswith(("QSPEC_JAX_", "JAX_")) or k == "XLA_FLAGS")
        # the cache switches and root decide where programs are kept, not what they are
        and k
        not in (
            "QSPEC_JAX_CACHE_DIR",
            ENV_EXPORT,
            "QSPEC_JAX_COMPILE_CACHE",
            "QSPEC_JAX_QUANT_CACHE",
        )
    )
    return hashlib.sha256((_platform() + "\n" + repr(env)).encode()).hexdigest()


def _custom_call_targets() -> list[str]:
    """The CPU FFI kernels' custom-call targets (not on jax.export's stable list)."""
    from pallas_kernels import cpu_kernels  # noqa: PLC0415

    return sorted(cpu_kernels.TARGETS)


@dataclasses.dataclass
class Program:
    """A compiled program called with the original (unflattened) arguments.

    Attributes:
        compiled: the compiled function of the flattened argument leaves.
        out_tree: the output's tree structure.
        source: "exported-read" (deserialized, not traced), "exported-written" (traced,
            exported and written now) or "exported-unwritten" (exported, but the file could
            not be written).
    """

    compiled: Callable[..., Any]
    out_tree: Any
    source: str
    donated: tuple[int, ...] = ()

    def __call__(self, *args):
        """Runs the program on `args` (the same tree and shapes it was built for).

        A buffer that appears in several donated leaves (a fresh cache may hold one zero
        array in several fields) is copied for all but its first use: XLA refuses to take
        one buffer twice. (A traced program drops the arguments it never reads; an exported
        program keeps every argument, so it meets such duplicates.)
        """
        leaves = jax.tree_util.tree_leaves(args)
        seen = set()
        for i in self.donated:
            try:
                ptr = leaves[i].unsafe_buffer_pointer()
            except Exception:  # noqa: BLE001 (not a single-device array: nothing to dedupe)
                continue
            if ptr in seen:
                leaves[i] = jax.device_put(leaves[i], leaves[i].sharding, may_alias=False)
            seen.add(ptr)
        out = self.compiled(*leaves)
        return jax.tree_util.tree_unflatten(self.out_tree, out)


def _key(leaves, in_tree, static: dict, donate: Sequence[int], options: dict, name: str) -> str:
    h = hashlib.sha256()
    for part in (
        name,
        source_digest(),
        _platform_digest(),
        str(in_tree),
        repr(sorted((k, repr(v)) for k, v in static.items())),
        repr(tuple(donate)),
        repr(sorted(options.items())),
        repr([(tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)))
              for x in leaves]),
    ):  # fmt: skip
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _single_device(leaves) -> bool:
    devices = set()
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            continue
        devices |= set(sharding.device_set)
    return len(devices) <= 1


def _pack(serialized: bytes, out_tree) -> bytes:
    """magic | sha256(body) | len(tree) | pickled output tree | serialized Exported."""
    tree = pickle.dumps(out_tree)
    body = struct.pack("<Q", len(tree)) + tree + serialized
    return _MAGIC + hashlib.sha256(body).digest() + body


def _unpack(payload: bytes):
    """(output tree, serialized Exported) of a file `_pack` wrote; ValueError if damaged."""
    head = len(_MAGIC) + 32
    if not payload.startswith(_MAGIC) or len(payload) < head + 8:
        raise ValueError("not an exported qspec-jax program")
    body = payload[head:]
    if hashlib.sha256(body).digest() != payload[len(_MAGIC) : head]:
        raise ValueError("the exported program's checksum does not match (a damaged file)")
    (n,) = struct.unpack_from("<Q", body, 0)
    out_tree = pickle.loads(body[8 : 8 + n])  # noqa: S301 (checked, from the user's own cache)
    return out_tree, bytearray(body[8 + n :])


def compile_program(
    fn: Callable[..., Any],
    args: tuple,
    static: dict,
    *,
    name: str,
    donate: Sequence[int] = (),
    compiler_options: dict | None = None,
    directory: str | None = None,
) -> Program | None:
    """Compiles `fn(*args, **static)` through an exported program on disk, when possible.

    Args:
        fn: the plain (not jitted) function; `static` are its static keyword arguments.
        args: the positional arguments (pytrees of arrays), concrete: their shapes, dtypes and
            tree decide the program.
        static: hashable keyword arguments, part of the program (configs).
        name: the program's name (part of the key).
        donate: indices into `args` whose buffers the program may reuse.
        compiler_options: XLA compiler options of the top-level jit.
        directory: where exported programs live (default: ``<cache root>/exported``).

    Returns:
        A `Program` (its `source` says whether the exported program was read or written now),
        or None when the export cache is off, the arguments span several devices, or the
        program could not be exported: the caller then compiles it as usual.
    """
    options = dict(compiler_options or {})
    leaves, in_tree = jax.tree_util.tree_flatten(args)
    if not export_cache_enabled() or not _single_device(leaves):
        return None
    # leaf indices of the donated arguments, from the argument tree's per-argument leaf counts
    starts = [0]
    for child in in_tree.children():
        starts.append(starts[-1] + child.num_leaves)
    donate_leaves = tuple(i for d in donate for i in range(starts[d], starts[d + 1]))
    directory = directory or os.path.join(cache_root(), "exported")
    path = os.path.join(directory, _key(leaves, in_tree, static, donate, options, name) + ".bin")

    def from_exported(exp, out_tree, source: str) -> Program:
        if any(t.encode() in exp.mlir_module_serialized for t in _custom_call_targets()):
            from pallas_kernels import cpu_kernels  # noqa: PLC0415

            # the FFI handlers are registered on first use, which tracing would have been
            if cpu_kernels.unavailable_reason() is not None:
                raise RuntimeError("the exported program calls CPU kernels not available here")
        compiled = (
            jax.jit(exp.call, donate_argnums=donate_leaves, compiler_options=options)
            .lower(*leaves)
            .compile()
        )
        return Program(compiled, out_tree, source, donate_leaves)

    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                out_tree, serialized = _unpack(f.read())
            return from_exported(jax.export.deserialize(serialized), out_tree, "exported-read")
        except Exception:  # noqa: BLE001 (a stale or damaged file: trace instead, rewrite it)
            pass
    try:
        out_tree_box = []

        def flat(*xs):
            out = fn(*jax.tree_util.tree_unflatten(in_tree, xs), **static)
            out_leaves, out_tree = jax.tree_util.tree_flatten(out)
            out_tree_box.append(out_tree)
            return out_leaves

        checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _custom_call_targets()]
        avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
        exp = jax.export.export(
            jax.jit(flat), platforms=[jax.default_backend()], disabled_checks=checks
        )(*avals)
        out_tree = out_tree_box[-1]
        payload = _pack(exp.serialize(), out_tree)
    except Exception:  # noqa: BLE001 (not exportable here: the caller compiles as usual)
        return None
    program = from_exported(exp, out_tree, "exported-written")
    try:
        write_atomic(path, payload, make_dirs=True, dir_mode=0o700)
    except OSError:
        program.source = "exported-unwritten"
    return program
