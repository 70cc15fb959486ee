"""Evaluate qspec-jax modes on a task (math, HumanEval pass@1, held-out perplexity).

    python -m experiments.run_eval --help

The command line is `qspec_jax.eval.run_cli` (options, outputs and exit statuses are documented
there); the tests import it from the package.
"""

import sys

from qspec_jax.eval.run_cli import main

if __name__ == "__main__":
    sys.exit(main())
