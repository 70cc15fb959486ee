"""Evaluation driver: generate per mode in batches, score, record, resume, summarize, merge shards.

`run_eval` evaluates one task ("math", "humaneval", "perplexity") in several modes on one engine:

* Items are the task's problems (or text chunks for perplexity) in file order, cut to `limit`,
  then to this process's shard (`shard_items`, contiguous).
* For each mode, items not yet done are generated `batch_size` at a time with
  ``engine.generate`` (greedy by default), or with ``continuous=True`` `CONTINUOUS_GROUP` x
  `batch_size` at a time with ``engine.generate_many(batch_size=batch_size)`` (continuous
  batching: a finished row takes the next item; at temperature 0 every item's tokens are
  those of the static run), scored, and appended to the PARTIAL file
  (``<results stem>.partial.jsonl``) as one item line per item followed by one batch line (wall
  time, tokens, draft statistics), written in one ``write`` and fsync'ed. Perplexity items call
  ``engine.logits`` instead (QSpec's teacher-forced distribution is its W4A16 verifier's, so
  "qspec" is scored at precision "w4a16").
* A rerun with the same configuration RESUMES: items already in the partial file for that mode are
  skipped (a batch counts only once its batch line is there; a torn last line is cut off). A
  partial file written with a different configuration raises EvalUsageError (a ValueError)
  saying what differs.
  Modes are not part of the configuration, so modes can be added to an earlier run.
* At the end the summary is written ATOMICALLY to `results_path` (temp file in the same
  directory, fsync, ``os.replace``): per mode the score (accuracy, pass@1 or perplexity),
  token counts, tokens/s (generation wall time, compile excluded) and for QSpec the acceptance
  statistics; then "qspec_equals_w4a16_tokens" (fraction of items whose QSpec tokens equal the
  W4A16 tokens; 1.0 is required at temperature 0) and "recovered" =
  (score_qspec - score_w4a4) / (score_w4a16 - score_w4a4) when all three modes ran and the
  denominator is not zero. The partial file stays as the per-item record.

Multi-host: run with ``process_index=i, process_count=k`` on each host (same options), then
`merge_results` over the k result files gives the summary of the whole set (equal to a single
run's, tests/eval/test_harness.py). At temperature > 0 the sampled text depends on how items are
batched (one PRNG seed per batch), so only greedy runs are batch-, resume- and shard-invariant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

from qspec_jax.atomic_io import write_atomic
from qspec_jax.decoding.methods import mode_names

__all__ = [
    "ALL_MODES",
    "TASKS",
    "EvalItem",
    "EvalUsageError",
    "check_eval_args",
    "load_partial",
    "load_results",
    "merge_results",
    "partial_path",
    "run_eval",
    "shard_items",
    "summarize",
    "task_items",
    "write_json_atomic",
]

TASKS = ("math", "humaneval", "perplexity")
# Every mode the decoding-method registry names (qspec_jax.decoding.methods): a new method is an
# evaluation row with no change here.
ALL_MODES = mode_names()
FORMAT = 1
SCORE_NAMES = {"math": "accuracy", "humaneval": "pass@1", "perplexity": "perplexity"}


class EvalUsageError(ValueError):
    """A bad argument or an unusable results file; the message is one sentence saying what to do."""


@dataclasses.dataclass(frozen=True)
class EvalItem:
    """One unit of evaluation.

    Attributes:
        id: stable identifier ("math-001", "HumanEval/0", "chunk-000").
        index: position in the task's full item list (orders results).
        prompt: a string (chat template applied when `chat`) or token ids (perplexity chunks).
        chat: whether the engine applies the chat template.
        data: what scoring needs (the answer, the HumanEval problem).
    """

    id: str
    index: int
    prompt: Any
    chat: bool
    data: dict[str, Any]


# ---------------------------------------------------------------------------------------- items
def shard_items(items: Sequence[Any], process_index: int, process_count: int) -> list[Any]:
    """This process's contiguous share of `items`: ``items[n*i//k : n*(i+1)//k]``.

    Deterministic, order-preserving, sizes differ by at most one, and the shards of
    i = 0..k-1 concatenate to `items`.
    """
    if not (isinstance(process_count, int) and process_count >= 1):
        raise EvalUsageError(f"process_count must be a positive integer, got {process_count!r}")
    if not (isinstance(process_index, int) and 0 <= process_index < process_count):
        raise EvalUsageError(
            f"process_index must be an integer in [0, {process_count}), got {process_index!r}"
        )
    n = len(items)
    return list(
        items[n * process_index // process_count : n * (process_index + 1) // process_count]
    )


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def task_items(
    task: str, engine: Any = None, *, humaneval_style: str = "completion", seq_len: int = 256
) -> tuple[list[EvalItem], str]:
    """All items of a task in order, and a short hash of the data they come from."""
    if task == "math":
        from qspec_jax.eval import math as m  # noqa: PLC0415

        probs = m.load_problems()
        items = [
            EvalItem(p["id"], i, m.format_prompt(p["question"]), True, {"answer": p["answer"]})
            for i, p in enumerate(probs)
        ]
        return items, _sha(json.dumps(probs, sort_keys=True) + m.PROMPT_TEMPLATE)
    if task == "humaneval":
        from qspec_jax.eval import humaneval as he  # noqa: PLC0415

        probs = he.load_humaneval()
        items = []
        for i, p in enumerate(probs):
            prompt, chat = he.build_prompt(p, humaneval_style)
            items.append(EvalItem(p["task_id"], i, prompt, chat, {"problem": p}))
        return items, _sha(json.dumps(probs, sort_keys=True) + he.CHAT_TEMPLATE)
    if task == "perplexity":
        from qspec_jax.eval import perplexity as pp  # noqa: PLC0415

        chunks = pp.heldout_chunks(engine, seq_len)
        items = [EvalItem(f"chunk-{i:03d}", i, c, False, {}) for i, c in enumerate(chunks)]
        return items, _sha(pp.HELDOUT_TEXT + json.dumps(chunks))
    raise EvalUsageError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")


# ---------------------------------------------------------------------------------------- checks
def _parse_modes(modes: str | Iterable[str]) -> list[str]:
    if isinstance(modes, str):
        modes = [m.strip() for m in modes.split(",")]
    try:
        out = []
        for m in modes:
            if m and m not in out:
                out.append(m)
    except TypeError:
        raise EvalUsageError(
            f"modes must be a list of mode names or a comma-separated string, got {modes!r}"
        ) from None
    return out


def _check_writable(results_path: Any) -> str:
    if not isinstance(results_path, (str, os.PathLike)) or not os.fspath(results_path):
        raise EvalUsageError(f"results_path must be a file path, got {results_path!r}")
    path = os.path.abspath(os.fspath(results_path))
    if os.path.isdir(path):
        raise EvalUsageError(
            f"results path {path} is a directory: give a file name such as {path}/results.json"
        )
    d = os.path.dirname(path)
    try:
        os.makedirs(d, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".qspec_write_test_"):
            pass
    except OSError as e:
        raise EvalUsageError(
            f"cannot write results to {path} ({e.strerror or e}): choose a writable directory"
        ) from None
    return path


def check_eval_args(
    task: str,
    modes: str | Iterable[str],
    limit: int | None,
    max_new_tokens: int,
    gamma: int,
    results_path: Any,
    engine_modes: Sequence[str] | None = None,
    *,
    batch_size: int = 8,
    temperature: float = 0.0,
    process_index: int = 0,
    process_count: int = 1,
    humaneval_style: str = "completion",
    seq_len: int = 256,
) -> tuple[list[str], str]:
    """Validates run_eval's arguments (before any model work); returns (modes, absolute path).

    Raises:
        EvalUsageError (a ValueError): one sentence naming the bad argument and what to give instead.
    """
    if task not in TASKS:
        raise EvalUsageError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    mode_list = _parse_modes(modes)
    if not mode_list:
        raise EvalUsageError(f"no modes given: choose one or more of {', '.join(ALL_MODES)}")
    for m in mode_list:
        if m not in ALL_MODES:
            raise EvalUsageError(f"unknown mode {m!r}: choose from {', '.join(ALL_MODES)}")
        if engine_modes is not None and m not in engine_modes:
            raise EvalUsageError(
                f"mode {m!r} is not available on this engine (it offers {', '.join(engine_modes)}): "
                "load int4 weights (a quant method) for the int4 modes, float weights for fp"
            )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EvalUsageError(
            f"limit must be a positive integer (or None for all items), got {limit!r}"
        )
    for name, v in (
        ("max_new_tokens", max_new_tokens),
        ("gamma", gamma),
        ("batch_size", batch_size),
        ("seq_len", seq_len),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise EvalUsageError(f"{name} must be a positive integer, got {v!r}")
    if seq_len < 2:
        raise EvalUsageError(f"seq_len must be at least 2, got {seq_len}")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise EvalUsageError(f"temperature must be a number >= 0, got {temperature!r}")
    shard_items([], process_index, process_count)  # validates the shard
    from qspec_jax.eval.humaneval import PROMPT_STYLES  # noqa: PLC0415

    if humaneval_style not in PROMPT_STYLES:
        raise EvalUsageError(
            f"unknown HumanEval prompt style {humaneval_style!r}: choose one of {', '.join(PROMPT_STYLES)}"
        )
    return mode_list, _check_writable(results_path)


# ---------------------------------------------------------------------------------------- files
def partial_path(results_path: str) -> str:
    """The per-item record next to the summary: ``x.json`` -> ``x.partial.jsonl``."""
    base = results_path[:-5] if results_path.endswith(".json") else results_path
    return base + ".partial.jsonl"


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN / inf -> None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item"):  # numpy scalar
        return _clean(obj.item())
    return obj


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes JSON so that `path` holds either its old content or the complete new content
    (`qspec_jax.atomic_io.write_atomic`: a temporary file, fsync, rename; on any failure `path`
    is untouched). NaN and infinities are refused (strict JSON; `_clean` maps them to null)."""
    write_atomic(path, json.dumps(_clean(obj), indent=1, allow_nan=False) + "\n")


