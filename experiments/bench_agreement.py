"""Agreement of each mode with the float model on held-out chat prompts.

    python -m experiments.bench_agreement --help

The command line is `qspec_jax.eval.agreement_cli` (options, outputs and exit statuses are documented
there); the tests import it from the package.
"""

import sys

from qspec_jax.eval.agreement_cli import main

if __name__ == "__main__":
    sys.exit(main())
