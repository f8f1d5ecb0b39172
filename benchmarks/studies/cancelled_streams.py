#!/usr/bin/env python
"""Does a client-cancelled gRPC stream cost tritonserver memory, and does it keep a model loaded?

Serves a one-model repository (a decoupled Python echo model, no medgemma code), sends --requests
streamed requests that end as the contract ends them (the server closes the stream after the final
response) and, on a fresh server, as many that the client cancels after their final response. For
each it prints tritonserver's RSS growth per request, then how the server stopped: the time and exit
status of TritonServer.stop() (0: every model unloaded; otherwise Triton's exit timeout or the
SIGKILL after it).

    python benchmarks/studies/cancelled_streams.py --requests 4000 --output result.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "x" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "x" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

MODEL = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x")
            request.get_response_sender().send(
                pb_utils.InferenceResponse([x]), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""


async def _streams(url: str, requests: int, cancel: bool, concurrency: int = 8) -> None:
    import tritonclient.grpc.aio as grpcclient

    async with grpcclient.InferenceServerClient(url) as client:
        async def one() -> None:
            tensor = grpcclient.InferInput("x", [1], "INT32")
            tensor.set_data_from_numpy(np.array([1], np.int32))

            async def request():
                yield {"model_name": "echo", "inputs": [tensor], "request_id": uuid.uuid4().hex}

            call = client.stream_infer(request())
            async for _result, error in call:
                if error is not None:
                    raise RuntimeError(error)
                if cancel:
                    break  # the final response is in: the client leaves the stream
            if cancel:
                call.cancel()

        for _ in range(0, requests, concurrency):
            await asyncio.gather(*(one() for _ in range(concurrency)))


def measure(repository: Path, requests: int, cancel: bool) -> dict:
    from medgemma_triton.bench.soak import rss_mib
    from medgemma_triton.server.launcher import TritonServer

    server = TritonServer(repository).start()
    try:
        asyncio.run(_streams(server.url, 200, cancel))  # warm-up
        before = rss_mib(server.process.pid)
        started = time.monotonic()
        asyncio.run(_streams(server.url, requests, cancel))
        seconds = time.monotonic() - started
        time.sleep(1.0)
        after = rss_mib(server.process.pid)
    finally:
        stop_started = time.monotonic()
        status = server.stop()
        stop_s = time.monotonic() - stop_started
    return {
        "streams": "cancelled by the client after the final response" if cancel else "ended by the server",
        "requests": requests,
        "seconds": round(seconds, 1),
        "tritonserver_rss_mib": [round(before, 1), round(after, 1)],
        "bytes_per_request": round((after - before) * 2**20 / requests),
        "stop_seconds": round(stop_s, 1),
        "stop_status": status,
    }


def main() -> None:
    from medgemma_triton.bench.metadata import host_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        repository = Path(directory) / "repository"
        (repository / "echo" / "1").mkdir(parents=True)
        (repository / "echo" / "config.pbtxt").write_text(CONFIG)
        (repository / "echo" / "1" / "model.py").write_text(MODEL)
        rows = [measure(repository, args.requests, cancel) for cancel in (False, True)]
    for row in rows:
        print(f"{row['streams']}: {row['requests']} requests, tritonserver RSS {row['tritonserver_rss_mib'][0]} -> "
              f"{row['tritonserver_rss_mib'][1]} MiB ({row['bytes_per_request']} B/request); stop took "
              f"{row['stop_seconds']} s, status {row['stop_status']}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"host": host_info(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