def load_partial(path: str, repair: bool = False) -> tuple[dict | None, list[dict], list[dict]]:
    """(config, items, batches) from a partial file; (None, [], []) when it does not exist.

    Item lines count only when a later batch line of the same mode lists their id (a batch is
    written in one piece; a crash can only tear its end). A last line without a newline is a torn
    write: ignored, and cut off the file when `repair`.
    """
    if not os.path.exists(path):
        return None, [], []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    lines = data[:end].decode("utf-8").splitlines()
    if not lines:
        return None, [], []
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        head = None
    if not isinstance(head, dict) or head.get("type") != "config" or head.get("format") != FORMAT:
        raise EvalUsageError(
            f"{path} is not a qspec-jax partial results file: move it away or delete it"
        )
    items: dict[tuple[str, str], dict] = {}
    batches: list[dict] = []
    pending: dict[tuple[str, str], dict] = {}
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise EvalUsageError(
                f"{path} line {n} is not valid JSON: the file is damaged, delete it to start over"
            ) from None
        if rec.get("type") == "item":
            pending[(rec["mode"], rec["id"])] = rec
        elif rec.get("type") == "batch":
            for i in rec["ids"]:
                key = (rec["mode"], i)
                if key in pending:
                    items[key] = pending.pop(key)
            batches.append(rec)
    return head["config"], list(items.values()), batches


