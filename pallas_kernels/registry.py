"""The kernel registry: one selection point per op, implementations in preference order.

Every op the model runs through a kernel (int4 matmuls, activation quantization, Hadamard, the
LM head, both caches' attention, and the prompt prefill's choice) is an `Op` registered here by
`pallas_kernels.dispatch`, holding its `Implementation`s in preference order, the reference
("xla", always usable) last. `run` is the only code that decides which one computes a call:

* a forced name (``impl="cpu"``, ``"pallas"``, ...) runs that implementation and lets its errors
  (NotImplementedError included) propagate; an op without an implementation of that name runs
  its reference when the name is in `Op.forced_to_reference` (e.g. ``"cpu"`` on an op with no CPU
  kernel), else raises NotImplementedError;
* auto (``impl=None``) walks the chain: an implementation is tried when its predicates hold
  (`Implementation.supports`: can it take this call; `Implementation.prefer`: does auto want it
  here: backend, device count, dtype, row limits) and, for implementations marked
  ``self_check``, when it passed its self-check; a NotImplementedError raised while tracing it
  moves on to the next one.

The self-check (issue 20, item 4): the first time auto would use a ``self_check``
implementation (the compiled Pallas kernels) on a backend, the registry builds a small case with
the call's static configuration (`SelfCheck.case`), runs the implementation and the reference on
it eagerly (in a worker thread, so it works while a jit trace is active), and compares them
against the op's stated bound (`SelfCheck.compare`). A compile error, a run-time error or a
mismatch beyond the bound warns once (`KernelFallbackWarning`, with the reason) and the
implementation is skipped in this process; the result is cached per (op, implementation, device
kind, case configuration). A NotImplementedError on the check case skips it quietly (the kernel
refuses that configuration). The check runs on GPU backends by default; ``QSPEC_JAX_KERNEL_SELF
_CHECK=1`` (or `set_self_check(True)`, the tests' hook) runs it on any backend, ``=0`` never.

This module is generic: it knows nothing of int4 or caches, and imports nothing from
`qspec_jax` (nor does any module of `pallas_kernels`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import jax
import numpy as np

IMPLS = ("xla", "pallas", "pallas_interpret", "cpu")
ENV_SELF_CHECK = "QSPEC_JAX_KERNEL_SELF_CHECK"
GPU_BACKENDS = ("gpu", "cuda", "rocm")


class KernelFallbackWarning(RuntimeWarning):
    """A kernel failed its self-check (compile error or wrong result); the chain falls back."""


@dataclasses.dataclass(frozen=True)
class Call:
    """One call of an op: its positional arguments and keyword arguments (static ones)."""

    op: str
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict, hash=False)


Predicate = Callable[[Call], str | None]
"""None when the implementation may take the call, else one sentence saying why not."""


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way of computing an op.

    Attributes:
        name: "pallas", "pallas_interpret", "cpu", "xla", or a test's own name.
        fn: called as ``fn(*call.args, **call.kwargs)``; may raise NotImplementedError while
            tracing for shapes it does not cover (auto then tries the next implementation).
        supports: whether it can take this call at all (checked for auto and forced names; a
            forced name it does not support is treated as absent).
        prefer: whether auto wants it for this call (checked for auto only).
        self_check: validate it against the reference on first auto use (`SelfCheck`).
    """

    name: str
    fn: Callable
    supports: Predicate | None = None
    prefer: Predicate | None = None
    self_check: bool = False

    def why_not(self, call: Call, auto: bool) -> str | None:
        """None when usable for `call`, else the first predicate's reason."""
        for pred in (self.supports, self.prefer if auto else None):
            if pred is not None:
                reason = pred(call)
                if reason is not None:
                    return reason
        return None


@dataclasses.dataclass(frozen=True)
class SelfCheck:
    """How to check an implementation of an op against its reference.

    Attributes:
        case: ``case(call) -> (key, make)``: `key` (hashable) names the call's static
            configuration (dtypes, group sizes, bits, view, ...); ``make() -> (args, kwargs)``
            builds a small case with it from fixed-seed random data (run in the worker thread,
            only when the key has no cached result).
        compare: ``compare(out, ref) -> None | str``: None within the op's bound, else why not.
        bound: the bound in words (for the docs and the warning).
        reference: the function the case is compared with (default: the op's reference).
    """

    case: Callable[[Call], tuple[Hashable, Callable[[], tuple[tuple, dict]]]]
    compare: Callable[[Any, Any], str | None]
    bound: str
    reference: Callable | None = None


@dataclasses.dataclass
class Op:
    """An op: its implementations in preference order (the reference last).

    Attributes:
        name: the op's name (`dispatch` registers w4a16_matmul, w4ax_matmul, ...).
        chain: implementations, most preferred first; the reference must be among them.
        reference: the name of the always-usable implementation (auto's last resort).
        self_check: how ``self_check`` implementations are validated (None: never).
        forced_to_reference: forced names that run the reference when the op has no
            (supporting) implementation of that name.
        doc: one line for the docs.
    """

    name: str
    chain: list[Implementation]
    reference: str = "xla"
    self_check: SelfCheck | None = None
    forced_to_reference: frozenset[str] = frozenset({"cpu"})
    doc: str = ""

    def find(self, name: str) -> Implementation | None:
        """The implementation called `name`, or None."""
        return next((i for i in self.chain if i.name == name), None)


