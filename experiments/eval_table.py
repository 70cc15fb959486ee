"""The evaluation table in one command (perplexity, math, HumanEval; every mode and draft).

    python -m experiments.eval_table --help

The command line is `qspec_jax.eval.table_cli` (options, outputs and exit statuses are documented
there); the tests import it from the package.
"""

import sys

from qspec_jax.eval.table_cli import main

if __name__ == "__main__":
    sys.exit(main())
