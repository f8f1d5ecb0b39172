"""The `preprocessing` model's work: one request's tensors -> prompt ids and pixel_values, or InvalidRequest.

Every check a client can fail happens here, before any generation starts: the chat JSON, the
images (decode, size limits, count), the prompt length and the sampling parameters. The `llm`
model reads the sampling parameters with the same function (`generation_options`), which checks them
again because Triton lets a caller reach `llm` directly (docs/design.md).

A request is prepared in two steps: `plan` (validation and the prompt: milliseconds) and
`pixel_values` (decoding its images, one at a time: up to seconds per large image), so that the
served model can schedule the second (serving/preprocess_lanes.py) and stop it at a deadline.

The `medgemma` model asks for the two steps separately: the prompt first (`pixels: false`), then the
pixel values of a few images at a time (`image_offset`: those images only, no prompt), so that the
pixels of a request with many images (a CT volume: 85) never all exist at once.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medgemma_triton.contract import FINISH_TIMEOUT, IMAGE_OFFSET_INPUT
from medgemma_triton.runtime.chat import PromptBuilder
from medgemma_triton.runtime.messages import messages_from_text_input, parse_messages
from medgemma_triton.runtime.images import (
    ALLOWED_FORMATS,
    check_image_processing_supported,
    decode_image,
    preprocess_image,
)
from medgemma_triton.runtime.limits import InvalidRequest, Limits
from medgemma_triton.serving.options import GetInput, first_value, generation_options
from medgemma_triton.spec import ModelSpec


class DeadlineExpired(Exception):
    """The request's deadline passed before its images were decoded."""


def check_deadline(deadline: float | None) -> None:
    """Raise DeadlineExpired once time.monotonic() has reached `deadline` (None: no deadline)."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExpired


@dataclass(frozen=True)
class Prepared:
    input_ids: np.ndarray  # int64 [T]
    pixel_values: np.ndarray  # float32 [N, 3, S, S]; N == 0 for text-only requests and timed-out ones
    finish_reason: str = ""  # FINISH_TIMEOUT: the deadline passed before the images were decoded


@dataclass(frozen=True)
class Plan:
    """A validated request whose images are not decoded yet."""

    input_ids: np.ndarray  # int64 [T]; empty for a pixels-only request
    images: list[bytes]  # encoded, in order
    first_image: int = 0  # the request's index of images[0] (a pixels-only request's image_offset)

    @property
    def decode_pixels(self) -> int:
        """Pixels of its largest image, read from the headers: what decoding it holds at once (the
        images decode one after another). 0 for an image whose header does not parse: decode_image
        refuses it before decoding any pixel."""
        return max((_header_pixels(data) for data in self.images), default=0)


class Preprocessor:
    def __init__(self, checkpoint: str | Path, limits: Limits | None = None):
        self.spec = ModelSpec.for_serving(checkpoint)
        self.limits = limits or Limits.from_env()
        processing = check_image_processing_supported(self.spec)
        self.image_shape = (3, processing.height, processing.width)
        self.prompts = PromptBuilder(self.spec, checkpoint, self.limits)

    def __call__(self, get: GetInput) -> Prepared:
        """The whole request at once, without a deadline (in-process use: bench/overhead.py)."""
        plan = self.plan(get)
        return Prepared(plan.input_ids, self.pixel_values(plan.images))

    def plan(self, get: GetInput) -> Plan:
        """Every check but the images' pixels, and the prompt's token ids."""
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
        return Plan(input_ids=input_ids, images=images)

    def pixels_only(self, get: GetInput) -> Plan | None:
        """The plan of a pixels-only request (`image_offset` sent: decode these images, build no
        prompt), or None for a request with a prompt."""
        offset = get(IMAGE_OFFSET_INPUT)
        if offset is None:
            return None
        first = int(first_value(offset, IMAGE_OFFSET_INPUT))
        images = _image_list(get("images"))
        if first < 0 or first + len(images) > self.limits.max_images:
            raise InvalidRequest(
                f"image_offset {first} with {len(images)} images is outside the request's images "
                f"(at most {self.limits.max_images}, {Limits.env_name('max_images')})"
            )
        return Plan(input_ids=np.zeros(0, dtype=np.int64), images=images, first_image=first)

    def pixel_values(self, images: list[bytes], deadline: float | None = None, first_image: int = 0) -> np.ndarray:
        """Decode and preprocess the images in order, each once; DeadlineExpired before any image
        once `deadline` (time.monotonic()) has passed. Errors name each image by its index in the
        request (`first_image` + its index here)."""
        pixel_values = np.empty((len(images), *self.image_shape), dtype=np.float32)
        for i, data in enumerate(images):
            check_deadline(deadline)
            name = f"images[{first_image + i}]"
            pixel_values[i] = preprocess_image(decode_image(data, self.limits, name), self.spec, name)
        return pixel_values

    def no_pixel_values(self) -> np.ndarray:
        return np.zeros((0, *self.image_shape), dtype=np.float32)

    def timed_out(self, plan: Plan) -> Prepared:
        return Prepared(plan.input_ids, self.no_pixel_values(), FINISH_TIMEOUT)


def _header_pixels(data: bytes) -> int:
    try:  # Pillow reads the header only; pixels are decoded by decode_image, once
        width, height = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS).size
    except Exception:  # noqa: BLE001 - decode_image reports what is wrong with it
        return 0
    return width * height


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
