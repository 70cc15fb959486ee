"""Agreement with the float model: a quality metric that works where task scores are near zero.

On SmolLM2-135M the math and HumanEval scores of every mode are close to zero, so they cannot
separate the quantization modes. This module measures instead how closely each mode follows
the float ("fp") model on held-out chat prompts, in two ways:

**Greedy agreement.** fp and each mode generate greedily (temperature 0) up to N new tokens per
prompt. Each sequence is first cut after its first EOS token (the EOS itself is kept: choosing
to stop is part of the output) and to its first N tokens. Then, for the fp tokens ``r`` and the
mode's tokens ``h``:

* prefix match length = the number of leading positions where ``r`` and ``h`` hold the same
  token (``len(r)`` when the two are identical);
* positionwise match fraction = matches / counted, where counted = ``max(len(r), len(h))``
  (positions where at least one of the two is still generating) and matches = the positions
  ``i < min(len(r), len(h))`` with ``r[i] == h[i]``. A position where one sequence has already
  stopped (after its EOS) and the other still generates counts as a mismatch; positions where
  both have stopped are not counted (they carry no information, and counting them would make
  two early-stopping sequences look more alike than they are).

**Teacher-forced next-token comparison.** Along fp's own greedy continuation (prompt + fp
tokens, cut as above), one forward per precision gives logits at every position; the positions
compared are those that predict fp's generated tokens: ``P - 1 .. P + len(r) - 2`` for a prompt
of ``P`` tokens (the position predicting fp's EOS included). At each of them:

* ``KL(fp || mode) = sum_v p_fp(v) (log p_fp(v) - log p_mode(v))`` in nats, computed in float64
  on the host from the float32 logits (log-softmax in float64);
* top-1 agreement = ``argmax(mode logits) == argmax(fp logits)`` (ties go to the lowest id,
  numpy's ``argmax``).

QSpec's teacher-forced distribution is its W4A16 verifier's by construction, so the QSpec rows
take the W4A16 teacher-forced numbers (stated as ``tf_precision`` in the results); what is
checked for QSpec instead is that its greedy tokens equal W4A16's on every prompt
(`qspec_equality`), which must hold (exact greedy speculative decoding).

`run_agreement` runs all of it on two engines (float weights for fp, int4 weights for the
others); ``agreement_cli`` is the command line (``python -m experiments.bench_agreement``).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qspec_jax.eval.harness import EvalUsageError

__all__ = [
    "MODES",
    "QSpecMismatchError",
    "cut_at_eos",
    "even_batches",
    "greedy_agreement",
    "kl_divergence",
    "load_prompts",
    "log_softmax64",
    "markdown_table",
    "match_counts",
    "mode_spec",
    "plot_agreement",
    "prefix_match_length",
    "qspec_equality",
    "run_agreement",
    "summarize_agreement",
    "teacher_forced_compare",
    "teacher_forced_positions",
]

MODES = ("fp", "w4a16", "w4a4", "w4a8", "qspec-w4a8", "qspec-w4a4")


class QSpecMismatchError(RuntimeError):
    """Greedy QSpec produced tokens different from greedy W4A16 on some prompt (a bug)."""


# ---------------------------------------------------------------------------------------- modes
def mode_spec(mode: str) -> dict[str, Any]:
    """How a mode name of this metric maps to the engine.

    Args:
        mode: one of `MODES`: "fp", "w4a16", "w4a4", "w4a8", "qspec-w4a8" (QSpec drafting in
            W4A8) or "qspec-w4a4" (QSpec drafting in W4A4).

    Returns:
        ``{"generate_mode", "draft", "tf_precision", "weights"}``: the `Engine.generate` mode,
        the QSpec draft precision (None for the others), the precision whose teacher-forced
        logits stand for the mode ("w4a16" for QSpec: its verifier's distribution) and which
        weights serve it ("float" or "int4").

    Raises:
        EvalUsageError: an unknown mode name.
    """
    if mode not in MODES:
        raise EvalUsageError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    if mode.startswith("qspec-"):
        return {
            "generate_mode": "qspec",
            "draft": mode.split("-", 1)[1],
            "tf_precision": "w4a16",
            "weights": "int4",
        }
    return {
        "generate_mode": mode,
        "draft": None,
        "tf_precision": mode,
        "weights": "float" if mode == "fp" else "int4",
    }


# ---------------------------------------------------------------------------------------- greedy
def cut_at_eos(tokens: Sequence[int], eos_ids: Sequence[int], n_positions: int) -> list[int]:
    """The tokens up to and including the first EOS, then cut to the first `n_positions`.

    Args:
        tokens: generated token ids.
        eos_ids: the model's end-of-sequence ids.
        n_positions: the most positions compared (the generation budget N).

    Returns:
        A new list; a sequence without EOS is only cut to `n_positions`.
    """
    eos = set(int(e) for e in eos_ids)
    out: list[int] = []
    for t in tokens:
        out.append(int(t))
        if int(t) in eos:
            break
    return out[:n_positions]


def prefix_match_length(
    ref: Sequence[int], hyp: Sequence[int], eos_ids: Sequence[int], n_positions: int
) -> int:
    """Leading positions where `hyp` holds `ref`'s token, after `cut_at_eos` on both.

    Returns ``len(ref)`` (cut) when the two cut sequences are identical; 0 when the first tokens
    differ.
    """
    r = cut_at_eos(ref, eos_ids, n_positions)
    h = cut_at_eos(hyp, eos_ids, n_positions)
    k = 0
    while k < min(len(r), len(h)) and r[k] == h[k]:
        k += 1
    return k


def match_counts(
    ref: Sequence[int], hyp: Sequence[int], eos_ids: Sequence[int], n_positions: int
) -> tuple[int, int]:
    """(matches, counted) of the positionwise comparison defined in the module docstring.

    After `cut_at_eos` on both: counted = ``max(len(ref), len(hyp))``, matches = positions
    ``i < min(len(ref), len(hyp))`` with equal tokens. A position past one sequence's EOS but
    not the other's is a mismatch; positions past both are not counted.
    """
    r = cut_at_eos(ref, eos_ids, n_positions)
    h = cut_at_eos(hyp, eos_ids, n_positions)
    matches = sum(a == b for a, b in zip(r, h))
    return matches, max(len(r), len(h))


def greedy_agreement(
    ref: Sequence[int], hyp: Sequence[int], eos_ids: Sequence[int], n_positions: int
) -> dict[str, Any]:
    """All greedy-agreement numbers of one prompt.

    Args:
        ref: the fp model's greedy tokens.
        hyp: the mode's greedy tokens.
        eos_ids: the model's end-of-sequence ids.
        n_positions: the most positions compared (the generation budget N).

    Returns:
        ``{"prefix", "matches", "counted", "match_fraction", "identical", "ref_len",
        "hyp_len"}``: lengths after `cut_at_eos`; match_fraction is matches / counted
        (None when both sequences are empty).
    """
    r = cut_at_eos(ref, eos_ids, n_positions)
    h = cut_at_eos(hyp, eos_ids, n_positions)
    matches, counted = match_counts(r, h, eos_ids, n_positions)
    return {
        "prefix": prefix_match_length(r, h, eos_ids, n_positions),
        "matches": matches,
        "counted": counted,
        "match_fraction": matches / counted if counted else None,
        "identical": r == h,
        "ref_len": len(r),
        "hyp_len": len(h),
    }


# ---------------------------------------------------------------------------------------- teacher-forced
def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, computed in float64 (max-subtracted)."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats per row, from logits, computed in float64.

    Args:
        p_logits: [..., V] logits of the reference distribution p.
        q_logits: [..., V] logits of q, same shape.

    Returns:
        float64 [...]: ``sum_v p(v) (log p(v) - log q(v))``. Exactly 0 where the two rows are
        equal; rounding can leave values of order -1e-16 where they nearly are.
    """
    p_logits, q_logits = np.asarray(p_logits), np.asarray(q_logits)
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"logit shapes differ: {p_logits.shape} vs {q_logits.shape}")
    lp, lq = log_softmax64(p_logits), log_softmax64(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def teacher_forced_positions(prompt_len: int, n_generated: int) -> np.ndarray:
    """Indices into ``prompt + generated`` whose logits predict the generated tokens.

    Position t's logits predict token t + 1, so the generated tokens at ``P .. P + n - 1`` are
    predicted at ``P - 1 .. P + n - 2``.
    """
    if prompt_len < 1 or n_generated < 0:
        raise ValueError(
            f"need prompt_len >= 1 and n_generated >= 0, got {prompt_len}, {n_generated}"
        )
    return np.arange(prompt_len - 1, prompt_len - 1 + n_generated)


def teacher_forced_compare(ref_logits: np.ndarray, hyp_logits: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position KL(ref || hyp) (nats, float64) and top-1 agreement of two [n, V] logit rows.

    Returns:
        ``{"kl": float64 [n], "top1": bool [n]}`` with top1 = argmax(hyp) == argmax(ref).
    """
    ref_logits, hyp_logits = np.asarray(ref_logits), np.asarray(hyp_logits)
    return {
        "kl": kl_divergence(ref_logits, hyp_logits),
        "top1": np.argmax(hyp_logits, axis=-1) == np.argmax(ref_logits, axis=-1),
    }


def _tf_rows(engine, precision, seqs, length, batch_size, pad_id):
    """Yields (row index, float32 [len, V] logits) for each sequence, `batch_size` rows a call.

    Rows are right-padded to `length` (causal attention: padding after a row's end does not
    change its logits) and the last batch is filled with copies of its first row, so every call
    has the same [batch_size, length] shape and the engine compiles one program per precision.
    """
    for s in range(0, len(seqs), batch_size):
        chunk = seqs[s : s + batch_size]
        ids = np.full((batch_size, length), pad_id, np.int32)
        for i in range(batch_size):
            row = chunk[i] if i < len(chunk) else chunk[0]
            ids[i, : len(row)] = row
        logits = engine.logits(ids, precision)
        for i in range(len(chunk)):
            yield s + i, np.asarray(logits[i])


# ---------------------------------------------------------------------------------------- prompts
def load_prompts(path: str) -> tuple[list[str | list[int]], str]:
    """Prompts from a JSON file ``{"prompts": [...]}``: strings, or token-id lists (used as is).

    Returns:
        (prompts, sha256 of the file's bytes, first 16 hex digits).

    Raises:
        EvalUsageError: a missing or unreadable file, or a malformed prompt list (one sentence).
    """
    import hashlib  # noqa: PLC0415

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise EvalUsageError(f"cannot read the prompts file {path} ({e.strerror or e})") from None
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EvalUsageError(f"the prompts file {path} is not valid JSON") from None
    prompts = doc.get("prompts") if isinstance(doc, dict) else None
    if not isinstance(prompts, list) or not prompts:
        raise EvalUsageError(f'the prompts file {path} needs a non-empty list under "prompts"')
    for i, p in enumerate(prompts):
        ok = (isinstance(p, str) and p.strip()) or (
            isinstance(p, list)
            and p
            and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        )
        if not ok:
            raise EvalUsageError(
                f"prompt {i} of {path} must be a non-empty string or a non-empty list of token ids"
            )
    return prompts, hashlib.sha256(data).hexdigest()[:16]


# ---------------------------------------------------------------------------------------- driver
def even_batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``ceil(n / batch_size)`` contiguous (start, end) ranges whose sizes differ by at most one.

    The engine pads a batch to the next power of two and compiles one program per padded size,
    so 68 prompts at batch_size 32 run as 23 + 23 + 22 (one program) rather than 32 + 32 + 4
    (two programs, the second compiled for 4 rows).
    """
    k = -(-n // batch_size)
    return [(n * i // k, n * (i + 1) // k) for i in range(k)]


def qspec_equality(tokens: dict[str, list[list[int]]]) -> dict[str, dict[str, Any]]:
    """Per QSpec mode: a boolean per prompt, True when its tokens equal W4A16's exactly.

    Args:
        tokens: generated tokens per mode name (must hold "w4a16" when a QSpec mode is present).

    Returns:
        ``{mode: {"per_prompt": [bool, ...], "all_equal": bool, "mismatch": [prompt index, ...]}}``
        for each "qspec-*" mode in `tokens`.
    """
    out = {}
    for m, toks in tokens.items():
        if not m.startswith("qspec-"):
            continue
        ref = tokens["w4a16"]
        same = [list(a) == list(b) for a, b in zip(toks, ref)]
        out[m] = {
            "per_prompt": same,
            "all_equal": all(same),
            "mismatch": [i for i, s in enumerate(same) if not s],
        }
    return out


def _quantiles(v: Sequence[float]) -> dict[str, float | None]:
    if not len(v):
        return {"mean": None, "median": None, "p90": None, "max": None}
    a = np.asarray(v, np.float64)
    return {
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "p90": float(np.quantile(a, 0.9)),
        "max": float(a.max()),
    }


def summarize_agreement(
    rows: list[dict], modes: Sequence[str], tf_pooled: dict | None = None
) -> dict:
    """Per-mode summary of per-prompt rows (see `run_agreement` for the row fields).

    Args:
        rows: one dict per prompt with ``rows[i]["modes"][mode]`` holding the greedy numbers
            and, once computed, the teacher-forced sums.
        modes: the modes to summarize, in order.
        tf_pooled: per mode, the pooled per-position KL values (float64 array) for quantiles.

    Returns:
        ``{mode: {...}}``: prefix length mean / median / min, prompts identical to fp, match
        fraction (mean of per-prompt fractions, and pooled = all matches / all counted
        positions), teacher-forced top-1 agreement and KL (pooled over positions: every
        position weighs the same) and the mean of the per-prompt mean KL.
    """
    out: dict[str, dict] = {}
    for m in modes:
        recs = [r["modes"][m] for r in rows if m in r["modes"]]
        if not recs:
            continue
        prefixes = [g["prefix"] for g in recs]
        fracs = [g["match_fraction"] for g in recs if g["match_fraction"] is not None]
        s: dict[str, Any] = {
            "prompts": len(recs),
            "identical_to_fp": sum(g["identical"] for g in recs),
            "prefix_mean": statistics.fmean(prefixes),
            "prefix_median": statistics.median(prefixes),
            "prefix_min": min(prefixes),
            "match_fraction_mean": statistics.fmean(fracs) if fracs else None,
            "match_fraction_pooled": (
                sum(g["matches"] for g in recs) / sum(g["counted"] for g in recs)
                if sum(g["counted"] for g in recs)
                else None
            ),
            "mean_len": statistics.fmean(g["hyp_len"] for g in recs),
        }
        if all("tf_positions" in g for g in recs):
            n = sum(g["tf_positions"] for g in recs)
            s["tf_precision"] = recs[0]["tf_precision"]
            s["tf_positions"] = n
            s["tf_top1"] = sum(g["tf_top1_matches"] for g in recs) / n if n else None
            s["kl_mean"] = sum(g["tf_kl_sum"] for g in recs) / n if n else None
            per_prompt = [g["tf_kl_sum"] / g["tf_positions"] for g in recs if g["tf_positions"]]
            s["kl_prompt_mean"] = statistics.fmean(per_prompt) if per_prompt else None
            s["kl_max"] = max(g["tf_kl_max"] for g in recs)
            if tf_pooled is not None and m in tf_pooled:
                q = _quantiles(tf_pooled[m])
                s["kl_median"], s["kl_p90"] = q["median"], q["p90"]
        out[m] = s
    return out


def check_modes(modes) -> list[str]:
    """The modes to run, deduplicated in order; raises EvalUsageError for a bad set.

    Every mode must be known (`mode_spec`), fp must be among them (the reference), and a QSpec
    mode needs w4a16 (its tokens are checked against W4A16's).
    """
    modes = list(dict.fromkeys(modes))
    for m in modes:
        mode_spec(m)
    if "fp" not in modes:
        raise EvalUsageError("modes must include fp (the reference every mode is compared with)")
    if any(m.startswith("qspec-") for m in modes) and "w4a16" not in modes:
        raise EvalUsageError(
            "a QSpec mode needs w4a16 in the modes (its tokens must equal W4A16's)"
        )
    return modes


def run_agreement(
    fp_engine: Any,
    q_engine: Any,
    prompt_ids: Sequence[Sequence[int]],
    modes: Sequence[str] = MODES,
    *,
    max_new_tokens: int = 128,
    batch_size: int = 32,
    tf_batch_size: int = 8,
    gamma: int = 3,
    log: Callable[[str], None] | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    resume: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Greedy and teacher-forced agreement of each mode with fp, and QSpec's equality check.

    Args:
        fp_engine: an engine with float weights (serves "fp" generation and logits).
        q_engine: an engine with int4 weights (serves every other mode).
        prompt_ids: token ids per prompt (chat template already applied).
        modes: names from `MODES`; must include "fp", and "w4a16" when a QSpec mode is asked.
        max_new_tokens: greedy generation budget N, also the number of positions compared.
        batch_size: the most prompts per `generate` call; the prompts are split into
            `even_batches`, the same for every mode.
        tf_batch_size: rows per teacher-forced `logits` call.
        gamma: QSpec draft length.
        log: called with one line of progress per stage (e.g. print).
        checkpoint: called with the document so far after every stage (to save partial results).
        resume: a partial document an earlier call with the same arguments handed to
            `checkpoint`: modes whose greedy tokens it holds for every prompt are not generated
            again (their recorded tokens and generation stats are reused, marked
            ``"resumed": True``); the teacher-forced pass always runs.

    Returns:
        ``{"rows", "summary", "generation", "qspec_equality", "fp_self_consistency",
        "stages_done", "complete"}``. The stages run in this order, `checkpoint` after each:
        greedy fp and the non-QSpec modes, the teacher-forced pass, greedy QSpec modes. rows: per prompt the prompt length, and per mode its tokens, the
        `greedy_agreement` fields and the teacher-forced sums (tf_positions, tf_kl_sum,
        tf_kl_max, tf_top1_matches, tf_first_top1_miss). generation: per mode the engine's
        stats (tokens, wall seconds, compile seconds, QSpec acceptance). fp_self_consistency:
        fraction of fp's teacher-forced argmax equal to its own greedy tokens (decode path vs
        one full forward; below 1 only by near-ties).

    Raises:
        EvalUsageError: bad modes or arguments.
    """
    modes = check_modes(modes)
    for name, v in (
        ("max_new_tokens", max_new_tokens),
        ("batch_size", batch_size),
        ("tf_batch_size", tf_batch_size),
        ("gamma", gamma),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise EvalUsageError(f"{name} must be a positive integer, got {v!r}")
    if not prompt_ids:
        raise EvalUsageError("no prompts given")
    log = log or (lambda s: None)
    eos = tuple(fp_engine.config.eos_token_ids)
    n_pos = max_new_tokens
    rows = [{"index": i, "prompt_len": len(p), "modes": {}} for i, p in enumerate(prompt_ids)]
    doc: dict[str, Any] = {"rows": rows, "generation": {}, "complete": False}
    tokens: dict[str, list[list[int]]] = {}

    # Stages, each followed by `checkpoint`: greedy fp and the non-QSpec modes; the
    # teacher-forced pass; then the QSpec modes (their teacher-forced numbers are W4A16's), so a
    # run stopped for time keeps every number it can.
    batches = even_batches(len(prompt_ids), batch_size)
    order = ["fp"] + [m for m in modes if m != "fp"]
    plain = [m for m in order if not m.startswith("qspec-")]
    spec_modes = [m for m in order if m.startswith("qspec-")]
    doc["stages_done"] = []

    done = _resumable(resume, len(prompt_ids))

    def greedy(m: str) -> None:
        if m in done:
            toks, stats = done[m]
            tokens[m] = toks
            doc["generation"][m] = {**stats, "resumed": True}
            spec = mode_spec(m)
            for r, t in zip(rows, toks):
                g = greedy_agreement(tokens["fp"][r["index"]], t, eos, max_new_tokens)
                r["modes"][m] = {"tokens": t, "tf_precision": spec["tf_precision"], **g}
            log(f"{m}: {sum(len(t) for t in toks)} tokens taken from the partial results")
            return
        _generate_mode(
            m,
            fp_engine,
            q_engine,
            prompt_ids,
            batches,
            max_new_tokens,
            gamma,
            rows,
            tokens,
            doc,
            eos,
            log,
        )

    def finish_stage(name: str, kl_by_mode: dict | None = None) -> None:
        doc["stages_done"].append(name)
        doc["summary"] = summarize_agreement(rows, [x for x in order if x in tokens], kl_by_mode)
        if checkpoint:
            checkpoint(doc)

    for m in plain:
        greedy(m)
        finish_stage(f"greedy {m}")

    tf, kl_pooled = _teacher_forced(
        fp_engine, q_engine, prompt_ids, tokens["fp"], eos, n_pos, plain, tf_batch_size, doc, log
    )
    for r in rows:
        for m in plain:
            r["modes"][m].update(tf[mode_spec(m)["tf_precision"]][r["index"]])
    kl_by_mode = {m: kl_pooled[mode_spec(m)["tf_precision"]] for m in plain}
    finish_stage("teacher-forced", kl_by_mode)

    for m in spec_modes:
        greedy(m)
        for r in rows:
            r["modes"][m].update(tf["w4a16"][r["index"]])
        kl_by_mode[m] = kl_pooled["w4a16"]
        doc["qspec_equality"] = qspec_equality({x: tokens[x] for x in order if x in tokens})
        finish_stage(f"greedy {m}", kl_by_mode)
    doc["qspec_equality"] = qspec_equality({x: tokens[x] for x in order if x in tokens})
    doc["complete"] = True
    doc["stages_done"].append("complete")
    if checkpoint:
        checkpoint(doc)
    return doc


def _resumable(resume: dict | None, n: int) -> dict[str, tuple[list[list[int]], dict]]:
    """Per mode, (tokens, generation stats) a partial document holds for all `n` prompts."""
    if not resume:
        return {}
    rows, gen = resume.get("rows") or [], resume.get("generation") or {}
    out = {}
    if len(rows) != n:
        return out
    for m in gen:
        if m in MODES and all(m in r.get("modes", {}) for r in rows):
            toks = [[int(t) for t in r["modes"][m]["tokens"]] for r in rows]
            out[m] = (toks, {k: v for k, v in gen[m].items() if k != "resumed"})
    return out


def _generate_mode(
    m, fp_engine, q_engine, prompt_ids, batches, max_new_tokens, gamma, rows, tokens, doc, eos, log
):
    """Greedy generation of one mode over all batches; fills rows, tokens and doc["generation"]."""
    spec = mode_spec(m)
    eng = fp_engine if spec["weights"] == "float" else q_engine
    extra = {"draft": spec["draft"], "gamma": gamma} if spec["draft"] else {}
    toks: list[list[int]] = []
    keys = (
        "tokens_generated",
        "wall_s",
        "compile_s",
        "draft_tokens_proposed",
        "draft_tokens_accepted",
        "verify_steps",
    )
    stats: dict[str, Any] = {k: 0 for k in keys}
    stats["calls"] = 0
    t0 = time.perf_counter()
    for s, e in batches:
        res = eng.generate(
            [list(p) for p in prompt_ids[s:e]],
            mode=spec["generate_mode"],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            **extra,
        )
        toks.extend([int(t) for t in r] for r in res.tokens)
        stats["calls"] += 1
        for k in keys:
            v = res.stats.get(k)
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                stats[k] += v
    stats["total_s"] = time.perf_counter() - t0
    stats["tokens_per_s"] = stats["tokens_generated"] / stats["wall_s"] if stats["wall_s"] else None
    if spec["draft"]:
        p, a = stats["draft_tokens_proposed"], stats["draft_tokens_accepted"]
        stats.update(draft=spec["draft"], gamma=gamma, acceptance_rate=a / p if p else None)
    else:
        for k in keys[3:]:
            del stats[k]
    doc["generation"][m] = stats
    tokens[m] = toks
    for r, t in zip(rows, toks):
        g = greedy_agreement(tokens["fp"][r["index"]], t, eos, max_new_tokens)
        r["modes"][m] = {"tokens": t, "tf_precision": spec["tf_precision"], **g}
    log(
        f"{m}: {stats['tokens_generated']} tokens in {stats['total_s']:.0f} s "
        f"(compile {stats['compile_s']:.0f} s)"
    )


def _teacher_forced(
    fp_engine, q_engine, prompt_ids, fp_tokens, eos, n_pos, modes, tf_batch_size, doc, log
):
    """The teacher-forced pass along fp's greedy tokens, for the precisions `modes` need.

    Returns:
        (per precision a list of per-prompt dicts with tf_positions, tf_kl_sum, tf_kl_max,
        tf_top1_matches, tf_first_top1_miss; per precision the pooled per-position KL values).
        Also sets doc["fp_self_consistency"], doc["teacher_forced_s"], ["teacher_forced_length"].
    """
    t0 = time.perf_counter()
    n = len(prompt_ids)
    ref_cut = [cut_at_eos(fp_tokens[i], eos, n_pos) for i in range(n)]
    seqs = [list(prompt_ids[i]) + ref_cut[i] for i in range(n)]
    length = -(-max(len(s) for s in seqs) // 16) * 16
    pad = int(getattr(fp_engine.config, "pad_token_id", 0) or 0)
    precisions = list(dict.fromkeys(["fp"] + [mode_spec(m)["tf_precision"] for m in modes]))
    positions = [teacher_forced_positions(len(prompt_ids[i]), len(ref_cut[i])) for i in range(n)]
    ref_rows: dict[int, np.ndarray] = {}
    self_matches = self_total = 0
    pooled: dict[str, list[np.ndarray]] = {p: [] for p in precisions}
    per_prec: dict[str, list[dict]] = {p: [{} for _ in range(n)] for p in precisions}
    for s in range(0, n, tf_batch_size):
        idx = list(range(s, min(s + tf_batch_size, n)))
        sub = [seqs[i] for i in idx]
        for p in precisions:  # "fp" first: the reference rows
            eng = fp_engine if p == "fp" else q_engine
            for j, full in _tf_rows(eng, p, sub, length, tf_batch_size, pad):
                i = idx[j]
                lg = full[positions[i]]
                if p == "fp":
                    ref_rows[i] = lg
                    self_matches += int((np.argmax(lg, axis=-1) == np.asarray(ref_cut[i])).sum())
                    self_total += len(ref_cut[i])
                c = teacher_forced_compare(ref_rows[i], lg)
                pooled[p].append(c["kl"])
                miss = np.flatnonzero(~c["top1"])
                per_prec[p][i] = {
                    "tf_positions": int(len(c["kl"])),
                    "tf_kl_sum": float(c["kl"].sum()),
                    "tf_kl_max": float(c["kl"].max()) if len(c["kl"]) else 0.0,
                    "tf_top1_matches": int(c["top1"].sum()),
                    "tf_first_top1_miss": int(miss[0]) if len(miss) else None,
                }
        for i in idx:
            ref_rows.pop(i, None)
        log(f"teacher-forced: {idx[-1] + 1}/{n} prompts ({time.perf_counter() - t0:.0f} s)")
    doc["teacher_forced_s"] = time.perf_counter() - t0
    doc["teacher_forced_length"] = length
    doc["fp_self_consistency"] = self_matches / self_total if self_total else None
    return per_prec, {p: np.concatenate(v) for p, v in pooled.items()}


# ---------------------------------------------------------------------------------------- reporting
def _f(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def markdown_table(summary: dict, generation: dict | None = None) -> str:
    """A markdown table, one row per mode, of `summarize_agreement`'s numbers (for the README)."""
    head = [
        "mode",
        "identical to fp",
        "prefix mean",
        "prefix median",
        "match fraction",
        "tf top-1",
        "KL mean (nats)",
        "KL median",
        "tf precision",
    ]
    if generation:
        head += ["tokens", "acceptance"]
    align = ["---"] + ["---:"] * 7 + ["---"] + (["---:", "---:"] if generation else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for m, s in summary.items():
        row = [
            m,
            f"{s['identical_to_fp']}/{s['prompts']}",
            _f(s["prefix_mean"], ".1f"),
            _f(float(s["prefix_median"]), ".1f"),
            _f(s["match_fraction_mean"]),
            _f(s.get("tf_top1")),
            _f(s.get("kl_mean"), ".3g"),
            _f(s.get("kl_median"), ".3g"),
            s.get("tf_precision", "-"),
        ]
        if generation:
            g = generation.get(m, {})
            row += [_f(g.get("tokens_generated")), _f(g.get("acceptance_rate"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_agreement(summary: dict, png_path: str, title: str = "") -> None:
    """Two panels per mode: agreement with fp and mean KL(fp || mode).

    Left: greedy match fraction, greedy prefix mean divided by fp's (fp's mean length after
    `cut_at_eos`, the most any mode can reach), teacher-forced top-1 and the share of prompts whose greedy output is identical
    to fp's. Right: mean KL in nats on a log axis; a mode with KL exactly 0 is marked "0" on the
    axis floor. QSpec's teacher-forced numbers are its verifier's (W4A16), as the tick labels say.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    modes = list(summary)
    labels = [
        m
        + (
            f"\n(tf = {summary[m]['tf_precision']})"
            if summary[m].get("tf_precision", m) != m
            else ""
        )
        for m in modes
    ]
    x = np.arange(len(modes))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(5 + 1.7 * len(modes), 4.8))
    ref = (
        summary["fp"] if "fp" in summary else max(summary.values(), key=lambda r: r["prefix_mean"])
    )
    n_max = ref["prefix_mean"] or 1.0
    series = [
        ("greedy match fraction", [summary[m]["match_fraction_mean"] for m in modes], "#1f77b4"),
        (
            f"greedy prefix mean / {n_max:.1f} (fp's mean length)",
            [summary[m]["prefix_mean"] / n_max for m in modes],
            "#9467bd",
        ),
        ("teacher-forced top-1", [summary[m].get("tf_top1") for m in modes], "#ff7f0e"),
        (
            "prompts identical to fp",
            [summary[m]["identical_to_fp"] / summary[m]["prompts"] for m in modes],
            "#2ca02c",
        ),
    ]
    w = 0.8 / len(series)
    for k, (label, vals, color) in enumerate(series):
        vals = [0.0 if v is None else v for v in vals]
        bars = a1.bar(x + (k - (len(series) - 1) / 2) * w, vals, w, label=label, color=color)
        for b, v in zip(bars, vals):
            a1.text(
                b.get_x() + b.get_width() / 2,
                v + 0.01,
                f"{v:.2f}",
                ha="center",
                va="bottom",
                fontsize=6,
                rotation=90,
            )
    a1.set_xticks(x, labels, fontsize=7)
    a1.set_ylim(0, 1.15)
    a1.set_ylabel("agreement with fp")
    a1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    kl = [summary[m].get("kl_mean") or 0.0 for m in modes]
    pos = [v for v in kl if v > 0]
    floor = min(pos) / 10 if pos else 1e-6
    bars = a2.bar(x, [max(v, floor) if v > 0 else 0 for v in kl], color="#d62728", bottom=0)
    a2.set_yscale("log")
    a2.set_ylim(floor, (max(pos) if pos else 1.0) * 5)
    for b, v in zip(bars, kl):
        y = v if v > 0 else floor
        a2.text(
            b.get_x() + b.get_width() / 2,
            y * 1.1,
            f"{v:.3g}" if v > 0 else "0 (exact)",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    a2.set_xticks(x, labels, fontsize=7)
    a2.set_ylabel("mean KL(fp || mode), nats per token (log)")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(png_path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
