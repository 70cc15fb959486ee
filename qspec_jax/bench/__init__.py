"""Measurement code shared by the experiments/ scripts and the tests.

* `common`: run metadata (`run_meta`), atomic JSON (`write_json`), timing (`median_time`,
  `median_wall`), the benchmarks' prompt lists, argument helpers;
* `qspec_steps`: draft / verify / AR step times as the engine runs them, and their H100 roofline
  projection;
* `gpu_check`: the GPU check behind `make gpu-check`.
"""
