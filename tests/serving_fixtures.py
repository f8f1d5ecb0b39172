"""Fixtures for tests that run a real Triton server (register with `pytest_plugins` in conftest.py).

Each repository is built once per session under the test cache; each server starts once per session
on free loopback ports and is always stopped (and its stub processes killed) at the end.
"""

from __future__ import annotations

import json
import queue
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import pytest

CACHE_SUBDIR = "repositories"


@pytest.fixture(scope="session")
def tiny_repository(tiny_checkpoint, tiny_onnx):
    from conftest import CACHE
    from medgemma_triton.repository import build_repository

    # Rebuilt every session (cheap: config edits and copies); the export is reused when up to date.
    return build_repository(tiny_checkpoint, CACHE / CACHE_SUBDIR / "tiny-fp32", onnx_dir=tiny_onnx)


@pytest.fixture(scope="session")
def dev_repository(dev_checkpoint, dev_onnx):
    from conftest import CACHE
    from medgemma_triton.repository import build_repository

    return build_repository(dev_checkpoint, CACHE / CACHE_SUBDIR / "dev-fp32", onnx_dir=dev_onnx)


def _start(repository, **env):
    from medgemma_triton.server.launcher import TritonServer

    # Small thread pools: the test machine is shared; one ORT thread per session is plenty for tiny models.
    server = TritonServer(repository, ready_timeout_s=180, env=env)
    server.start()
    return server


@pytest.fixture(scope="session")
def tiny_server(tiny_repository):
    server = _start(tiny_repository, OMP_NUM_THREADS="1")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dev_server(dev_repository):
    server = _start(dev_repository)
    try:
        yield server
    finally:
        server.stop()


# --- a small gRPC streaming helper over tritonclient (the package's own client is tested elsewhere) ---


@dataclass
class Outcome:
    text: str = ""
    ids: list = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    responses: int = 0
    error: str | None = None


def medgemma_inputs(*, messages=None, text_input=None, images=(), stream=True, **sampling):
    import tritonclient.grpc as grpcclient

    from medgemma_triton.contract import CLIENT_DTYPES, TOP_INPUTS

    dtypes = {t.name: CLIENT_DTYPES[t.triton_dtype] for t in TOP_INPUTS}
    numpy_types = {"BYTES": np.object_, "BOOL": np.bool_, "INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32}
    values = dict(sampling)
    if messages is not None:
        values["messages"] = [messages if isinstance(messages, (bytes, str)) else json.dumps(messages)]
    if text_input is not None:
        values["text_input"] = [text_input]
    if images:
        values["images"] = list(images)
    values["stream"] = [stream]
    inputs = []
    for name, value in values.items():
        value = value if isinstance(value, (list, tuple)) else [value]
        if dtypes[name] == "BYTES":
            value = [v.encode("utf-8") if isinstance(v, str) else v for v in value]
        array = np.array(value, dtype=numpy_types[dtypes[name]])
        tensor = grpcclient.InferInput(name, list(array.shape), dtypes[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class MedgemmaStream:
    """One gRPC stream (one tritonclient client) for sequential requests to the `medgemma` model."""

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.results: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def send(self, **request) -> None:
        self.client.async_stream_infer("medgemma", medgemma_inputs(**request))

    def receive(self, timeout_s: float = 120.0, on_response=None) -> Outcome:
        outcome = Outcome()
        deadline = time.monotonic() + timeout_s
        while True:
            result, error = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                outcome.error = error.message() if hasattr(error, "message") else str(error)
                return outcome
            outcome.responses += 1
            outcome.text += result.as_numpy("text_output")[0].decode("utf-8")
            outcome.ids += result.as_numpy("output_ids").tolist()
            outcome.prompt_tokens = int(result.as_numpy("prompt_tokens")[0])
            outcome.completion_tokens = int(result.as_numpy("completion_tokens")[0])
            outcome.finish_reason = result.as_numpy("finish_reason")[0].decode()
            if on_response is not None:
                on_response(outcome)
            if outcome.finish_reason:
                return outcome

    def request(self, timeout_s: float = 120.0, on_response=None, **request) -> Outcome:
        self.send(**request)
        return self.receive(timeout_s, on_response)

    def cancel(self) -> None:
        self.client.stop_stream(cancel_requests=True)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def metric_value(server, name: str, **labels) -> float:
    """One sample from Triton's Prometheus endpoint (0 when the series does not exist yet)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{key}="{val}"' in series for key, val in labels.items()):
            total += float(value)
    return total


def stream_interval_sizes(tokens: int, first_text_at: int, interval: int) -> list[int]:
    """Tokens per response: one at a time until the first response with text (its `first_text_at`th
    token), then `interval` at a time, the last response taking what is left."""
    sizes = [1] * min(first_text_at, tokens)
    rest = tokens - len(sizes)
    sizes += [interval] * (rest // interval) + ([rest % interval] if rest % interval else [])
    return sizes


def assert_response_sizes(seen: list[tuple[int, str]], tokens: int, streaming: bool, interval: int) -> None:
    """`seen`: (ids, text) received so far after each response. A stream sends stream_interval_sizes'
    groups; a request that does not stream gets one response with every token."""
    sizes = [b[0] - a[0] for a, b in zip([(0, "")] + seen, seen)]
    if streaming:
        first_text_at = next(n for n, text in seen if text)
        assert sizes == stream_interval_sizes(tokens, first_text_at, interval), sizes
    else:
        assert sizes == [tokens], sizes
