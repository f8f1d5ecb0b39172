"""Adapters between Triton's Python backend (`triton_python_backend_utils`, passed in as `pb`) and
the serving modules. Only the model.py files call these; everything else takes plain numpy.

Never log request content here (prompts, images, generated text): only counts and error kinds.
"""

from __future__ import annotations

import json

import numpy as np

from medgemma_triton.contract import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, INVALID_ARGUMENT_PREFIX
from medgemma_triton.serving.engine import Chunk


def model_parameters(args: dict) -> dict[str, str]:
    """config.pbtxt `parameters` as {key: string_value}."""
    config = json.loads(args["model_config"])
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def int_parameter(parameters: dict[str, str], key: str, default: int) -> int:
    raw = parameters.get(key, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError:
        raise ValueError(f"config.pbtxt parameter {key}={raw!r} is not an integer") from None


def required_parameter(parameters: dict[str, str], key: str, model: str) -> str:
    value = parameters.get(key, "")
    if not value:
        raise ValueError(
            f"{model}/config.pbtxt has no `{key}` parameter: build the repository with `medgemma-triton build`"
        )
    return value


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


class TritonResponseStream:
    """engine.ResponseStream over a decoupled model's response sender."""

    def __init__(self, pb, sender):
        self.pb = pb
        self.sender = sender

    def send(self, chunk: Chunk, final: bool) -> None:
        pb = self.pb
        window = chunk.window
        response = pb.InferenceResponse(
            output_tensors=[
                pb.Tensor("output_ids", np.asarray(chunk.output_ids, dtype=np.int64)),
                pb.Tensor("window_ids", np.asarray(window.window_ids, dtype=np.int64)),
                int32_tensor(pb, "read_offset", window.read_offset),
                int32_tensor(pb, "text_offset", window.text_offset),
                int32_tensor(pb, "text_chars", window.text_chars),
                string_tensor(pb, "finish_reason", chunk.finish_reason),
                int32_tensor(pb, "prompt_tokens", chunk.prompt_tokens),
                int32_tensor(pb, "completion_tokens", chunk.completion_tokens),
            ]
        )
        self.sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

    def fail(self, message: str, invalid_request: bool) -> None:
        self.sender.send(
            error_response(self.pb, message, invalid_request), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        )

    def close(self) -> None:
        self.sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def is_cancelled(self) -> bool:
        return self.sender.is_cancelled()


class TritonCounters:
    """engine.Counters as Triton custom metrics, served on the metrics port with Triton's own."""

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
            "finished": pb.MetricFamily(
                name="medgemma_finished_requests_total",
                description="Requests finished, by finish reason",
                kind=counter,
            ),
            "active": pb.MetricFamily(
                name="medgemma_active_requests", description="Requests being decoded now", kind=gauge
            ),
        }
        self._tokens = self._families["tokens"].Metric(labels=labels)
        self._cancelled = self._families["cancelled"].Metric(labels=labels)
        self._finished = {
            reason: self._families["finished"].Metric(labels={**labels, "finish_reason": reason})
            for reason in (FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED)
        }
        self._active = self._families["active"].Metric(labels=labels)
        self._active_value = -1

    def generated_tokens(self, n: int) -> None:
        self._tokens.increment(n)

    def cancelled(self) -> None:
        self._cancelled.increment(1)

    def finished(self, reason: str) -> None:
        if reason in self._finished:
            self._finished[reason].increment(1)

    def active(self, n: int) -> None:
        if n != self._active_value:  # each update is a round trip to the server
            self._active.set(n)
            self._active_value = n