_ops: dict[str, Op] = {}
_lock = threading.RLock()
_checks: dict[tuple, str | None] = {}  # (op, impl, device, case key) -> None (passed) or reason
_refused: set[tuple] = set()  # check cases the implementation raised NotImplementedError on
_force_check: bool | None = None


def register(op: Op) -> Op:
    """Registers (or replaces) an op; returns it."""
    if op.find(op.reference) is None:
        raise ValueError(f"op {op.name!r} has no reference implementation {op.reference!r}")
    with _lock:
        _ops[op.name] = op
    return op


def get(name: str) -> Op:
    """The registered op called `name` (KeyError naming the known ones otherwise)."""
    try:
        return _ops[name]
    except KeyError:
        raise KeyError(f"no kernel op {name!r}; registered: {sorted(_ops)}") from None


def ops() -> dict[str, Op]:
    """Every registered op by name."""
    return dict(_ops)


def add_implementation(op_name: str, impl: Implementation, index: int = 0) -> Implementation:
    """Inserts `impl` into op `op_name`'s chain at `index` (0: most preferred); returns it."""
    with _lock:
        get(op_name).chain.insert(index, impl)
    return impl


def remove_implementation(op_name: str, impl: Implementation) -> None:
    """Removes `impl` (the object `add_implementation` returned) from op `op_name`'s chain."""
    with _lock:
        get(op_name).chain.remove(impl)


# ----------------------------------------------------------------------------- self-check


def set_self_check(on: bool | None) -> None:
    """Forces the self-check on (True, any backend) or off (False); None: the default
    (``$QSPEC_JAX_KERNEL_SELF_CHECK`` when set, else on for GPU backends only)."""
    global _force_check
    _force_check = on


def self_check_enabled() -> bool:
    """Whether auto self-checks ``self_check`` implementations before using them."""
    if _force_check is not None:
        return _force_check
    env = os.environ.get(ENV_SELF_CHECK, "").strip().lower()
    if env in ("0", "off", "false", "no"):
        return False
    if env in ("1", "on", "true", "yes"):
        return True
    return jax.default_backend() in GPU_BACKENDS


def clear_self_checks() -> None:
    """Forgets every cached self-check result (tests)."""
    with _lock:
        _checks.clear()
        _refused.clear()


def self_check_results() -> dict[tuple, str | None]:
    """Cached results: (op, implementation, device kind, case key) -> None (passed) or why not."""
    with _lock:
        return dict(_checks)


def device_kind() -> str:
    """The backend and the kind of its first device (what a self-check result is valid for)."""
    return f"{jax.default_backend()}:{jax.devices()[0].device_kind}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def run_self_check(op_name: str, impl_name: str, call: Call | None = None) -> str | None:
    """Runs (or recalls) the self-check of one implementation of an op.

    Args:
        op_name: a registered op with a `SelfCheck`.
        impl_name: the implementation to check (any of the op's, e.g. "pallas_interpret").
        call: the call whose static configuration the case copies (its arrays may be tracers:
            only shapes and dtypes are read); None for the op's default case.

    Returns:
        None when it passed; else the reason (also when it refused the case: "refused: ...").
    """
    op = get(op_name)
    impl = op.find(impl_name)
    if impl is None or op.self_check is None:
        raise ValueError(f"op {op_name!r} has no implementation {impl_name!r} to self-check")
    return _validated(op, impl, call or Call(op_name, (), {}))


def _validated(op: Op, impl: Implementation, call: Call) -> str | None:
    sc = op.self_check
    key_part, make = sc.case(call)
    key = (op.name, impl.name, id(impl.fn), device_kind(), key_part)
    with _lock:
        if key in _refused:
            return "refused the self-check case"
        if key in _checks:
            return _checks[key]
    reference = sc.reference or op.find(op.reference).fn

    def work():
        args, kwargs = make()
        out = jax.device_get(impl.fn(*args, **kwargs))
        ref = jax.device_get(reference(*args, **kwargs))
        return out, ref

    # A worker thread: JAX's trace state is per thread, so the case runs eagerly even when the
    # call being selected is traced inside a jit.
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        try:
            out, ref = ex.submit(work).result()
            reason = sc.compare(out, ref)
            if reason is not None:
                reason = f"wrong result on the self-check case: {reason} (bound: {sc.bound})"
        except NotImplementedError as e:
            with _lock:
                _refused.add(key)
            return f"refused the self-check case: {_first_line(e)}"
        except Exception as e:  # noqa: BLE001 (any compile or run failure means: do not use it)
            reason = f"failed to compile or run: {_first_line(e)}"
    with _lock:
        if key in _checks:  # another thread finished first: it has warned
            return _checks[key]
        _checks[key] = reason
    if reason is not None:
        warnings.warn(
            f"kernel self-check: {op.name} implementation {impl.name!r} on {device_kind()} "
            f"{reason}; it is not used in this process, the next implementation in the chain "
            f"is (the XLA path where no other applies)",
            KernelFallbackWarning,
            stacklevel=4,
        )
    return reason


