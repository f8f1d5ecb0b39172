#!/usr/bin/env python
"""Triton's share of end-to-end latency at concurrency 1: the served model vs the same runtime in-process.

    python benchmarks/overhead.py .cache/bench/repo-int4 --requests 8 --max-tokens 64 --output overhead.json
"""

import sys
from pathlib import Path

try:
    from medgemma_triton.bench.overhead import main
except ImportError:  # a source checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from medgemma_triton.bench.overhead import main

if __name__ == "__main__":
    sys.exit(main())
