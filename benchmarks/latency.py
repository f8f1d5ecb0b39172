#!/usr/bin/env python
"""Single-request latency and per-stage server time of a served medgemma deployment (see --help)."""

import sys

from medgemma_triton.bench.cli import latency_main

if __name__ == "__main__":
    sys.exit(latency_main())
