"""Adapters between Triton's Python backend (`triton_python_backend_utils`, passed in as `pb`) and
the serving modules. Only the model.py files call these; everything else takes plain numpy.

Never log request content here (prompts, images, generated text): only counts and error kinds.
"""

from __future__ import annotations

import gc
import json
import logging
import queue
import threading
import time
from pathlib import Path

import numpy as np

from medgemma_triton.contract import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_TIMEOUT,
    IN_FLIGHT_METRIC,
    INVALID_ARGUMENT_PREFIX,
)
from medgemma_triton.serving.engine import Chunk

log = logging.getLogger(__name__)


def model_parameters(args: dict) -> dict[str, str]:
    """config.pbtxt `parameters` as {key: string_value}."""
    config = json.loads(args["model_config"])
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def required_parameter(parameters: dict[str, str], key: str, model: str) -> str:
    value = parameters.get(key, "")
    if not value:
        raise ValueError(
            f"{model}/config.pbtxt has no `{key}` parameter: build the repository with `medgemma-triton build`"
        )
    return value


def model_path(args: dict, value: str) -> str:
    """A path parameter: absolute as given, else relative to this model's version directory (where a
    built repository keeps its files, so that it can be moved)."""
    path = Path(value)
    return str(path if path.is_absolute() else Path(args["model_repository"]) / str(args["model_version"]) / path)


def required_path(args: dict, parameters: dict[str, str], key: str, model: str) -> str:
    return model_path(args, required_parameter(parameters, key, model))


def input_getter(pb, request):
    """name -> numpy array, or None when the optional input was not sent."""

    def get(name: str):
        tensor = pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    return get


def error_response(pb, message: str, invalid_request: bool):
    code = pb.TritonError.INVALID_ARG if invalid_request else pb.TritonError.INTERNAL
    # BLS and gRPC streams drop the status code; the prefix survives both (see contract.py).
    if invalid_request and not message.startswith(INVALID_ARGUMENT_PREFIX):
        message = INVALID_ARGUMENT_PREFIX + message
    return pb.InferenceResponse(error=pb.TritonError(message, code))


def string_tensor(pb, name: str, value: str):
    return pb.Tensor(name, np.array([value.encode("utf-8")], dtype=np.object_))


def int32_tensor(pb, name: str, value: int):
    return pb.Tensor(name, np.array([value], dtype=np.int32))


class SendQueue:
    """Sends the llm's responses on one background thread, in the order they were queued.

    A response sender's send() is a round trip to the server; made on the scheduler thread it held
    every active request's next decode step (one round trip per request per step). Per request,
    order is kept (one thread, FIFO); the final response is queued after the engine has dropped the
    sequence, so nothing asks is_cancelled() of a request after its final response (the 2.51 python
    backend frees the response factory at the final send: see pipeline.ClientSender).
    """

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="llm-responses", daemon=True)
        self._thread.start()

    def put(self, send) -> None:
        self._queue.put(send)

    def _run(self) -> None:
        while (send := self._queue.get()) is not None:
            try:
                send()
            except Exception as exc:  # noqa: BLE001 - a client that went away must not stop the others
                log.warning("sending an llm response failed: %s", type(exc).__name__)

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout_s)


class TritonResponseStream:
    """engine.ResponseStream over a decoupled model's response sender; sends through a SendQueue if given."""

    def __init__(self, pb, sender, send_queue: SendQueue | None = None):
        self.pb = pb
        self.sender = sender
        self._send_queue = send_queue

    def _submit(self, send) -> None:
        if self._send_queue is None:
            send()
        else:
            self._send_queue.put(send)

    def send(self, chunk: Chunk, final: bool) -> None:
        self._submit(lambda: self._send_chunk(chunk, final))

    def _send_chunk(self, chunk: Chunk, final: bool) -> None:
        pb = self.pb
        response = pb.InferenceResponse(
            output_tensors=[
                pb.Tensor("output_ids", np.asarray(chunk.output_ids, dtype=np.int64)),
                string_tensor(pb, "finish_reason", chunk.finish_reason),
                int32_tensor(pb, "prompt_tokens", chunk.prompt_tokens),
                int32_tensor(pb, "completion_tokens", chunk.completion_tokens),
            ]
        )
        self.sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

    def fail(self, message: str, invalid_request: bool) -> None:
        response = error_response(self.pb, message, invalid_request)
        self._submit(lambda: self.sender.send(response, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL))

    def close(self) -> None:
        self._submit(lambda: self.sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL))

    def is_cancelled(self) -> bool:
        return self.sender.is_cancelled()


def mailbox_delivery(pb, send_queue: SendQueue | None = None):
    """polled.Deliver over response senders: one final response each (through `send_queue` if given)."""

    def deliver(sender, chunk: Chunk | None, error: tuple[str, bool] | None) -> None:
        stream = TritonResponseStream(pb, sender, send_queue)
        if error is not None:
            stream.fail(*error)
        elif chunk is None:
            stream.close()
        else:
            stream.send(chunk, final=True)

    return deliver


