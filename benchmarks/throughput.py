#!/usr/bin/env python
"""Capacity planning for a served medgemma ensemble (see --help): load sweep, genai-perf metrics, SLO goodput, instances needed."""

import sys
from pathlib import Path

try:
    from medgemma_triton.bench.cli import throughput_main
except ImportError:  # a source checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from medgemma_triton.bench.cli import throughput_main

if __name__ == "__main__":
    sys.exit(throughput_main())