# ----------------------------------------------------------------------------- selection


def _forced(op: Op, impl: str, call: Call) -> Implementation:
    if impl not in IMPLS and op.find(impl) is None:
        raise ValueError(f"unknown impl {impl!r}; expected None or one of {IMPLS}")
    chosen = op.find(impl)
    reason = None if chosen is None else chosen.why_not(call, auto=False)
    if chosen is not None and reason is None:
        return chosen
    if impl in op.forced_to_reference:
        return op.find(op.reference)
    raise NotImplementedError(
        f"{op.name} has no {impl!r} implementation"
        + (f" for this call ({reason})" if reason else "")
        + "; use impl='xla'"
    )


def candidates(op_name: str, *args, **kwargs) -> list[str]:
    """The names auto would try for this call, in order, self-checks included (runs them)."""
    op = get(op_name)
    call = Call(op_name, args, kwargs)
    return [i.name for i in op.chain if _usable(op, i, call)]


def _usable(op: Op, impl: Implementation, call: Call) -> bool:
    if impl.why_not(call, auto=True) is not None:
        return False
    if impl.self_check and op.self_check is not None and self_check_enabled():
        return _validated(op, impl, call) is None
    return True


def auto_name(op_name: str, *args, **kwargs) -> str:
    """The implementation auto picks first for this call (predicates and self-checks only: a
    NotImplementedError it would raise while tracing is not seen)."""
    op = get(op_name)
    call = Call(op_name, args, kwargs)
    for impl in op.chain:
        if impl.name == op.reference or _usable(op, impl, call):
            return impl.name
    return op.reference


def run(op_name: str, *args, impl: str | None = None, **kwargs):
    """Computes op `op_name` on (args, kwargs) with the implementation the registry selects.

    Args:
        op_name: a registered op.
        *args, **kwargs: the op's arguments (passed to the implementation as they are).
        impl: None (auto: the chain) or a forced implementation name.

    Returns:
        The implementation's result.

    Raises:
        ValueError: an unknown impl name.
        NotImplementedError: a forced implementation refused the call, or the op has none of
            that name (and the name does not map to the reference).
    """
    op = get(op_name)
    call = Call(op_name, args, kwargs)
    if impl is not None:
        return _forced(op, impl, call).fn(*args, **kwargs)
    for cand in list(op.chain):
        if cand.name != op.reference and not _usable(op, cand, call):
            continue
        try:
            return cand.fn(*args, **kwargs)
        except NotImplementedError:
            if cand.name == op.reference:
                raise
    return op.find(op.reference).fn(*args, **kwargs)


# ----------------------------------------------------------------------------- comparisons


def rel_err(out, ref) -> float:
    """Relative Frobenius-norm error ||out - ref|| / ||ref|| in float64 (0 when both are 0)."""
    o = np.asarray(out, np.float64)
    r = np.asarray(ref, np.float64)
    den = np.linalg.norm(r)
    num = np.linalg.norm(o - r)
    return float(num / den) if den else float(num)


def compare_arrays(
    out, ref, *, float_rtol: dict[str, float], int_max_step: int = 0, int_max_frac: float = 0.0
) -> str | None:
    """Compares two outputs (an array or a tuple of arrays) leaf by leaf.

    Float leaves: relative Frobenius error <= ``float_rtol[reference dtype name]`` and no
    non-finite value where the reference is finite. Integer leaves: |difference| <=
    `int_max_step` everywhere and at most a fraction `int_max_frac` of them differing.

    Returns:
        None within the bound, else one sentence naming the leaf and the figure.
    """
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(outs) != len(refs):
        return f"{len(outs)} outputs, the reference has {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        o, r = np.asarray(o), np.asarray(r)
        if o.shape != r.shape:
            return f"output {i} has shape {o.shape}, the reference {r.shape}"
        if np.issubdtype(r.dtype, np.integer):
            diff = np.abs(o.astype(np.int64) - r.astype(np.int64))
            frac = float(np.mean(diff > 0)) if diff.size else 0.0
            if diff.size and (diff.max() > int_max_step or frac > int_max_frac):
                return (
                    f"output {i}: codes differ by up to {int(diff.max())} in {frac:.2%} of "
                    f"entries (allowed {int_max_step}, {int_max_frac:.2%})"
                )
            continue
        o32, r32 = o.astype(np.float32), r.astype(np.float32)
        if not np.all(np.isfinite(o32[np.isfinite(r32)])):
            return f"output {i} has non-finite values where the reference is finite"
        tol = float_rtol.get(str(r.dtype), max(float_rtol.values()))
        err = rel_err(o32, r32)
        if not err <= tol:
            return f"output {i} ({r.dtype}): relative error {err:.3g} > {tol:.3g}"
    return None