def load_results(path: str) -> tuple[dict, list[dict], list[dict], list[str] | None]:
    """(config, items, batches, modes) from a final summary JSON or a partial JSONL file."""
    if not os.path.isfile(path):
        raise EvalUsageError(f"results file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        first = f.read(1)
    if path.endswith(".jsonl"):
        cfg, items, batches = load_partial(path)
        if cfg is None:
            raise EvalUsageError(f"{path} holds no results")
        return cfg, items, batches, None
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f) if first else None
        except json.JSONDecodeError:
            obj = None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or "items" not in obj:
        raise EvalUsageError(f"{path} is not a qspec-jax results file")
    return obj["config"], obj["items"], obj["batches"], obj["modes"]


class _PartialWriter:
    def __init__(self, path: str, config: dict):
        self.path = path
        cfg, _, _ = load_partial(path, repair=True)
        if cfg is None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"type": "config", "format": FORMAT, "config": config}) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def append(self, records: list[dict]) -> None:
        text = "".join(json.dumps(_clean(r), allow_nan=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _config_mismatch(path: str, old: dict, new: dict) -> None:
    if old == new:
        return
    keys = sorted(set(old) | set(new))
    diffs = [k for k in keys if old.get(k) != new.get(k)]
    k = diffs[0]
    more = f" and {len(diffs) - 1} more" if len(diffs) > 1 else ""
    raise EvalUsageError(
        f"the partial results file {path} was written with a different configuration "
        f"({k}: {json.dumps(old.get(k))} there, {json.dumps(new.get(k))} now{more}): "
        "pass the same options to resume, or delete the file to start over"
    )


# ---------------------------------------------------------------------------------------- scoring
def _generation_records(task, mode, batch, res, humaneval_style, exec_timeout, exec_workers):
    texts, tokens, reasons = res.texts, res.tokens, res.finish_reasons
    recs = []
    if task == "math":
        from qspec_jax.eval.math import score_math  # noqa: PLC0415

        for it, text in zip(batch, texts):
            pred, ok = score_math(text, it.data["answer"])
            recs.append({"answer": it.data["answer"], "pred": pred, "correct": ok})
    else:
        from qspec_jax.eval import humaneval as he  # noqa: PLC0415

        probs = [it.data["problem"] for it in batch]
        comps = [he.completion_from_generation(t, p, humaneval_style) for t, p in zip(texts, probs)]
        checks = he.evaluate_completions(probs, comps, timeout=exec_timeout, workers=exec_workers)
        for c, chk in zip(comps, checks):
            recs.append({"completion": c, "result": chk["result"], "correct": bool(chk["passed"])})
    out = []
    for it, rec, text, toks, why in zip(batch, recs, texts, tokens, reasons):
        out.append(
            {
                "type": "item",
                "mode": mode,
                "id": it.id,
                "index": it.index,
                "tokens": [int(t) for t in toks],
                "num_tokens": len(toks),
                "finish_reason": why,
                "text": text,
                **rec,
            }
        )
    return out


# items per continuous-batching call, in units of batch_size (one resume unit each)
CONTINUOUS_GROUP = 8

_BATCH_STATS = (
    "tokens_generated",
    "wall_s",
    "draft_tokens_proposed",
    "draft_tokens_accepted",
    "verify_steps",
    "mean_tokens_per_step",
    "compile_s",
)


def _run_generation_batch(
    engine,
    task,
    mode,
    batch,
    *,
    max_new_tokens,
    gamma,
    temperature,
    seed,
    humaneval_style,
    exec_timeout,
    exec_workers,
    draft="w4a8",
    rows=0,
):
    extra = {"draft": draft} if mode == "qspec" else {}  # the evaluation's QSpec draft
    # gamma is a shared option: methods that draft no sequence ignore it
    kw = dict(
        mode=mode,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        chat=batch[0].chat,
        gamma=gamma,
        **extra,
    )
    prompts = [it.prompt for it in batch]
    # rows > 0: continuous batching over the group, `rows` sequences in flight
    res = (
        engine.generate_many(prompts, batch_size=rows, **kw)
        if rows
        else engine.generate(prompts, **kw)
    )
    recs = _generation_records(task, mode, batch, res, humaneval_style, exec_timeout, exec_workers)
    stats = {k: res.stats[k] for k in _BATCH_STATS if k in res.stats}
    stats.setdefault("tokens_generated", sum(len(t) for t in res.tokens))
    batch_rec = {
        "type": "batch",
        "mode": mode,
        "ids": [it.id for it in batch],
        "n": len(batch),
        **stats,
    }
    return recs + [batch_rec]


def _run_perplexity_batch(engine, mode, batch):
    from qspec_jax.eval.perplexity import chunk_nll  # noqa: PLC0415

    precision = "w4a16" if mode == "qspec" else mode
    t0 = time.perf_counter()
    res = chunk_nll(engine, precision, [it.prompt for it in batch], batch_size=len(batch))
    wall = time.perf_counter() - t0
    recs = [
        {
            "type": "item",
            "mode": mode,
            "id": it.id,
            "index": it.index,
            "precision": precision,
            "nll": nll,
            "num_tokens": k,
            "correct": None,
        }
        for it, (nll, k) in zip(batch, res)
    ]
    recs.append(
        {
            "type": "batch",
            "mode": mode,
            "ids": [it.id for it in batch],
            "n": len(batch),
            "tokens_generated": sum(k for _, k in res),
            "wall_s": wall,
        }
    )
    return recs


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarize(
    config: dict, modes: Sequence[str], items: Sequence[dict], batches: Sequence[dict]
) -> dict:
    """The summary (per-mode results and cross-mode comparisons) of recorded items and batches."""
    task = config["task"]
    results: dict[str, dict] = {}
    by_mode: dict[str, dict[str, dict]] = {m: {} for m in modes}
    for r in items:
        if r["mode"] in by_mode:
            by_mode[r["mode"]][r["id"]] = r
    for m in modes:
        recs = sorted(by_mode[m].values(), key=lambda r: r["index"])
        bs = [b for b in batches if b["mode"] == m]
        n = len(recs)
        toks = sum(r["num_tokens"] for r in recs)
        wall = sum(float(b.get("wall_s") or 0.0) for b in bs)
        row: dict[str, Any] = {"n_items": n, "score_name": SCORE_NAMES[task]}
        if task == "perplexity":
            nll = sum(r["nll"] for r in recs)
            row["score"] = math.exp(nll / toks) if toks else None
            row["tokens_scored"] = toks
            row["precision"] = recs[0]["precision"] if recs else ("w4a16" if m == "qspec" else m)
        else:
            correct = sum(bool(r["correct"]) for r in recs)
            row["n_correct"] = correct
            row["score"] = correct / n if n else None
            row["tokens_generated"] = toks
            row["mean_new_tokens"] = toks / n if n else None
            row["truncated"] = sum(r["finish_reason"] == "length" for r in recs)
        row["wall_s"] = wall
        row["tokens_per_s"] = _ratio(toks, wall)
        if m == "qspec" and task != "perplexity":
            prop = sum(int(b.get("draft_tokens_proposed", 0)) for b in bs)
            acc = sum(int(b.get("draft_tokens_accepted", 0)) for b in bs)
            row["draft_tokens_proposed"] = prop
            row["draft_tokens_accepted"] = acc
            row["acceptance_rate"] = _ratio(acc, prop)
            if bs and all(b.get("verify_steps") for b in bs):
                committed = sum(b["tokens_generated"] - b["n"] for b in bs)
                row["mean_tokens_per_step"] = committed / sum(b["verify_steps"] for b in bs)
            else:
                w = [(b.get("mean_tokens_per_step"), b.get("tokens_generated", 0)) for b in bs]
                w = [(v, t) for v, t in w if v is not None and math.isfinite(v)]
                row["mean_tokens_per_step"] = (
                    sum(v * t for v, t in w) / sum(t for _, t in w)
                    if w and sum(t for _, t in w)
                    else None
                )
            row["gamma"] = config.get("gamma")
        results[m] = row

    comp: dict[str, Any] = {
        "qspec_equals_w4a16_tokens": None,
        "recovered": None,
        "qspec_speedup_vs_w4a16": None,
    }
    if "qspec" in results and "w4a16" in results and task != "perplexity":
        common = sorted(
            set(by_mode["qspec"]) & set(by_mode["w4a16"]),
            key=lambda i: by_mode["qspec"][i]["index"],
        )
        same = [i for i in common if by_mode["qspec"][i]["tokens"] == by_mode["w4a16"][i]["tokens"]]
        comp["qspec_equals_w4a16_tokens"] = len(same) / len(common) if common else None
        comp["qspec_equals_w4a16_items"] = f"{len(same)}/{len(common)}"
        comp["qspec_mismatch_ids"] = [i for i in common if i not in set(same)][:20]
        # greedy QSpec must reproduce W4A16 exactly; at temperature > 0 equality is not expected
        comp["qspec_greedy_equality_violated"] = (
            bool(common) and len(same) < len(common)
            if float(config.get("temperature", 0)) == 0
            else None
        )
        tq, tw = results["qspec"]["tokens_per_s"], results["w4a16"]["tokens_per_s"]
        comp["qspec_speedup_vs_w4a16"] = _ratio(tq, tw) if tq is not None and tw else None
    if all(m in results for m in ("qspec", "w4a16", "w4a4")):
        sq, s16, s4 = (results[m]["score"] for m in ("qspec", "w4a16", "w4a4"))
        if None not in (sq, s16, s4) and s16 != s4:
            comp["recovered"] = (sq - s4) / (s16 - s4)
    comp["higher_is_better"] = task != "perplexity"
    ordered = sorted(
        (r for m in modes for r in by_mode[m].values()),
        key=lambda r: (list(modes).index(r["mode"]), r["index"]),
    )
    return {
        "format": FORMAT,
        "config": config,
        "modes": list(modes),
        "results": results,
        "comparisons": comp,
        "items": ordered,
        "batches": [b for b in batches if b["mode"] in by_mode],
    }


# ---------------------------------------------------------------------------------------- driver
def _engine_info(engine: Any) -> dict:
    q = getattr(engine, "qconfig", None)
    if dataclasses.is_dataclass(q) and not isinstance(q, type):
        q = dataclasses.asdict(q)
    elif q is not None:
        q = repr(q)
    return {"source": str(getattr(engine, "source", "") or type(engine).__name__), "quant": q}


def run_eval(
    engine: Any,
    task: str,
    modes: str | Sequence[str],
    limit: int | None,
    max_new_tokens: int,
    gamma: int,
    results_path: str,
    progress: bool = True,
    *,
    batch_size: int = 8,
    temperature: float = 0.0,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    humaneval_style: str = "completion",
    exec_timeout: float = 10.0,
    exec_workers: int = 2,
    seq_len: int = 256,
    draft: str = "w4a8",
    continuous: bool = False,
) -> dict:
    """Evaluates `engine` on `task` in each of `modes`; returns the summary written to `results_path`.

    Args:
        engine: a `qspec_jax.Engine` (or an object with the same generate / logits / encode / modes).
        task: "math" (the project's word problems, accuracy), "humaneval" (pass@1) or
            "perplexity" (held-out text; lower is better).
        modes: mode names ("fp", "w4a16", "w4a4", "w4a8", "qspec"), a list or "a,b,c".
        limit: evaluate only the first `limit` items (None = all), before sharding.
        max_new_tokens: generation budget per item (math, humaneval).
        gamma: QSpec draft length.
        results_path: the summary JSON file; the per-item partial file goes beside it.
        progress: tqdm progress bars on stderr.
        batch_size: prompts per engine.generate call (chunks per engine.logits call).
        temperature, seed: sampling (0 = greedy, the default).
        process_index, process_count: evaluate only this process's shard (see `merge_results`).
        humaneval_style: "completion" (raw prompt, chat=False) or "chat".
        exec_timeout, exec_workers: HumanEval check time limit (s) and parallel subprocesses.
        seq_len: perplexity chunk length.
        draft: QSpec's draft precision ("w4a4" or "w4a8"), recorded in the configuration.
        continuous: generate with continuous batching (`engine.generate_many`, `batch_size`
            rows busy) over groups of `CONTINUOUS_GROUP` x `batch_size` items, each group one
            resume unit; greedy items are the same as without it. Recorded in the
            configuration when on (sampled draws depend on it).

    Raises:
        EvalUsageError (a ValueError): bad arguments (one sentence), or a partial file written
            with another configuration.
    """
    mode_list, path = check_eval_args(
        task,
        modes,
        limit,
        max_new_tokens,
        gamma,
        results_path,
        getattr(engine, "modes", None),
        batch_size=batch_size,
        temperature=temperature,
        process_index=process_index,
        process_count=process_count,
        humaneval_style=humaneval_style,
        seq_len=seq_len,
    )
    if draft not in ("w4a4", "w4a8"):
        raise EvalUsageError(f"unknown draft precision {draft!r}: choose w4a4 or w4a8")
    all_items, data_hash = task_items(
        task, engine, humaneval_style=humaneval_style, seq_len=seq_len
    )
    selected = all_items[:limit] if limit is not None else all_items
    mine = shard_items(selected, process_index, process_count)

    config: dict[str, Any] = {
        "task": task,
        "limit": limit,
        "n_selected": len(selected),
        "data": data_hash,
        "temperature": float(temperature),
        "seed": int(seed),
        "engine": _engine_info(engine),
        "process_index": process_index,
        "process_count": process_count,
    }
    if task == "perplexity":
        config["seq_len"] = seq_len
    else:
        # draft recorded for every generation run, so a resume may add qspec to the modes;
        # files written before the option existed (their QSpec drafted in w4a4) do not resume
        config.update(max_new_tokens=max_new_tokens, gamma=gamma, draft=draft)
    if task == "humaneval":
        config.update(humaneval_style=humaneval_style, exec_timeout=float(exec_timeout))
    rows = 0
    if continuous and task != "perplexity":
        if not hasattr(engine, "generate_many"):
            raise EvalUsageError("continuous batching needs an engine with generate_many")
        config["continuous"] = True
        rows = batch_size
    config = json.loads(json.dumps(config))

    ppath = partial_path(path)
    old_cfg, _, _ = load_partial(ppath)
    if old_cfg is not None:
        _config_mismatch(ppath, old_cfg, config)
    writer = _PartialWriter(ppath, config)
    _, done_items, _ = load_partial(ppath)
    done = {(r["mode"], r["id"]) for r in done_items}

    from tqdm import tqdm  # noqa: PLC0415

    for mode in mode_list:
        todo = [it for it in mine if (mode, it.id) not in done]
        bar = tqdm(
            total=len(mine),
            initial=len(mine) - len(todo),
            desc=f"{task} {mode}",
            unit="item",
            disable=not progress,
            leave=True,
        )
        try:
            step = batch_size * CONTINUOUS_GROUP if rows else batch_size
            for s in range(0, len(todo), step):
                batch = todo[s : s + step]
                if task == "perplexity":
                    recs = _run_perplexity_batch(engine, mode, batch)
                else:
                    recs = _run_generation_batch(
                        engine,
                        task,
                        mode,
                        batch,
                        max_new_tokens=max_new_tokens,
                        gamma=gamma,
                        temperature=temperature,
                        seed=seed,
                        humaneval_style=humaneval_style,
                        exec_timeout=exec_timeout,
                        exec_workers=exec_workers,
                        draft=draft,
                        rows=rows,
                    )
                writer.append(recs)
                bar.update(len(batch))
        finally:
            bar.close()

    _, items, batches = load_partial(ppath)
    ids = {it.id for it in mine}
    items = [r for r in items if r["id"] in ids]
    summary = summarize(config, mode_list, items, batches)
    write_json_atomic(path, summary)
    return summary


def merge_results(paths: Sequence[str], results_path: str | None = None) -> dict:
    """The summary of several shards' results (final JSON or partial JSONL files), as one run.

    All shards must share one configuration apart from process_index, cover process indices
    0..k-1 exactly once and hold no item twice. With `results_path` the merged summary is also
    written there (atomically).
    """
    if not paths:
        raise EvalUsageError("no result files given to merge")
    loaded = [(p, *load_results(p)) for p in paths]
    base = dict(loaded[0][1])
    base.pop("process_index", None)
    seen: dict[int, str] = {}
    modes: list[str] = []
    items: list[dict] = []
    batches: list[dict] = []
    keys: set[tuple[str, str]] = set()
    for p, cfg, its, bs, ms in loaded:
        c = dict(cfg)
        idx = c.pop("process_index", None)
        _config_mismatch(p, base, c)
        if idx in seen:
            raise EvalUsageError(
                f"{p} and {seen[idx]} are the same shard (process_index {idx}): merge distinct shards"
            )
        seen[idx] = p
        for m in ms or sorted({r["mode"] for r in its}, key=ALL_MODES.index):
            if m not in modes:
                modes.append(m)
        for r in its:
            k = (r["mode"], r["id"])
            if k in keys:
                raise EvalUsageError(
                    f"item {r['id']} in mode {r['mode']} appears in more than one shard"
                )
            keys.add(k)
            items.append(r)
        batches.extend(bs)
    count = base.get("process_count", 1)
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        raise EvalUsageError(
            f"shards {missing} of {count} are missing: merge the results of every process"
        )
    config = {**base, "process_index": None}
    summary = summarize(config, modes, items, batches)
    if results_path is not None:
        write_json_atomic(_check_writable(results_path), summary)
    return summary
