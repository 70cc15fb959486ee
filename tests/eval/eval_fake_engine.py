"""A fake engine with the methods the evaluation harness uses (fast and deterministic).

It knows the answers: for math prompts it writes a short solution ending "The answer is N." (right
in w4a16 / qspec / fp, wrong on some items in w4a4 / w4a8); for HumanEval prompts the canonical
solution (or a wrong body in w4a4 on odd items) followed by an extra function that the stop
sequences must cut off. QSpec output equals W4A16 output exactly (unless `qspec_differs`).
Each item's output depends only on its prompt and mode, never on the batch, and the stats are
sums of per-item numbers, so batching, resuming and sharding do not change any summary field.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from qspec_jax.engine import GenerationResult
from qspec_jax.eval.humaneval import load_humaneval
from qspec_jax.eval.math import load_problems

VOCAB = 61  # for encode / logits (perplexity)


@dataclasses.dataclass(frozen=True)
class FakeQuant:
    method: str = "fake-rtn"
    group_size: int = 128


class EngineCrash(RuntimeError):
    pass


class FakeEngine:
    def __init__(self, modes=("w4a16", "w4a4", "w4a8", "qspec"), fail_after=None,
                 qspec_differs=(), source="fake-model", logits_kind="bigram"):
        self.modes = tuple(modes)
        self.source = source
        self.qconfig = FakeQuant()
        self.tokenizer = None
        self.fail_after = fail_after
        self.qspec_differs = set(qspec_differs)
        self.logits_kind = logits_kind
        self.generate_calls: list[tuple[str, int]] = []
        self.many_calls: list[tuple[str, int, int]] = []
        self.logits_calls: list[tuple[str, tuple]] = []
        self._math = {p["question"]: p for p in load_problems()}
        self._he = {p["prompt"]: p for p in load_humaneval()}
        rng = np.random.default_rng(0)
        self._table = rng.normal(size=(VOCAB, VOCAB)).astype(np.float32)

    # ------------------------------------------------------------------ helpers
    def _respond(self, prompt: str, mode: str, chat: bool) -> str:
        if prompt in self._he:
            p = self._he[prompt]
            idx = int(p["task_id"].split("/")[1])
            body = p["canonical_solution"]
            if mode in ("w4a4",) and idx % 2 == 1:
                body = "    return None\n"
            return body + "\n\ndef unrelated_helper():\n    return 42\n"
        for p in self._he.values():  # chat style: the prompt is embedded in the request
            if p["prompt"] in prompt and chat:
                return ("Here is the function:\n\n```python\n" + p["prompt"] + p["canonical_solution"]
                        + "```\n\nIt passes the examples.")
        for q, p in self._math.items():
            if q in prompt:
                n = int(p["id"].split("-")[1])
                ans = p["answer"]
                if (mode == "w4a4" and n % 3 != 0) or (mode == "w4a8" and n % 5 == 0):
                    ans = ans + 1
                if mode == "qspec" and p["id"] in self.qspec_differs:
                    return f"Step 1: I am not sure. The answer is {ans}."
                return f"Step 1: work it out: 2 + 2 = 4. Step 2: combine. The answer is {ans}."
        return "I do not know."

    @staticmethod
    def _text_tokens(text: str) -> list[int]:
        return [ord(c) for c in text]

    # ------------------------------------------------------------------ engine API
    def encode(self, prompts, chat=True):
        out = []
        for p in prompts:
            ids = [ord(c) % VOCAB for c in p] if isinstance(p, str) else [int(t) for t in p]
            out.append(([1, 2] if chat and isinstance(p, str) else []) + ids)
        return out

    def generate(self, prompts, mode="fp", max_new_tokens=64, temperature=0.0, seed=0, chat=True,
                 *, gamma=3, **kw):
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} is not available")
        if self.fail_after is not None and len(self.generate_calls) >= self.fail_after:
            raise EngineCrash("simulated crash in the middle of an evaluation")
        self.generate_calls.append((mode, len(prompts)))
        texts, tokens, reasons = [], [], []
        proposed = accepted = verify = 0
        for p in prompts:
            full = self._text_tokens(self._respond(p, mode, chat))
            toks = full[:max_new_tokens]
            tokens.append(toks)
            texts.append("".join(chr(t) for t in toks))
            reasons.append("stop" if len(full) <= max_new_tokens else "length")
            steps = math.ceil(max(len(toks) - 1, 0) / (gamma + 1))
            verify += steps
            proposed += gamma * steps
            accepted += (2 * gamma * steps) // 3
        total = sum(len(t) for t in tokens)
        wall = 0.001 * total if mode != "qspec" else 0.0006 * total
        stats = {"mode": mode, "batch": len(prompts), "tokens_generated": total, "wall_s": wall,
                 "tokens_per_s": total / wall if wall else float("nan"), "compile_s": 0.0}
        if mode == "qspec":
            stats.update(gamma=gamma, draft_tokens_proposed=proposed, draft_tokens_accepted=accepted,
                         acceptance_rate=accepted / proposed if proposed else float("nan"),
                         mean_tokens_per_step=(total - len(prompts)) / verify if verify else float("nan"),
                         verify_steps=verify)
        return GenerationResult(texts=texts, tokens=tokens, finish_reasons=reasons, stats=stats)

    def generate_many(self, prompts, method="fp", max_new_tokens=64, temperature=0.0, seed=0,
                      chat=True, *, batch_size=8, mode=None, gamma=3, **kw):
        """Continuous batching: per item the same output as `generate` (as the real engine's)."""
        self.many_calls.append((mode or method, len(prompts), batch_size))
        return self.generate(prompts, mode or method, max_new_tokens, temperature, seed, chat,
                             gamma=gamma, **kw)

    def logits(self, token_ids, precision="fp"):
        ids = np.asarray(token_ids, np.int32)
        self.logits_calls.append((precision, ids.shape))
        if self.logits_kind == "uniform":
            return np.zeros(ids.shape + (VOCAB,), np.float32)
        out = self._table[ids]  # [b, t, V] a bigram model
        if precision == "w4a4":
            out = out + 0.5 * np.cos(np.arange(VOCAB, dtype=np.float32) * 1.7)
        return out.astype(np.float32)
