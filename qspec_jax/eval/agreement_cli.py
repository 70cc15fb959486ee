"""Agreement of each mode with the float model on held-out chat prompts (greedy and teacher-forced).

Task scores of SmolLM2-135M are near zero in every mode, so they cannot tell the quantization
modes apart; this measures how closely each mode follows the float model instead
(definitions in `qspec_jax/eval/agreement.py`): greedy prefix match length and positionwise
match fraction against fp's greedy tokens (N = --max-new-tokens positions, EOS handled as
documented there), and, along fp's own greedy continuation, mean KL(fp || mode) in nats and
top-1 agreement. It runs fp (float weights) and w4a16, w4a4, w4a8, qspec-w4a8, qspec-w4a4
(one int4 weight copy, --quant), and checks that QSpec's greedy tokens equal W4A16's on every
prompt (exit status 1, after writing the results, if not).

    python -m experiments.bench_agreement --quant gguf
    python -m experiments.bench_agreement --quant quarot-rtn --group-size 64
    python -m experiments.bench_agreement --quant gguf --limit 4 --max-new-tokens 16 --out /tmp/a.json

Prompts: experiments/data/agreement_prompts.json (68 held-out chat prompts, chat template
applied); a prompts file may also hold token-id lists (used as is, e.g. for --model tiny).
Writes --out (default experiments/results/quality/agreement_<quant>[_g<G>].json; rewritten
atomically after every stage, "complete": false until the end) and the same name .png, and
prints a markdown table. Rerunning the same command after a stop resumes: modes whose greedy
tokens the unfinished file holds are not generated again (the teacher-forced pass reruns). Bad arguments print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from qspec_jax.bench.common import DATA_DIR, REPO_ROOT, RESULTS_DIR, command_line, machine_info
from qspec_jax.bench.common import utc_iso as _utc
from qspec_jax.eval.cli_support import Parser as _Parser
from qspec_jax.eval.cli_support import UsageProblem, run_cli

ROOT = str(REPO_ROOT)
PROMPTS_FILE = os.path.join(DATA_DIR, "agreement_prompts.json")
OUT_DIR = os.path.join(RESULTS_DIR, "quality")
QUANT_CHOICES = ("gguf", "rtn", "gptq", "quarot-rtn", "quarot-gptq")
EXIT_QSPEC_MISMATCH = 1


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m experiments.bench_agreement",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="smollm2-135m (embedded), a model path, or a preset such as tiny",
    )
    p.add_argument(
        "--quant",
        choices=QUANT_CHOICES,
        default="gguf",
        help="int4 weights for every mode but fp (default gguf: the file's own Q4_1 codes)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=64,
        help="weight group size of the re-quantizing methods (not gguf)",
    )
    p.add_argument(
        "--modes",
        default="fp,w4a16,w4a4,w4a8,qspec-w4a8,qspec-w4a4",
        help="comma-separated; fp is required, and w4a16 with a qspec mode",
    )
    p.add_argument("--prompts", default=PROMPTS_FILE, help='JSON file {"prompts": [...]}')
    p.add_argument("--limit", type=int, default=None, help="first N prompts only")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--tf-batch-size", type=int, default=8, help="rows per teacher-forced forward")
    p.add_argument("--gamma", type=int, default=3, help="QSpec draft length")
    p.add_argument("--out", default=None, help="results JSON (the plot goes beside it)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument(
        "--replot",
        metavar="RESULTS",
        default=None,
        help="redraw the plot beside an existing results JSON and print its table (no model run)",
    )
    p.add_argument(
        "--no-quant-cache",
        action="store_true",
        help="quantize afresh and do not write the quantized-weights cache",
    )
    return p


def default_out(args) -> str:
    name = f"agreement_{args.quant}" + ("" if args.quant == "gguf" else f"_g{args.group_size}")
    if args.model != "smollm2-135m":
        base = os.path.basename(os.path.normpath(args.model))
        name = "".join(c if c.isalnum() or c in "._-" else "-" for c in base) + "_" + name
    return os.path.join(OUT_DIR, name + ".json")


def _check_args(args):
    """Everything checkable before loading a model; returns (modes, prompts, prompts sha, out)."""
    from qspec_jax.eval import EvalUsageError  # noqa: PLC0415
    from qspec_jax.eval.agreement import check_modes, load_prompts  # noqa: PLC0415

    try:
        modes = check_modes(m.strip() for m in args.modes.split(",") if m.strip())
    except EvalUsageError as e:
        raise UsageProblem(f"experiments.bench_agreement: --modes: {e}") from None
    for name in ("max_new_tokens", "batch_size", "tf_batch_size", "gamma"):
        if getattr(args, name) < 1:
            raise UsageProblem(
                f"experiments.bench_agreement: --{name.replace('_', '-')} must be a positive "
                f"integer, got {getattr(args, name)}"
            )
    if args.limit is not None and args.limit < 1:
        raise UsageProblem(
            f"experiments.bench_agreement: --limit must be a positive integer, got {args.limit}"
        )
    if args.group_size < 0:
        raise UsageProblem(
            f"experiments.bench_agreement: --group-size must be >= 0, got {args.group_size}"
        )
    prompts, sha = load_prompts(args.prompts)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    out = os.path.abspath(args.out or default_out(args))
    if not out.endswith(".json"):
        raise UsageProblem(
            f"experiments.bench_agreement: --out must name a .json file, got {args.out}"
        )
    d = os.path.dirname(out)
    try:
        os.makedirs(d, exist_ok=True)
        if not os.access(d, os.W_OK):
            raise PermissionError(13, "permission denied")
    except OSError as e:
        raise UsageProblem(
            f"experiments.bench_agreement: cannot write results to {d} ({e.strerror or e})"
        ) from None
    return modes, prompts, sha, out


def _load_engines(args):
    import qspec_jax  # noqa: PLC0415

    qc = not args.no_quant_cache
    fp = qspec_jax.load(args.model, progress=False, quant_cache=qc)
    q = qspec_jax.load(
        args.model, quant=args.quant, group_size=args.group_size, progress=False, quant_cache=qc
    )
    return fp, q


def _qconfig(engine):
    import dataclasses  # noqa: PLC0415

    q = getattr(engine, "qconfig", None)
    return dataclasses.asdict(q) if dataclasses.is_dataclass(q) else repr(q)


def _title(config: dict) -> str:
    q = config["quant"] + ("" if config.get("group_size") is None else f" g{config['group_size']}")
    return (
        f"{config['model']}, int4 weights {q}: {config['n_prompts']} prompts, "
        f"greedy up to {config['max_new_tokens']} tokens, compared with fp"
    )


def _partial_to_resume(out: str, config: dict) -> dict | None:
    """An unfinished results file at `out` written with the same configuration, else None.

    A finished file is simply replaced by the new run; an unfinished one with another
    configuration is an error (one sentence: delete it or pass the same options).
    """
    import json  # noqa: PLC0415

    if not os.path.exists(out):
        return None
    try:
        with open(out, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict) or old.get("complete") or "rows" not in old:
        return None
    if old.get("config") != json.loads(json.dumps(config)):
        raise UsageProblem(
            f"experiments.bench_agreement: {out} holds unfinished results of another "
            "configuration: pass the same options to resume, or delete it to start over"
        )
    return old


def replot(path: str) -> int:
    """Redraws the plot of a finished results file and prints its table."""
    import json  # noqa: PLC0415

    from qspec_jax.eval.agreement import markdown_table, plot_agreement  # noqa: PLC0415

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageProblem(
            f"experiments.bench_agreement: cannot read results {path} ({e})"
        ) from None
    if not isinstance(doc, dict) or not doc.get("complete") or "summary" not in doc:
        raise UsageProblem(
            f"experiments.bench_agreement: {path} is not a complete agreement results file"
        )
    png = path[:-5] + ".png" if path.endswith(".json") else path + ".png"
    plot_agreement(doc["summary"], png, _title(doc["config"]))
    print(markdown_table(doc["summary"], doc.get("generation")))
    print(f"\nplot: {png}")
    return 0


def run(args, load_engines=None, argv: list[str] | None = None) -> int:
    from qspec_jax.eval.agreement import (  # noqa: PLC0415
        markdown_table,
        plot_agreement,
        run_agreement,
    )
    from qspec_jax.eval.harness import write_json_atomic  # noqa: PLC0415

    if args.replot:
        return replot(args.replot)
    modes, prompts, sha, out = _check_args(args)
    argv = list(sys.argv[1:] if argv is None else argv)
    started = _utc()
    fp_engine, q_engine = (load_engines or _load_engines)(args)
    ids = fp_engine.encode(prompts, chat=True)  # strings: chat template; id lists: as given
    head = {
        "about": "Agreement of each mode with the float model; definitions in qspec_jax/eval/agreement.py.",
        "command": command_line("experiments.bench_agreement", argv),
        "config": {
            "model": args.model,
            "quant": args.quant,
            "group_size": None if args.quant == "gguf" else args.group_size,
            "qconfig": _qconfig(q_engine),
            "modes": modes,
            "prompts_file": os.path.relpath(os.path.abspath(args.prompts), ROOT),
            "prompts_sha256_16": sha,
            "n_prompts": len(prompts),
            "chat_template": True,
            "max_new_tokens": args.max_new_tokens,
            "positions_compared": args.max_new_tokens,
            "temperature": 0.0,
            "gamma": args.gamma,
            "batch_size": args.batch_size,
            "tf_batch_size": args.tf_batch_size,
            "eos_token_ids": list(fp_engine.config.eos_token_ids),
            "kl": "KL(fp || mode) in nats, float64 log-softmax on the host from float32 logits",
        },
        "machine": machine_info(),
        "load_info": {
            "fp": getattr(fp_engine, "load_info", {}),
            "int4": getattr(q_engine, "load_info", {}),
        },
        "started_utc": started,
        "prompts": prompts,
    }

    resume = _partial_to_resume(out, head["config"])
    if resume is not None:
        head["resumed_from"] = {
            "started_utc": resume.get("started_utc"),
            "stages_done": resume.get("stages_done"),
            "modes_done": sorted(resume.get("generation", {})),
        }
        print(f"resuming from the partial results in {out}", flush=True)

    def save(doc):
        write_json_atomic(
            out, {**head, **doc, "finished_utc": _utc() if doc.get("complete") else None}
        )

    doc = run_agreement(
        fp_engine,
        q_engine,
        ids,
        modes,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        tf_batch_size=args.tf_batch_size,
        gamma=args.gamma,
        log=lambda s: print(s, flush=True),
        checkpoint=save,
        resume=resume,
    )
    for r in doc["rows"]:
        for m, g in r["modes"].items():
            eng = fp_engine if m == "fp" else q_engine
            g["text"] = eng.decode(g["tokens"])
    bad = {m: c["mismatch"] for m, c in doc["qspec_equality"].items() if not c["all_equal"]}
    doc["ok"] = not bad
    save(doc)
    png = out[:-5] + ".png"
    if not args.no_plot:
        plot_agreement(doc["summary"], png, _title(head["config"]))
    print()
    print(markdown_table(doc["summary"], doc["generation"]))
    print(f"\nfp teacher-forced argmax == fp greedy tokens: {doc['fp_self_consistency']:.4f}")
    for m, c in doc["qspec_equality"].items():
        print(
            f"{m} tokens == w4a16 tokens on {sum(c['per_prompt'])}/{len(c['per_prompt'])} prompts"
        )
    print(f"\nresults: {out}" + ("" if args.no_plot else f"\nplot: {png}"))
    if bad:
        print(
            "experiments.bench_agreement: FAILED: greedy QSpec must equal greedy W4A16 on every "
            "prompt, but " + "; ".join(f"{m} differs on prompts {v}" for m, v in bad.items()),
            file=sys.stderr,
        )
        return EXIT_QSPEC_MISMATCH
    return 0


def main(argv: list[str] | None = None, load_engines=None) -> int:
    """Entry point; `load_engines(args) -> (fp_engine, int4_engine)` replaces model loading."""
    return run_cli(
        "experiments.bench_agreement",
        lambda: run(build_parser().parse_args(argv), load_engines, argv),
    )


if __name__ == "__main__":
    sys.exit(main())
