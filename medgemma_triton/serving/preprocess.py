"""The `preprocessing` model's work: one request's tensors -> prompt ids and pixel_values, or InvalidRequest.

Every check a client can fail happens here, before any generation starts: the chat JSON, the
images (decode, size limits, count), the prompt length and the sampling parameters. The `llm`
model parses the sampling parameters again with the same function (`generation_options`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medgemma_triton.runtime.chat import PromptBuilder, messages_from_text_input, parse_messages
from medgemma_triton.runtime.images import check_image_processing_supported, pixel_values_from_bytes
from medgemma_triton.runtime.limits import InvalidRequest, Limits
from medgemma_triton.serving.options import GetInput, first_value, generation_options
from medgemma_triton.spec import ModelSpec




@dataclass(frozen=True)
class Prepared:
    input_ids: np.ndarray  # int64 [T]
    pixel_values: np.ndarray  # float32 [N, 3, S, S]; N == 0 for text-only requests


class Preprocessor:
    def __init__(self, checkpoint: str | Path, limits: Limits | None = None):
        self.spec = ModelSpec.for_serving(checkpoint)
        self.limits = limits or Limits.from_env()
        processing = check_image_processing_supported(self.spec)
        self.image_shape = (3, processing.height, processing.width)
        self.prompts = PromptBuilder(self.spec, checkpoint, self.limits)

    def __call__(self, get: GetInput) -> Prepared:
        generation_options(get, self.limits, self.spec)  # validate now; the llm parses them again
        text_input, messages = get("text_input"), get("messages")
        if (text_input is None) == (messages is None):
            raise InvalidRequest("send exactly one of `messages` (chat JSON) or `text_input` (one user turn)")
        images = _image_list(get("images"))
        if len(images) > self.limits.max_images:  # before decoding any of them
            raise InvalidRequest(
                f"the request has {len(images)} images; the limit is {self.limits.max_images} "
                f"({Limits.env_name('max_images')})"
            )
        if messages is not None:
            chat = parse_messages(first_value(messages, "messages"), self.limits)
        else:
            chat = messages_from_text_input(first_value(text_input, "text_input"), len(images), self.limits)
        input_ids = self.prompts.build(chat, len(images))  # checks image parts against images first
        if images:
            pixel_values = pixel_values_from_bytes(images, self.spec, self.limits)
        else:
            pixel_values = np.zeros((0, *self.image_shape), dtype=np.float32)
        return Prepared(input_ids=input_ids, pixel_values=pixel_values)


def _image_list(images: np.ndarray | None) -> list[bytes]:
    if images is None:
        return []
    values = np.asarray(images, dtype=object).reshape(-1)
    out = []
    for i, value in enumerate(values):
        if not isinstance(value, (bytes, bytearray, np.bytes_)):
            raise InvalidRequest(f"images[{i}] must be encoded image bytes")
        out.append(bytes(value))
    return out
