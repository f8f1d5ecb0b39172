"""The medgemma and llm models' config.pbtxt parameters, each with its one default.

The builder's CpuSettings, the models (model_repository/*/1/model.py) and the in-process pipeline
(bench/overhead.py) all take them from MedgemmaParameters and LlmParameters; the templates leave them
empty; tests/test_one_home.py fails on a default written anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping


def int_parameter(parameters: Mapping[str, str], key: str, default: int) -> int:
    """A config.pbtxt parameter as an int; `default` when it is absent or empty."""
    raw = parameters.get(key, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError:
        raise ValueError(f"config.pbtxt parameter {key}={raw!r} is not an integer") from None


class _ConfigParameters:
    @classmethod
    def from_config(cls, parameters: Mapping[str, str]):
        """From the model's config.pbtxt parameters (strings); one not set takes its default."""
        return cls(**{f.name: int_parameter(parameters, f.name, f.default) for f in fields(cls)})


@dataclass(frozen=True)
class MedgemmaParameters(_ConfigParameters):
    # requests in flight at once, each on its own worker thread; more are refused at once as busy
    max_concurrent_requests: int = 64
    # images per vision_encoder call; the builder makes it vision_encoder's max_batch_size
    vision_max_batch_size: int = 4

    def __post_init__(self):
        if self.max_concurrent_requests < 1 or self.vision_max_batch_size < 1:
            raise ValueError(f"max_concurrent_requests ({self.max_concurrent_requests}) and vision_max_batch_size "
                             f"({self.vision_max_batch_size}) must be >= 1 (the medgemma model's config.pbtxt parameters)")


@dataclass(frozen=True)
class LlmParameters(_ConfigParameters):
    # requests decoding at once: each holds its KV cache (ONNX Runtime) or a llama.cpp sequence
    max_active_requests: int = 16
    decode_max_batch_size: int = 8  # sequences per batched decode call
    # streamed tokens per response once the text shows: every response is several round trips between
    # processes (docs/performance.md)
    stream_interval: int = 4
    # prompt tokens prefilled per scheduler pass, between the other requests' decode steps (0: a prompt
    # in one call); a chunk never splits an image (serving/engine.py)
    prefill_chunk_tokens: int = 512
    kv_cache_tokens: int = 32768  # llama.cpp: KV cells shared by every active request
    intra_op_threads: int = 0  # 0: the runtime's choice (the CPUs this process may run on)

    def __post_init__(self):
        if self.max_active_requests < 1 or self.decode_max_batch_size < 1:
            raise ValueError(f"max_active_requests ({self.max_active_requests}) and decode_max_batch_size "
                             f"({self.decode_max_batch_size}) must be >= 1 (the llm model's config.pbtxt parameters)")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1 (tokens per streamed response), got {self.stream_interval}")
        if self.prefill_chunk_tokens < 0:
            raise ValueError(f"prefill_chunk_tokens must be >= 0 (0: a prompt in one call), got {self.prefill_chunk_tokens}")
        if self.kv_cache_tokens < 1 or self.intra_op_threads < 0:
            raise ValueError(f"kv_cache_tokens ({self.kv_cache_tokens}) must be >= 1 and intra_op_threads "
                             f"({self.intra_op_threads}) >= 0")

    @property
    def threads(self) -> int | None:
        return self.intra_op_threads or None
