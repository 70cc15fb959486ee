"""Quantized checkpoints: the packed int4 parameters written with orbax, plus one JSON file.

A checkpoint is a directory:

    <path>/qspec_checkpoint.json   format version, LlamaConfig, QuantConfig, tree structure,
                                   per-array shape / dtype / sha256, tokenizer source, extra
    <path>/arrays/                 the orbax (StandardCheckpointHandler, tensorstore / OCDBT) tree

Only arrays go through orbax (a nested dict of numpy arrays mirroring `Params` without its None
fields); everything else is JSON, and the loader rebuilds `Params` / `LayerParams` /
`QuantizedWeight` from the recorded structure through a fixed whitelist of classes. Nothing is
pickled or unpickled anywhere.

Atomicity. `save_quantized` writes the whole checkpoint (arrays first, the JSON last) into a
temporary sibling directory ``.<name>.tmp-XXXX`` of `path` and only then renames it to `path`,
so `path` either holds a complete checkpoint or nothing. A save interrupted by an exception
removes the temporary directory; one killed outright leaves it behind, and it never loads (its
JSON is written last; and it is not at `path`). Overwriting:

* `path` does not exist: one ``rename`` (atomic).
* `path` is an existing qspec checkpoint and ``overwrite=True``: on Linux the two directories are
  swapped atomically (``renameat2(RENAME_EXCHANGE)``) and the old one is then deleted, so a
  reader sees either the old or the new checkpoint, never neither; where that call is not
  available (other systems, some file systems) the old checkpoint is first renamed to
  ``.<name>.old-XXXX`` and the new one renamed into place, which leaves a short window with no
  checkpoint at `path` (but never a partial one; after a crash in that window the old
  checkpoint is in the ``.old-`` sibling).
* `path` is an existing qspec checkpoint and ``overwrite=False`` (the default): FileExistsError.
* `path` exists and is not a qspec checkpoint (any other file or directory): FileExistsError,
  always; nothing is deleted.

`load_quantized` checks the format version, the config JSON (unknown or missing keys, types),
the structure, each array's shape and dtype against the recorded ones, against orbax's own
metadata and against the shapes the config implies, and each array's sha256 (detects
truncated or corrupted array files); every failure is a one-sentence
`qspec_jax.loading.errors.LoadError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import types
import typing
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qspec_jax.config import LlamaConfig, QuantConfig, RopeScaling
from qspec_jax.loading.errors import LoadError, load_error
from qspec_jax.model.params import LayerParams, Params, is_derived, stack_layers
from qspec_jax.quant.format import Q8_GROUP, Q8Head, QuantizedWeight

FORMAT_VERSION = 1
META_FILE = "qspec_checkpoint.json"
ARRAYS_DIR = "arrays"
FORMAT_NAME = "qspec-jax quantized checkpoint"

# The only classes the loader instantiates (by name, from the JSON structure).
_CLASSES: dict[str, type] = {
    "Params": Params,
    "LayerParams": LayerParams,
    "QuantizedWeight": QuantizedWeight,
    "Q8Head": Q8Head,
}
# Params fields a checkpoint may leave out (written before the field existed): None on load.
_OPTIONAL_FIELDS = {"Params": ("head_q8",)}
_TOP_KEYS = (
    "format", "format_version", "llama_config", "quant_config", "tree", "arrays",
    "tokenizer_source", "extra", "arrays_dir",
)
LINEARS = ("wqkv", "wo", "w_gate_up", "w_down")

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "is_checkpoint",
    "load_quantized",
    "read_metadata",
    "save_quantized",
]


# =========================================================================== tree <-> JSON
def _describe(node: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    """JSON structure of a params pytree node; fills `arrays` (dotted name -> numpy array)."""
    if node is None:
        return None
    cls = type(node)
    if cls.__name__ in _CLASSES and _CLASSES[cls.__name__] is cls:
        fields = {
            f.name: _describe(getattr(node, f.name), f"{prefix}{f.name}.", arrays)
            for f in dataclasses.fields(node)
            if not is_derived(f)  # not weights (Params.mesh)
        }
        return {"type": cls.__name__, "fields": fields}
    if isinstance(node, (jax.Array, np.ndarray)):
        name = prefix[:-1]
        if not isinstance(node, np.ndarray) and not node.is_fully_addressable:
            raise ValueError(
                f"save_quantized: array {name} is not fully addressable from this process "
                "(multi-host sharded); gather it first or save from a single-process copy"
            )
        arrays[name] = np.asarray(jax.device_get(node))
        return "array"
    raise TypeError(f"save_quantized: unsupported leaf {prefix[:-1]!r} of type {cls.__name__}")


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a.b': x} -> {'a': {'b': x}} (the orbax tree)."""
    out: dict[str, Any] = {}
    for name, v in flat.items():
        *path, last = name.split(".")
        d = out
        for p in path:
            d = d.setdefault(p, {})
        d[last] = v
    return out


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _sha256(a: np.ndarray) -> str:
    h = hashlib.sha256()
    # the raw bytes (a memoryview cannot cast bfloat16's 'E' format; the bytes are the same)
    h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


