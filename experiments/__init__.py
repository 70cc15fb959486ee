"""Benchmarks, evaluations and probes of qspec-jax, run from the repository root as modules:

    python -m experiments.bench_qspec --batches 1
    python -m experiments.manifest          # rewrite experiments/results/MANIFEST.md

Each script is a command line over library code: the shared helpers (run metadata, atomic JSON,
timing, prompt lists) are `qspec_jax.bench.common`, the evaluation commands live in
`qspec_jax.eval` (`run_cli`, `table_cli`, `agreement_cli`) and the GPU check in
`qspec_jax.bench.gpu_check`. Results go to experiments/results/ (listed in its MANIFEST.md).
"""
