#!/usr/bin/env python
"""A bounded soak of a served medgemma model (medgemma_triton/bench/soak.py): good, bad, cancelled and
image requests at full concurrency for --duration seconds; every request accounted for, and the RSS
of every Triton process over time with its slope. Serves --repository itself, or soaks --url.

    python benchmarks/soak.py --repository REPO --duration 1200 --output soak.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medgemma_triton.bench.metadata import host_info
from medgemma_triton.bench.soak import run_soak
from medgemma_triton.server.launcher import TritonServer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repository", type=Path, help="serve this model repository for the soak")
    target.add_argument("--url", help="soak a running server (gRPC HOST:PORT); RSS only with --server-pid")
    parser.add_argument("--server-pid", type=int, help="tritonserver's pid, when --url runs on this machine")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds (default 120)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--images-per-request", type=int, default=1,
                        help="images in each image request (default 1; past the vision batch, pixels are fetched "
                             "in batches)")
    parser.add_argument("--output", type=Path, help="write the report as JSON here")
    args = parser.parse_args()

    server = TritonServer(args.repository, ready_timeout_s=300).start() if args.repository else None
    try:
        url = server.url if server else args.url
        pid = server.process.pid if server else args.server_pid
        report = run_soak(url, args.duration, args.concurrency, server_pid=pid,
                          images_per_request=args.images_per_request)
    finally:
        if server is not None:
            server.stop()
    print("\n".join(report.lines()))
    if args.output:
        args.output.write_text(json.dumps({"host": host_info(), "report": report.to_dict()}, indent=2))
    return 1 if report.lost else 0


if __name__ == "__main__":
    sys.exit(main())
