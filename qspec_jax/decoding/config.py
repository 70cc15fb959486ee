"""`DecodeConfig`: the static settings of one generation program (a jit static argument)."""

from __future__ import annotations

import dataclasses

from qspec_jax.decoding.methods import AR, DecodingMethod, from_mode, resolve
from qspec_jax.decoding.sampling import SamplingConfig

GREEDY = SamplingConfig()

# The keyword shorthand of earlier releases: DecodeConfig(mode="qspec", gamma=3, ...). These map
# onto the method's own options; `draft_precision` keeps its earlier default "w4a4" (the
# paper's drafter) so that code written against it runs unchanged. `QSpec()` itself drafts in
# "w4a8", the engine's default.
_LEGACY = {
    "gamma": "gamma",
    "draft_precision": "draft",
    "verify_precision": "verify",
    "adaptive_gamma": "adaptive_gamma",
    "spec_max_active": "spec_max_active",
    "tree": "tree",
    "levels": "levels",
}


@dataclasses.dataclass(frozen=True, init=False)
class DecodeConfig:
    """Static decoding settings (hashable: a jit static argument).

    Attributes:
        method: the decoding method (`qspec_jax.decoding.methods`), e.g. `QSpec(gamma=3)`.
        max_new_tokens: the most tokens generated per sequence. When `generate` is also given
            a dynamic `max_new_tokens` array, this static value is only the upper bound that
            sizes the output buffer (the engine passes a power-of-two bucket here, so calls
            with different limits in one bucket share one compiled program).
        sampling: greedy / temperature / top-k / top-p.
        eos_ids: token ids that end a sequence.
        impl: kernel implementation override (see `pallas_kernels.dispatch`); None = auto.
        logprobs: 0, or record each generated token's log-probability and the top `logprobs`
            alternatives under the output (verifier's) distribution (`DecodeState.logprobs`).

    The method's settings read through the config too (`dc.gamma` is `dc.method.gamma`).
    `DecodeConfig(mode="qspec", gamma=3, draft_precision="w4a4")` is the keyword shorthand:
    `mode` is a mode string (`qspec_jax.decoding.methods.mode_names()`) and the other keywords
    are the method's options under their earlier names.
    """

    method: DecodingMethod
    max_new_tokens: int
    sampling: SamplingConfig
    eos_ids: tuple[int, ...]
    impl: str | None
    logprobs: int

    def __init__(
        self,
        method: DecodingMethod | str | None = None,
        max_new_tokens: int = 64,
        sampling: SamplingConfig = GREEDY,
        eos_ids: tuple[int, ...] = (),
        impl: str | None = None,
        logprobs: int = 0,
        *,
        mode: str | None = None,
        **legacy,
    ):
        unknown = set(legacy) - set(_LEGACY)
        if unknown:
            raise TypeError(f"DecodeConfig got unexpected keyword(s) {', '.join(sorted(unknown))}")
        if mode is not None and method is not None:
            raise ValueError("give either method or mode, not both")
        if mode is not None or isinstance(method, str):
            opts = {_LEGACY[k]: v for k, v in legacy.items()}
            opts.setdefault("draft", "w4a4")
            method = from_mode(mode if mode is not None else method, **opts)
        else:
            if legacy:
                raise TypeError(
                    f"{', '.join(sorted(legacy))} belong to the method object; "
                    "pass them to its constructor"
                )
            method = resolve(method) if method is not None else AR("fp")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "max_new_tokens", int(max_new_tokens))
        object.__setattr__(self, "sampling", sampling)
        object.__setattr__(self, "eos_ids", tuple(int(t) for t in eos_ids))
        object.__setattr__(self, "impl", impl)
        if not isinstance(logprobs, int) or logprobs < 0:
            raise ValueError(f"logprobs must be a non-negative integer, got {logprobs!r}")
        object.__setattr__(self, "logprobs", logprobs)

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: the method's settings (gamma, tree, ...).
        if name.startswith("__") or name == "method":
            raise AttributeError(name)
        return getattr(self.method, name)

    @property
    def mode(self) -> str:
        return self.method.mode

    @property
    def tokens_per_step(self) -> int:
        """Cache positions one step may write: 1, gamma + 1 for QSpec, the tree for hspec."""
        return self.method.tokens_per_step

    @property
    def main_precision(self) -> str:
        """The precision of prefill and of the output distribution."""
        return self.method.main_precision

    @property
    def speculative(self) -> bool:
        return self.method.speculative

    @property
    def out_len(self) -> int:
        """Output buffer length: a speculative step may overshoot max_new_tokens."""
        return self.max_new_tokens + self.tokens_per_step

    def replace(self, **kw) -> DecodeConfig:
        """A copy with fields replaced (method, max_new_tokens, sampling, eos_ids, impl, ...)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.update(kw)
        return DecodeConfig(**fields)
