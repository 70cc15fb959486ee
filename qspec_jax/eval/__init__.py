"""Evaluation harness: math word problems, HumanEval pass@1 and held-out perplexity per mode.

    from qspec_jax.eval import run_eval
    summary = run_eval(engine, "math", ["w4a16", "w4a4", "qspec"], limit=8, max_new_tokens=256,
                       gamma=3, results_path="experiments/results/eval/math.json")

See `harness` for resuming, atomic writes and sharding; `math`, `humaneval` and `perplexity` for
the tasks; `report` for the markdown table and plot. `run_cli` is the command line
(`python -m experiments.run_eval`), `table_cli` the evaluation table's, `agreement_cli` the
agreement benchmark's.
"""

from qspec_jax.eval.harness import (
    ALL_MODES,
    TASKS,
    EvalUsageError,
    check_eval_args,
    load_results,
    merge_results,
    partial_path,
    run_eval,
    shard_items,
    summarize,
    write_json_atomic,
)
from qspec_jax.eval.report import markdown_table, plot_summary

__all__ = [
    "ALL_MODES",
    "TASKS",
    "EvalUsageError",
    "check_eval_args",
    "load_results",
    "markdown_table",
    "merge_results",
    "partial_path",
    "plot_summary",
    "run_eval",
    "shard_items",
    "summarize",
    "write_json_atomic",
]
