#!/usr/bin/env python
"""Capacity planning for a served medgemma deployment (see --help): load sweep, genai-perf metrics, SLO goodput, instances needed."""

import sys

from medgemma_triton.bench.cli import throughput_main

if __name__ == "__main__":
    sys.exit(throughput_main())