# =========================================================================== config <-> JSON
def _config_to_json(cfg) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return json.loads(json.dumps(d))  # tuples -> lists, fails early on anything odd


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_value(file: str, key: str, value: Any, hint: Any) -> Any:
    """Checks / converts a JSON value against a dataclass field type; returns the value."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    bad = load_error(
        file, f"config key {key!r} has the invalid value {value!r} (expected {_hint_name(hint)})",
        "re-save the checkpoint",
    )
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _check_value(file, key, value, rest[0])
        raise bad
    if hint is RopeScaling:
        if not isinstance(value, dict):
            raise bad
        return _dataclass_from_json(RopeScaling, value, file, prefix=f"{key}.")
    if origin is tuple:
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise bad
        return tuple(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _hint_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _dataclass_from_json(cls, d: Any, file: str, prefix: str = ""):
    """Builds a config dataclass from JSON; LoadError naming any unknown / missing key."""
    what = f"{prefix[:-1]} " if prefix else ""
    if not isinstance(d, dict):
        raise load_error(file, f"{cls.__name__} {what}is not a JSON object", "re-save the checkpoint")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        raise load_error(
            file, f"unknown {cls.__name__} key {prefix + unknown[0]!r}",
            "it was written by a different qspec-jax version or edited by hand; re-save it",
        )
    missing = [k for k in names if k not in d]
    if missing:
        raise load_error(
            file, f"missing {cls.__name__} key {prefix + missing[0]!r}",
            "it was written by a different qspec-jax version or edited by hand; re-save it",
        )
    hints = _field_types(cls)
    kw = {k: _check_value(file, f"{prefix}{k}", d[k], hints[k]) for k in names}
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise load_error(file, f"invalid {cls.__name__} ({e})", "re-save the checkpoint") from None


# =========================================================================== expected shapes
def _linear_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """Logical [K, N] of each decoder linear."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return {
        "wqkv": (d, cfg.q_size + 2 * cfg.kv_size),
        "wo": (cfg.q_size, d),
        "w_gate_up": (d, 2 * f),
        "w_down": (f, d),
    }


