#!/usr/bin/env python
"""Triton's share of end-to-end latency at concurrency 1: the served model vs the same runtime in-process.

    python benchmarks/studies/overhead.py .cache/bench/repo-int4 --requests 8 --max-tokens 64 --output overhead.json
"""

import sys

from medgemma_triton.bench.overhead import main

if __name__ == "__main__":
    sys.exit(main())
