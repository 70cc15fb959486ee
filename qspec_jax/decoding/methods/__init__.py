"""Decoding methods as objects behind one protocol (`DecodingMethod`), and their registry.

    from qspec_jax.decoding.methods import AR, QSpec, QuantSpec, HSpec
    engine.generate(prompts, method=QSpec(gamma=3, draft="w4a8"))
    engine.generate(prompts, mode="qspec", gamma=3)          # the same, as a shorthand

`REGISTRY` is the one list of methods: the CLI's `--mode` choices, the mode strings the engine
and the evaluation harness accept, and the README's mode table all come from it.

Adding a method: write one file here with a frozen-dataclass subclass of `DecodingMethod`
(`tokens_per_step`, `main_precision`, `step`, and where it counts something `init_carry` /
`stats`; `precisions`, `kv_caches` and `check` say what weights and caches it runs on), then
add one line to `REGISTRY` below.
"""

from __future__ import annotations

from typing import Any

from qspec_jax.decoding.methods.ar import AR
from qspec_jax.decoding.methods.base import DecodingMethod, MethodError
from qspec_jax.decoding.methods.draftmodel import DraftModelSpec
from qspec_jax.decoding.methods.hspec import HSpec
from qspec_jax.decoding.methods.qspec import MAX_GAMMA, QSpec, SequenceSpec
from qspec_jax.decoding.methods.quantspec import QuantSpec

REGISTRY: dict[str, type[DecodingMethod]] = {
    AR.name: AR,
    QSpec.name: QSpec,
    QuantSpec.name: QuantSpec,
    HSpec.name: HSpec,
    DraftModelSpec.name: DraftModelSpec,
}

# Options a mode shorthand accepts and ignores where they do not apply, so that one call site
# can loop over modes with the same gamma and draft (e.g. the evaluation harness).
SHARED_OPTIONS = ("gamma", "draft")


def _mode_table() -> dict[str, tuple[type[DecodingMethod], dict[str, Any]]]:
    table: dict[str, tuple[type[DecodingMethod], dict[str, Any]]] = {}
    for cls in REGISTRY.values():
        for mode, fixed in cls.modes().items():
            table[mode] = (cls, fixed)
    return table


def mode_names() -> tuple[str, ...]:
    """Every mode shorthand, in registry order: fp, w4a16, w4a4, w4a8, qspec, quantspec, hspec,
    draftmodel."""
    return tuple(_mode_table())


def method_class(mode: str) -> type[DecodingMethod]:
    """The class a mode shorthand builds (MethodError for an unknown mode)."""
    table = _mode_table()
    if mode not in table:
        raise MethodError(f"unknown mode {mode!r}: choose one of {', '.join(table)}")
    return table[mode][0]


def speculative_modes() -> tuple[str, ...]:
    """The mode shorthands whose method drafts."""
    return tuple(m for m, (cls, fixed) in _mode_table().items() if cls(**fixed).speculative)


def from_mode(mode: str, **options) -> DecodingMethod:
    """The method a mode shorthand names, built with the options that apply to it.

    Options the method does not take are dropped when they are `gamma` or `draft` (shared by
    every call site that loops over modes) or unset (None / False / 0); any other raises
    MethodError naming the method the option belongs to.

    Raises:
        MethodError: unknown mode, an option that does not apply, or a bad setting.
    """
    table = _mode_table()
    if mode not in table:
        raise MethodError(f"unknown mode {mode!r}: choose one of {', '.join(table)}")
    cls, fixed = table[mode]
    names = cls.option_names()
    kw = dict(fixed)
    for k, v in options.items():
        if k in fixed:
            continue
        if k in names:
            kw[k] = v
        elif k in SHARED_OPTIONS or v is None or v is False or v == 0:
            continue
        else:
            owners = [c.name for c in REGISTRY.values() if k in c.option_names()]
            if not owners:
                raise MethodError(f"unknown decoding option {k!r}")
            raise MethodError(f"{k} applies to {owners[0]} only, not {mode}")
    return cls(**kw)


def resolve(method: DecodingMethod | str, **options) -> DecodingMethod:
    """A method object from an object or a mode shorthand (options only with a shorthand)."""
    if isinstance(method, DecodingMethod):
        given = {k: v for k, v in options.items() if v is not None}
        if given:
            raise MethodError(
                f"options {', '.join(sorted(given))} go inside the method object "
                f"(e.g. {type(method).__name__}({next(iter(given))}=...)), not beside it"
            )
        return method
    if isinstance(method, str):
        return from_mode(method, **options)
    raise MethodError(
        f"method must be a DecodingMethod (e.g. QSpec(gamma=3)) or a mode string, got {method!r}"
    )


def mode_table_markdown() -> str:
    """The README's mode table, generated from the registry."""
    rows = ["| mode | method object | drafts in | output of | KV cache |", "|---|---|---|---|---|"]
    for mode, (cls, fixed) in _mode_table().items():
        m = cls(**fixed)
        args = ", ".join(f'{k}="{v}"' for k, v in fixed.items())
        caches = " or ".join(cls.kv_caches)
        rows.append(
            f"| `{mode}` | `{cls.__name__}({args})` | {m.draft_precision or '-'} "
            f"| {m.main_precision} | {caches} |"
        )
    return "\n".join(rows)


__all__ = [
    "AR",
    "MAX_GAMMA",
    "REGISTRY",
    "DecodingMethod",
    "DraftModelSpec",
    "HSpec",
    "MethodError",
    "QSpec",
    "QuantSpec",
    "SequenceSpec",
    "from_mode",
    "method_class",
    "mode_names",
    "mode_table_markdown",
    "resolve",
    "speculative_modes",
]