def _check_against_config(file: str, cfg: LlamaConfig, qcfg: QuantConfig, tree: dict,
                          arrays: dict[str, dict]) -> None:
    """Every recorded array shape against what the config implies (LoadError on mismatch)."""
    n_layers, d, v = cfg.num_layers, cfg.hidden_size, cfg.vocab_size

    def shape_of(name):
        return tuple(arrays[name]["shape"]) if name in arrays else None

    def expect(name, shape, why=""):
        found = shape_of(name)
        if found != tuple(shape):
            raise load_error(
                file,
                f"array {name} has shape {list(found) if found else None} but the config implies "
                f"{list(shape)}{why}",
                "the config or the arrays were altered; re-save the checkpoint",
            )

    expect("embed", (v, d))
    expect("final_norm", (d,))
    expect("layers.attn_norm", (n_layers, d))
    expect("layers.mlp_norm", (n_layers, d))
    top = tree["fields"]
    if top["lm_head"] is not None:
        expect("lm_head", (d, v))
    elif not cfg.tie_embeddings:
        raise load_error(file, "array lm_head is missing but the config has untied embeddings",
                         "re-save the checkpoint")
    if top.get("head_q8") is not None:
        expect("head_q8.codes", (v, d))
        expect("head_q8.scales", (v, d // Q8_GROUP))
        for name, dt in (("codes", "int8"), ("scales", "float32")):
            if arrays[f"head_q8.{name}"]["dtype"] != dt:
                raise load_error(
                    file, f"array head_q8.{name} has dtype {arrays[f'head_q8.{name}']['dtype']} "
                    f"but must be {dt}", "re-save the checkpoint",
                )
    lay = top["layers"]["fields"]
    qkv_n = cfg.q_size + 2 * cfg.kv_size
    if cfg.qkv_bias != (lay["bqkv"] is not None):
        raise load_error(
            file, f"array layers.bqkv is {'missing' if cfg.qkv_bias else 'present'} but the "
            f"config has qkv_bias={cfg.qkv_bias}", "re-save the checkpoint",
        )
    if cfg.qkv_bias:
        expect("layers.bqkv", (n_layers, qkv_n))
    for lin, (k, n) in _linear_shapes(cfg).items():
        node = lay[lin]
        name = f"layers.{lin}"
        quant = isinstance(node, dict)
        if quant != qcfg.quantized:
            raise load_error(
                file, f"{name} is {'int4' if quant else 'float'} but the quant config method is "
                f"{qcfg.method!r}", "re-save the checkpoint",
            )
        if not quant:
            expect(name, (n_layers, k, n))
            continue
        expect(f"{name}.packed", (n_layers, k // 2, n))
        scales = shape_of(f"{name}.scales")
        groups = scales[1] if scales and len(scales) == 3 else 0
        if not (scales and len(scales) == 3 and scales[0] == n_layers and scales[2] == n
                and _group_ok(k, groups)):
            raise load_error(
                file,
                f"array {name}.scales has shape {list(scales) if scales else None} but the config "
                f"implies [{n_layers}, {k} // G, {n}] for a group size G, a multiple of 32 "
                f"dividing {k}",
                "the config or the arrays were altered; re-save the checkpoint",
            )
        has_mins = node["fields"]["mins"] is not None
        if has_mins == qcfg.symmetric:
            raise load_error(
                file, f"array {name}.mins is {'present' if has_mins else 'missing'} but the quant "
                f"config has symmetric={qcfg.symmetric}", "re-save the checkpoint",
            )
        if has_mins:
            expect(f"{name}.mins", (n_layers, groups, n))
        if arrays[f"{name}.packed"]["dtype"] != "uint8":
            raise load_error(
                file, f"array {name}.packed has dtype {arrays[f'{name}.packed']['dtype']} but "
                "packed int4 codes are uint8", "re-save the checkpoint",
            )


def _group_ok(k: int, groups: int) -> bool:
    """Whether K rows split into `groups` groups whose size is a multiple of 32."""
    return groups > 0 and k % groups == 0 and (k // groups) % 32 == 0


# =========================================================================== save
def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths with renameat2(RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding a `qspec_checkpoint.json`."""
    return os.path.isfile(os.path.join(os.fspath(path), META_FILE))


def _write_arrays(directory: str, arrays: dict[str, np.ndarray]) -> None:
    import orbax.checkpoint as ocp  # noqa: PLC0415 (heavy import, only when saving / loading)

    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        ckptr.save(directory, _nest(arrays))


def _write_json(file: str, meta: dict[str, Any]) -> None:
    with open(file, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _cleanup(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def save_quantized(
    path: str | os.PathLike,
    cfg: LlamaConfig,
    params: Params,
    qcfg: QuantConfig,
    tokenizer_source: str | None,
    extra_meta: dict | None = None,
    *,
    overwrite: bool = False,
) -> str:
    """Writes a checkpoint directory atomically (see the module docstring).

    Args:
        path: the checkpoint directory to create.
        cfg: the model config.
        params: the parameters (int4 `QuantizedWeight` linears, or float; None fields allowed).
            Per-layer (`unstack_layers`) params are stored stacked, the canonical layout
            `load_quantized` returns (`Engine` unstacks again on CPU). Sharded arrays are
            gathered to the host first.
        qcfg: how the weights were quantized.
        tokenizer_source: what `qspec_jax.loading.tokenizer.load_tokenizer` should read
            ("smollm2-135m", a .gguf path, a Hugging Face directory), or None. An existing
            relative path is stored as an absolute path.
        extra_meta: JSON-serialisable extra metadata (e.g. the quantizer settings).
        overwrite: replace an existing qspec checkpoint at `path` (never anything else).

    Returns:
        The absolute path of the checkpoint.

    Raises:
        FileExistsError: `path` exists and is not a qspec checkpoint, or is one and not
            `overwrite`.
        TypeError / ValueError: params that are not a `Params` tree, or extra_meta that is not
            JSON-serialisable.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        if not is_checkpoint(path):
            raise FileExistsError(
                f"{path} exists and is not a qspec checkpoint; refusing to overwrite it "
                "(choose another path or remove it yourself)"
            )
        if not overwrite:
            raise FileExistsError(
                f"{path} already holds a qspec checkpoint; pass overwrite=True to replace it"
            )
    if not isinstance(params, Params):
        raise TypeError(f"save_quantized needs a Params tree, got {type(params).__name__}")
    if params.mesh is not None:  # tensor-parallel layout: store the canonical one
        from qspec_jax.sharding import canonical_params  # noqa: PLC0415

        params = canonical_params(params, cfg)
    params = stack_layers(params)
    if tokenizer_source is not None:
        tokenizer_source = os.fspath(tokenizer_source)
        if os.path.exists(tokenizer_source):
            tokenizer_source = os.path.abspath(tokenizer_source)
    try:
        extra = json.loads(json.dumps(extra_meta or {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra_meta must be JSON-serialisable: {e}") from None

    arrays: dict[str, np.ndarray] = {}
    tree = _describe(params, "", arrays)
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "llama_config": _config_to_json(cfg),
        "quant_config": _config_to_json(qcfg),
        "tree": tree,
        "arrays": {
            name: {"shape": list(a.shape), "dtype": a.dtype.name, "sha256": _sha256(a)}
            for name, a in arrays.items()
        },
        "tokenizer_source": tokenizer_source,
        "extra": extra,
        "arrays_dir": ARRAYS_DIR,
    }
    # Fail before writing anything if the config does not describe these arrays.
    _check_against_config(path, cfg, qcfg, tree, meta["arrays"])

    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        _write_arrays(os.path.join(tmp, ARRAYS_DIR), arrays)
        _write_json(os.path.join(tmp, META_FILE), meta)  # last: a directory without it never loads
        _fsync_dir(tmp)
        _commit(tmp, path, overwrite)
    except BaseException:
        _cleanup(tmp)
        raise
    _fsync_dir(parent)
    return path


def _commit(tmp: str, path: str, overwrite: bool) -> None:
    """Moves the finished temporary directory to `path` (see the module docstring)."""
    if not os.path.lexists(path):
        try:
            os.rename(tmp, path)  # fails if something non-empty appeared at path meanwhile
        except OSError as e:
            raise FileExistsError(f"{path} appeared while saving; not overwritten ({e})") from None
        return
    if not (overwrite and is_checkpoint(path)):
        raise FileExistsError(f"{path} appeared while saving and is not replaceable")
    if _exchange(tmp, path):
        _cleanup(tmp)  # tmp now holds the old checkpoint
        return
    parent, name = os.path.split(path)
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.rmdir(old)
    os.rename(path, old)
    os.rename(tmp, path)
    _cleanup(old)


# =========================================================================== load
def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed `qspec_checkpoint.json` of a checkpoint, with its format version checked."""
    path = os.fspath(path)
    file = os.path.join(path, META_FILE)
    if not os.path.isdir(path):
        raise load_error(path, "is not a directory", "pass a directory written by save_quantized")
    if not os.path.isfile(file):
        raise load_error(
            path, f"has no {META_FILE}, so it is not a complete qspec checkpoint",
            "pass a directory written by save_quantized",
        )
    try:
        with open(file, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise load_error(file, f"is not valid JSON ({e})", "re-save the checkpoint") from None
    if not isinstance(meta, dict):
        raise load_error(file, "is not a JSON object", "re-save the checkpoint")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise load_error(
            file,
            f"format_version is {version!r} but this qspec-jax reads format_version "
            f"{FORMAT_VERSION}",
            "re-save the checkpoint with this version of qspec-jax",
        )
    unknown = [k for k in meta if k not in _TOP_KEYS]
    if unknown:
        raise load_error(file, f"unknown key {unknown[0]!r}", "re-save the checkpoint")
    missing = [k for k in _TOP_KEYS if k not in meta]
    if missing:
        raise load_error(file, f"missing key {missing[0]!r}", "re-save the checkpoint")
    return meta


def _check_tree(file: str, node: Any, cls_name: str | None, prefix: str, names: list[str]) -> None:
    """Validates the JSON structure against the whitelisted classes; collects array names."""
    bad = load_error(file, f"tree node {prefix[:-1] or '<root>'!r} is malformed",
                     "re-save the checkpoint")
    if node == "array":
        names.append(prefix[:-1])
        return
    if not isinstance(node, dict) or set(node) != {"type", "fields"}:
        raise bad
    cls = _CLASSES.get(node["type"])
    if cls is None or (cls_name is not None and node["type"] != cls_name):
        raise load_error(file, f"tree node {prefix[:-1] or '<root>'!r} has type "
                         f"{node['type']!r}", "re-save the checkpoint")
    fields = node["fields"]
    want = [f.name for f in dataclasses.fields(cls) if not is_derived(f)]
    older = [f for f in want if f not in _OPTIONAL_FIELDS.get(node["type"], ())]
    if not isinstance(fields, dict) or list(fields) not in (want, older):
        raise load_error(
            file, f"tree node {prefix[:-1] or '<root>'!r} has fields "
            f"{list(fields) if isinstance(fields, dict) else fields!r}, expected {want}",
            "re-save the checkpoint",
        )
    for k, v in fields.items():
        if v is None:
            if cls is Params and k not in ("lm_head", "head_q8") \
                    or cls is LayerParams and k != "bqkv" \
                    or cls is QuantizedWeight and k != "mins" or cls is Q8Head:
                raise load_error(file, f"tree field {prefix}{k} is None but must be an array",
                                 "re-save the checkpoint")
            continue
        sub = {"layers": "LayerParams", "head_q8": "Q8Head"}.get(k) if cls is Params else None
        if cls is LayerParams and k in LINEARS and v != "array":
            sub = "QuantizedWeight"
        if sub is None and v != "array":
            raise bad
        _check_tree(file, v, sub, f"{prefix}{k}.", names)


def _build(node: Any, prefix: str, restored: dict[str, Any]) -> Any:
    if node is None:
        return None
    if node == "array":
        return restored[prefix[:-1]]
    cls = _CLASSES[node["type"]]
    return cls(**{k: _build(v, f"{prefix}{k}.", restored) for k, v in node["fields"].items()})


def load_quantized(path: str | os.PathLike, *, mesh=None, verify_checksums: bool = True):
    """Loads a checkpoint written by `save_quantized`.

    Args:
        path: the checkpoint directory.
        mesh: optional `jax.sharding.Mesh`: the canonical arrays are restored, then converted
            and placed by `qspec_jax.sharding.shard_params` (tensor-parallel layout).
        verify_checksums: compare each array's sha256 with the recorded one (reads every byte
            once more on the host; skipped for arrays not fully addressable by this process).

    Returns:
        (LlamaConfig, Params with stacked layers, QuantConfig, tokenizer_source or None).

    Raises:
        LoadError: a missing or malformed file, a format version, config, structure, shape,
            dtype or checksum that does not match (the message names the file and the item).
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415

    path = os.fspath(path)
    meta = read_metadata(path)
    file = os.path.join(path, META_FILE)
    if meta["format"] != FORMAT_NAME:
        raise load_error(file, f"format is {meta['format']!r}, not {FORMAT_NAME!r}",
                         "pass a directory written by save_quantized")
    cfg = _dataclass_from_json(LlamaConfig, meta["llama_config"], file)
    qcfg = _dataclass_from_json(QuantConfig, meta["quant_config"], file)
    tok = meta["tokenizer_source"]
    if tok is not None and not isinstance(tok, str):
        raise load_error(file, f"tokenizer_source {tok!r} is not a string",
                         "re-save the checkpoint")
    if meta["arrays_dir"] != ARRAYS_DIR:
        raise load_error(file, f"arrays_dir is {meta['arrays_dir']!r}, expected {ARRAYS_DIR!r}",
                         "re-save the checkpoint")

    tree = meta["tree"]
    names: list[str] = []
    _check_tree(file, tree, "Params", "", names)
    arrays = meta["arrays"]
    if not isinstance(arrays, dict) or sorted(arrays) != sorted(names):
        extra = sorted(set(arrays) ^ set(names)) if isinstance(arrays, dict) else ["?"]
        raise load_error(file, f"the arrays table does not match the tree (array {extra[0]})",
                         "re-save the checkpoint")
    for n, a in arrays.items():
        if not (isinstance(a, dict) and set(a) == {"shape", "dtype", "sha256"}
                and isinstance(a["shape"], list)
                and all(isinstance(s, int) and s >= 0 for s in a["shape"])):
            raise load_error(file, f"the entry of array {n} is malformed", "re-save the checkpoint")
        try:
            jnp.dtype(a["dtype"])
        except TypeError:
            raise load_error(file, f"array {n} has unknown dtype {a['dtype']!r}",
                             "re-save the checkpoint") from None
    _check_against_config(file, cfg, qcfg, tree, arrays)

    adir = os.path.join(path, ARRAYS_DIR)
    if not os.path.isdir(adir):
        raise load_error(adir, "is missing", "re-save the checkpoint")
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
            item = ckptr.metadata(adir).item_metadata
            stored = _flatten(dict(item.tree)) if item is not None else None
            if stored is None:
                raise ValueError("orbax could not read the array metadata")
            for n, a in arrays.items():
                m = stored.get(n)
                want = (tuple(a["shape"]), jnp.dtype(a["dtype"]))
                found = None if m is None else (tuple(m.shape), jnp.dtype(m.dtype))
                if found != want:
                    raise load_error(
                        adir, f"array {n} is stored as {found} but {META_FILE} records {want}",
                        "the arrays were altered; re-save the checkpoint",
                    )
            target = _nest({
                n: jax.ShapeDtypeStruct(tuple(a["shape"]), jnp.dtype(a["dtype"]))
                for n, a in arrays.items()
            })
            restored = _flatten(ckptr.restore(adir, target))
    except LoadError:
        raise
    except Exception as e:  # tensorstore / orbax errors on truncated or corrupted files
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        raise load_error(
            adir, f"could not read the arrays ({type(e).__name__}: {msg})",
            "the checkpoint is truncated or corrupted; re-save it",
        ) from None

    out: dict[str, Any] = {}
    for n, a in arrays.items():
        x = restored.get(n)
        want = (tuple(a["shape"]), jnp.dtype(a["dtype"]))
        found = None if x is None else (tuple(x.shape), jnp.dtype(x.dtype))
        if found != want:
            raise load_error(adir, f"array {n} was restored as {found}, expected {want}",
                             "re-save the checkpoint")
        addressable = not isinstance(x, jax.Array) or x.is_fully_addressable
        if verify_checksums and addressable and _sha256(np.asarray(x)) != a["sha256"]:
            raise load_error(
                adir, f"array {n} does not match its recorded sha256",
                "the checkpoint is corrupted; re-save it",
            )
        out[n] = x if isinstance(x, jax.Array) else jnp.asarray(x)
    params = _build(tree, "", out)
    if mesh is not None:  # the stored layout is canonical: convert it for tensor parallelism
        from qspec_jax.sharding import shard_params  # noqa: PLC0415

        params = shard_params(params, mesh, cfg)
    return cfg, params, qcfg, tok
