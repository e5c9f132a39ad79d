#!/usr/bin/env python
"""Run a benchmark profile: every distillation method against the student alone, same budget, over seeds.

    python tools/benchmark.py --profile quick|cpu|gpu|PATH.yaml [--out runs/bench/NAME] [--teacher CKPT]
                              [--methods NAME ...] [--seeds SEED ...]

The same as ``detkd benchmark``; see :mod:`detkd.benchmark` and the built-in profiles in ``detkd/configs/benchmarks/``.
Rerun the same command to resume a cut benchmark: finished runs are kept, the report is rewritten after every run.
"""

import sys

from detkd.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
