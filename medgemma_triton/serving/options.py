"""A request's generation options from its Triton input tensors (absent optional inputs are None)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from medgemma_triton.contract import (
    FINISH_CANCELLED,
    FINISH_STOP,
    LLM_POLL_INPUT,
    LLM_STOP_INPUT,
    LLM_STOP_REASON_INPUT,
)
from medgemma_triton.runtime.limits import InvalidRequest, Limits
from medgemma_triton.runtime.sampling import SamplingParams
from medgemma_triton.spec import ModelSpec

GetInput = Callable[[str], "np.ndarray | None"]


@dataclass(frozen=True)
class GenerationOptions:
    sampling: SamplingParams  # stop words: only where preprocessing validates them (the llm gets none)
    stream: bool


def first_value(array: np.ndarray, name: str):
    """The one element of a [1] (or [1, 1]) input tensor."""
    values = np.asarray(array).reshape(-1)
    if values.size != 1:
        raise InvalidRequest(f"{name} must be a single value, got {values.size} values")
    return values[0]


def generation_options(get: GetInput, limits: Limits, spec: ModelSpec) -> GenerationOptions:
    sampling = SamplingParams.from_request(
        limits,
        spec.text.vocab_size,
        max_tokens=get("max_tokens"),
        temperature=get("temperature"),
        top_p=get("top_p"),
        top_k=get("top_k"),
        seed=get("random_seed"),
        stop=get("stop_words"),
    )
    stream = get("stream")
    return GenerationOptions(sampling=sampling, stream=bool(first_value(stream, "stream")) if stream is not None else False)


STOP_REASONS = (FINISH_CANCELLED, FINISH_STOP)


def stop_request(get: GetInput) -> str | None:
    """The reason of an llm `stop` request (serving/pipeline.py sends them), or None for a generation request."""
    stop = get(LLM_STOP_INPUT)
    if stop is None or not bool(first_value(stop, LLM_STOP_INPUT)):
        return None
    reason = get(LLM_STOP_REASON_INPUT)
    if reason is None:
        return FINISH_CANCELLED
    reason = first_value(reason, LLM_STOP_REASON_INPUT)
    reason = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
    if reason not in STOP_REASONS:
        raise InvalidRequest(f"stop_reason must be one of {STOP_REASONS}, got {reason!r}")
    return reason


def poll_request(get: GetInput) -> bool:
    """True for an llm `poll` request: the next tokens of the generation with its request id (serving/polled.py)."""
    poll = get(LLM_POLL_INPUT)
    return poll is not None and bool(first_value(poll, LLM_POLL_INPUT))
