"""QuantSpec (arXiv 2502.10424): self-speculation over the hierarchical KV cache.

The drafts run the verifier's own weights in the verify precision, but read the int4 halves of
QuantSpec's hierarchical cache (its "draft" view, `qspec_jax.cache.hierarchical`); the verifier
reads both halves (about int8) and overwrites the drafted positions, as in QSpec. The speed
comes from the draft's smaller KV reads at long context.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from qspec_jax.config import PRECISIONS
from qspec_jax.decoding.methods.base import check_one_of
from qspec_jax.decoding.methods.qspec import SequenceSpec


@dataclasses.dataclass(frozen=True)
class QuantSpec(SequenceSpec):
    """QuantSpec: drafts over the int4 view of the hierarchical cache, verifies over int8.

    Attributes:
        draft: the drafts' precision. None: the verifier's own (self-speculation on one weight
            set, the drafts differing only in the KV view), except with `verify="fp"`, where the
            draft is "w4a16": the paper's float target with a 4-bit draft copy
            (`load(..., draft_quant=...)` holds both).
        gamma, adaptive_gamma, spec_max_active, verify: see `SequenceSpec` (the paper: gamma 5).
    """

    name: ClassVar[str] = "quantspec"
    summary: ClassVar[str] = (
        "QuantSpec: drafts over the int4 view of the hierarchical KV cache, verifies over int8"
    )
    kv_caches: ClassVar[tuple[str, ...]] = ("hier",)
    default_kv_cache: ClassVar[str] = "hier"

    draft: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.draft is not None:
            check_one_of(self.draft, PRECISIONS, "draft precision")

    @property
    def draft_precision(self) -> str:
        if self.draft is not None:
            return self.draft
        return "w4a16" if self.verify == "fp" else self.verify

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.verify, self.draft_precision)))

    def _cache_refusal(self, kv_cache: str) -> str:
        return (
            "mode 'quantspec' drafts from the int4 halves of the hierarchical cache: "
            "use kv_cache='hier' (or mode 'qspec' with a float cache)"
        )
