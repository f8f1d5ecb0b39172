#!/usr/bin/env python
"""Single-request latency and per-stage server time of a served medgemma ensemble (see --help)."""

import sys
from pathlib import Path

try:
    from medgemma_triton.bench.cli import latency_main
except ImportError:  # a source checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from medgemma_triton.bench.cli import latency_main

if __name__ == "__main__":
    sys.exit(latency_main())
