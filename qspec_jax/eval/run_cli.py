"""Evaluate qspec-jax modes on a task: math word problems, HumanEval pass@1 or held-out perplexity.

Examples (small subsets by default: this runs at tens of tokens/s on a 2-core CPU):

    python -m experiments.run_eval --task math --modes w4a16,qspec --limit 2 --max-new-tokens 64
    python -m experiments.run_eval --task math --modes w4a16,w4a4,qspec --limit 16
    python -m experiments.run_eval --task humaneval --modes w4a16,w4a4,qspec --limit 8
    python -m experiments.run_eval --task perplexity --modes w4a16,w4a4,w4a8
    python -m experiments.run_eval --task math --modes fp --quant none --limit 8

Writes <out>/<name>.json (the summary, written atomically), <out>/<name>.partial.jsonl (every
item as it completes: rerunning the same command resumes), and <out>/<name>.png (score per mode,
QSpec acceptance annotated), then prints a markdown table for the README.

Multi-host: give each process --process-index i --process-count k, then
    python -m experiments.run_eval --merge out/a.json out/b.json ... --out out --name merged

Bad arguments print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from qspec_jax.eval.cli_support import Parser as _Parser
from qspec_jax.eval.cli_support import UsageProblem, run_cli

QUANT_CHOICES = ("none", "gguf", "rtn", "gptq", "quarot-rtn", "quarot-gptq")
DEFAULT_LIMIT = {"math": 8, "humaneval": 4, "perplexity": None}
DEFAULT_MAX_NEW = {"math": 256, "humaneval": 256, "perplexity": 1}


def _limit(s: str) -> int | str:
    if s.lower() == "all":
        return "all"
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m experiments.run_eval", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("math", "humaneval", "perplexity"), default="math")
    p.add_argument("--modes", default=None,
                   help="comma-separated: fp, w4a16, w4a4, w4a8, qspec (default w4a16,w4a4,qspec; fp with --quant none)")
    p.add_argument("--limit", type=_limit, default=None,
                   help="first N items, or 'all' (default: math 8, humaneval 4, perplexity all)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded) or a model path")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="gguf",
                   help="default gguf: the embedded model's own Q4_1 codes (W4A16 = shipped model)")
    p.add_argument("--group-size", type=int, default=128, help="weight group size (0 = per channel)")
    p.add_argument("--gamma", type=int, default=3, help="QSpec draft length")
    p.add_argument("--draft", choices=("w4a4", "w4a8"), default="w4a8", help="QSpec draft precision")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 256 (math, humaneval)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--continuous", action="store_true",
                   help="continuous batching (generate_many): --batch-size rows stay busy")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--humaneval-style", choices=("completion", "chat"), default="completion")
    p.add_argument("--exec-timeout", type=float, default=10.0, help="HumanEval check time limit (s)")
    p.add_argument("--seq-len", type=int, default=256, help="perplexity chunk length")
    p.add_argument("--process-index", type=int, default=0)
    p.add_argument("--process-count", type=int, default=1)
    p.add_argument("--out", default="experiments/results/eval", help="results directory")
    p.add_argument("--name", default=None, help="results file stem (default from task/model/quant/limit)")
    p.add_argument("--merge", nargs="+", metavar="RESULTS", default=None,
                   help="merge these shard result files instead of evaluating")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def default_name(args) -> str:
    model = args.model if args.model == "smollm2-135m" else os.path.basename(os.path.normpath(args.model))
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", model) or "model"
    parts = [args.task, model, args.quant]
    if args.quant not in ("none", "gguf"):
        parts.append(f"g{args.group_size}")
    parts.append("all" if args.limit is None else f"n{args.limit}")
    if args.process_count > 1:
        parts.append(f"shard{args.process_index}of{args.process_count}")
    return "_".join(parts)


def _load_engine(args):
    import qspec_jax  # noqa: PLC0415

    quant = None if args.quant == "none" else args.quant
    return qspec_jax.load(args.model, quant=quant, group_size=args.group_size,
                          progress=not args.no_progress)


def _report(summary: dict, json_path: str, plot: bool) -> None:
    from qspec_jax.eval import markdown_table, plot_summary  # noqa: PLC0415

    png = json_path[:-5] + ".png" if json_path.endswith(".json") else json_path + ".png"
    if plot:
        plot_summary(summary, png)
    print()
    print(markdown_table(summary))
    print()
    print(f"results: {json_path}" + (f"\nplot: {png}" if plot else ""))


def run(args, load_engine=None) -> int:
    from qspec_jax.eval import check_eval_args, merge_results, run_eval  # noqa: PLC0415

    if args.merge:
        path = os.path.join(args.out, (args.name or "merged") + ".json")
        summary = merge_results(args.merge, path)
        _report(summary, path, not args.no_plot)
        return 0

    if args.limit is None:
        args.limit = DEFAULT_LIMIT[args.task]
    elif args.limit == "all":
        args.limit = None
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_MAX_NEW[args.task]
    if args.modes is None:
        args.modes = "fp" if args.quant == "none" else "w4a16,w4a4,qspec"
    if args.group_size < 0:
        raise UsageProblem(f"experiments.run_eval: --group-size must be >= 0, got {args.group_size}")
    path = os.path.join(args.out, (args.name or default_name(args)) + ".json")
    modes, path = check_eval_args(
        args.task, args.modes, args.limit, args.max_new_tokens, args.gamma, path,
        batch_size=args.batch_size, temperature=args.temperature, process_index=args.process_index,
        process_count=args.process_count, humaneval_style=args.humaneval_style, seq_len=args.seq_len,
    )
    wants_fp = "fp" in modes
    if wants_fp and args.quant != "none":
        raise UsageProblem("experiments.run_eval: mode fp needs float weights: pass --quant none (and evaluate int4 modes in another run)")
    if not wants_fp and args.quant == "none":
        raise UsageProblem(f"experiments.run_eval: modes {','.join(modes)} need int4 weights: pass --quant (e.g. quarot-rtn)")
    if args.exec_timeout <= 0:
        raise UsageProblem(f"experiments.run_eval: --exec-timeout must be > 0, got {args.exec_timeout}")

    engine = (load_engine or _load_engine)(args)
    summary = run_eval(
        engine, args.task, modes, args.limit, args.max_new_tokens, args.gamma, path,
        progress=not args.no_progress, batch_size=args.batch_size, temperature=args.temperature,
        seed=args.seed, process_index=args.process_index, process_count=args.process_count,
        humaneval_style=args.humaneval_style, exec_timeout=args.exec_timeout, seq_len=args.seq_len,
        draft=args.draft, continuous=args.continuous,
    )
    _report(summary, path, not args.no_plot)
    return 0


def main(argv: list[str] | None = None, load_engine=None) -> int:
    """Entry point; `load_engine(args) -> engine` replaces model loading (tests use a fake engine)."""
    return run_cli(
        "experiments.run_eval", lambda: run(build_parser().parse_args(argv), load_engine), resumable=True
    )


if __name__ == "__main__":
    sys.exit(main())
