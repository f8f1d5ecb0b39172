"""A request's generation options from its Triton input tensors (absent optional inputs are None)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from medgemma_triton.runtime.limits import InvalidRequest, Limits
from medgemma_triton.runtime.sampling import SamplingParams
from medgemma_triton.spec import ModelSpec

GetInput = Callable[[str], "np.ndarray | None"]


@dataclass(frozen=True)
class GenerationOptions:
    sampling: SamplingParams  # includes the stop words
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
