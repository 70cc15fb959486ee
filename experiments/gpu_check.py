"""The GPU check (`make gpu-check`): on a lent CUDA GPU, every step measured and recorded; without
one, the dry part (env, CUDA lowering of every Pallas kernel, the report writers).

    python -m experiments.gpu_check [--out DIR] [--steps env,ceilings,...] [--budget-s 540] [--dry]

The steps, their budgets and the report format: `qspec_jax.bench.gpu_check`.
"""

import sys

from qspec_jax.bench.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