TOKEN_COUNTER_FLUSH_S = 0.5  # metric updates are round trips to the server: batch the per-token one


def collect_garbage() -> None:
    """Free, from a model's finalize(), what only reference cycles still hold. Triton 2.51's Python stub
    unmaps its shared memory before the interpreter's last garbage collection; a response or tensor
    freed then segfaults the process at exit (docs/design.md)."""
    gc.collect()


class _ClosedMetric:
    """What a metric becomes when its model finalizes: later updates are dropped."""

    def increment(self, _value) -> None:
        pass

    def set(self, _value) -> None:
        pass


CLOSED_METRIC = _ClosedMetric()


class TritonCounters:
    """engine.Counters as Triton custom metrics, served on the metrics port with Triton's own.

    The generated-token counter is updated at most every TOKEN_COUNTER_FLUSH_S and whenever a request
    finishes (a per-token update cost a round trip to the server on the scheduler thread each step).
    """

    def __init__(self, pb, model: str):
        counter, gauge = pb.MetricFamily.COUNTER, pb.MetricFamily.GAUGE
        labels = {"model": model}
        # A family must outlive its metrics: keep every family referenced for the model's lifetime.
        self._families = {
            "tokens": pb.MetricFamily(
                name="medgemma_generated_tokens_total", description="Tokens generated", kind=counter
            ),
            "cancelled": pb.MetricFamily(
                name="medgemma_cancelled_requests_total",
                description="Requests stopped because the client cancelled them",
                kind=counter,
            ),
            "refused": pb.MetricFamily(
                name="medgemma_refused_requests_total",
                description="Requests refused as busy (max_active_requests decoding and MEDGEMMA_MAX_QUEUED waiting)",
                kind=counter,
            ),
            "finished": pb.MetricFamily(
                name="medgemma_finished_requests_total",
                description="Requests finished, by finish reason",
                kind=counter,
            ),
            "active": pb.MetricFamily(
                name="medgemma_active_requests", description="Requests being decoded now", kind=gauge
            ),
            "queued": pb.MetricFamily(
                name="medgemma_queued_requests",
                description="Requests waiting for a decode slot (the scaling signal: docs/kubernetes.md)",
                kind=gauge,
            ),
        }
        self._tokens = self._families["tokens"].Metric(labels=labels)
        self._cancelled = self._families["cancelled"].Metric(labels=labels)
        self._refused = self._families["refused"].Metric(labels=labels)
        self._finished = {
            reason: self._families["finished"].Metric(labels={**labels, "finish_reason": reason})
            for reason in (FINISH_STOP, FINISH_LENGTH, FINISH_TIMEOUT, FINISH_CANCELLED)
        }
        self._active = self._families["active"].Metric(labels=labels)
        self._active_value = -1
        self._queued = self._families["queued"].Metric(labels=labels)
        self._queued_value = -1
        self._lock = threading.Lock()
        self._unreported_tokens = 0
        self._tokens_reported_at = time.monotonic()

    def generated_tokens(self, n: int) -> None:
        with self._lock:
            self._unreported_tokens += n
            if time.monotonic() - self._tokens_reported_at >= TOKEN_COUNTER_FLUSH_S:
                self._report_tokens()

    def _report_tokens(self) -> None:
        if self._unreported_tokens:
            self._tokens.increment(self._unreported_tokens)
            self._unreported_tokens = 0
        self._tokens_reported_at = time.monotonic()

    def cancelled(self) -> None:
        self._cancelled.increment(1)

    def refused(self) -> None:
        self._refused.increment(1)

    def finished(self, reason: str) -> None:
        with self._lock:
            self._report_tokens()
        if reason in self._finished:
            self._finished[reason].increment(1)

    def active(self, n: int) -> None:
        if n != self._active_value:  # each update is a round trip to the server
            self._active.set(n)
            self._active_value = n

    def queued(self, n: int) -> None:
        if n != self._queued_value:
            self._queued.set(n)
            self._queued_value = n

    def close(self) -> None:
        """Release the metrics and their families: call from the model's finalize(). A family
        destroyed later, with the Python stub (Triton 2.51's python_backend), dereferences the stub
        after it is gone and segfaults the process at exit (docs/design.md)."""
        with self._lock:
            self._report_tokens()
            self._tokens = self._cancelled = self._refused = self._active = self._queued = CLOSED_METRIC
            self._finished = {reason: CLOSED_METRIC for reason in self._finished}
            self._families = {}


class InFlightGauge:
    """The top model's requests in flight, as a Triton custom metric (contract.IN_FLIGHT_METRIC)."""

    def __init__(self, pb, model: str):
        self._family = pb.MetricFamily(  # a family must outlive its metric
            name=IN_FLIGHT_METRIC, description="Requests in flight in the top model", kind=pb.MetricFamily.GAUGE
        )
        self._metric = self._family.Metric(labels={"model": model})

    def set(self, n: int) -> None:
        self._metric.set(n)

    def close(self) -> None:
        """Release the metric and its family: call from the model's finalize() (TritonCounters.close)."""
        self._metric = CLOSED_METRIC
        self._family = None
