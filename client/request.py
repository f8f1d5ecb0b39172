"""Chat messages, images and sampling parameters -> the `medgemma` model's input tensors.

The checks are the server's own code (runtime.chat, runtime.sampling) run without the server's
configurable limits, so a malformed request fails here, before it is sent, with the message the
server would give; the limits (image count and size, max_tokens, prompt length) are the server's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import triton_to_np_dtype

from medgemma_triton.client.errors import InvalidArgumentError
from medgemma_triton.client.images import encode_image
from medgemma_triton.contract import CLIENT_DTYPES, TOP_INPUTS, TOP_OUTPUTS

_INPUTS = {t.name: t for t in TOP_INPUTS}
_OUTPUT_NAMES = tuple(t.name for t in TOP_OUTPUTS)

# client keyword -> `medgemma` input (contract.TOP_INPUTS)
SAMPLING_INPUTS = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "random_seed",
    "stop": "stop_words",
}
assert set(SAMPLING_INPUTS.values()) <= set(_INPUTS)

IMAGE_KEYS = ("image", "path", "url")  # model card: "image"; transformers also reads "path"/"url"


@dataclass
class ChatRequest:
    """What one request sends: the contract's input tensors, built once, usable by sync and aio clients."""

    messages_json: str
    images: list[bytes]
    stream: bool
    inputs: list = field(repr=False)
    outputs: list = field(repr=False)


def prepare_messages(messages) -> tuple[str, list[bytes]]:
    """Model-card chat messages -> (messages JSON with {"type": "image"} placeholders, encoded images).

    Images are taken in order; validation is the server's own (runtime.messages.parse_messages), without
    its size limit (that one is the server's to apply).
    """
    from medgemma_triton.runtime.messages import parse_messages
    from medgemma_triton.runtime.limits import InvalidRequest, Limits

    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if isinstance(messages, Mapping):
        messages = [messages]
    images: list[bytes] = []
    placeholders = []
    if isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)):
        for i, message in enumerate(messages):
            placeholders.append(_with_placeholders(i, message, images))
    else:
        placeholders = messages
    try:
        messages_json = json.dumps(placeholders, ensure_ascii=False)
    except ValueError:  # json.dumps's only ValueError without allow_nan=False
        raise InvalidArgumentError("messages cannot be sent as JSON: it contains itself") from None
    except TypeError:
        where = _first_non_json(placeholders, "messages", set()) or "messages"
        raise InvalidArgumentError(
            f"{where} cannot be sent as JSON: it is not text, a number, true/false, None, a list or a dict "
            '(images go in {"type": "image", "image": ...} parts)'
        ) from None
    try:
        parse_messages(messages_json, Limits(max_messages_bytes=2**62))
    except InvalidRequest as exc:
        raise InvalidArgumentError(str(exc)) from None
    return messages_json, images


def _first_non_json(value, where: str, seen: set) -> str | None:
    """Where in `value` the first thing json.dumps cannot write is, or None."""
    if value is None or isinstance(value, (str, int, float)):
        return None
    if id(value) in seen or not isinstance(value, (dict, list, tuple)):
        return where
    seen.add(id(value))
    if isinstance(value, dict):
        for key, item in value.items():
            if key is not None and not isinstance(key, (str, int, float)):
                return where
            if (found := _first_non_json(item, f"{where}.{key}", seen)) is not None:
                return found
        return None
    for i, item in enumerate(value):
        if (found := _first_non_json(item, f"{where}[{i}]", seen)) is not None:
            return found
    return None


def _with_placeholders(index: int, message, images: list[bytes]):
    if not isinstance(message, Mapping) or not isinstance(message.get("content"), Sequence) or isinstance(
        message.get("content"), str
    ):
        return dict(message) if isinstance(message, Mapping) else message
    parts = []
    for j, part in enumerate(message["content"]):
        if isinstance(part, Mapping) and part.get("type") == "image":
            value = next((part[key] for key in IMAGE_KEYS if part.get(key) is not None), None)
            if value is None:
                raise InvalidArgumentError(
                    f"messages[{index}].content[{j}] is an image part without an image: "
                    'give it as {"type": "image", "image": <PIL image, path, bytes, array or DICOM>}'
                )
            try:
                images.append(encode_image(value))
            except InvalidArgumentError as exc:
                raise type(exc)(f"messages[{index}].content[{j}]: {exc}") from None
            parts.append({"type": "image"})
        else:
            parts.append(dict(part) if isinstance(part, Mapping) else part)
    return {**message, "content": parts}


def validate_sampling(**params) -> None:
    """The server's own checks (runtime.sampling) on the values a request carries, without the
    server's configurable limits (those it applies itself)."""
    from medgemma_triton.runtime.limits import InvalidRequest, Limits
    from medgemma_triton.runtime.sampling import SamplingParams

    int32_max = 2**31 - 1
    open_limits = Limits(max_new_tokens=int32_max, max_stop_words=2**31, max_stop_word_chars=2**31)
    try:
        SamplingParams.from_request(open_limits, vocab_size=int32_max, **params)
    except InvalidRequest as exc:
        raise InvalidArgumentError(str(exc)) from None


def _input(name: str, values: list) -> grpcclient.InferInput:
    spec = _INPUTS[name]
    datatype = CLIENT_DTYPES[spec.triton_dtype]
    shape = [len(values) if d == -1 else d for d in spec.dims]
    array = np.array(values, dtype=triton_to_np_dtype(datatype)).reshape(shape)
    tensor = grpcclient.InferInput(name, shape, datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def build_request(
    messages,
    *,
    stream: bool,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    timeout: float | None = None,
) -> ChatRequest:
    """The `medgemma` inputs for one chat request; None leaves a parameter to the server's default.

    `timeout` (seconds) also becomes the server-side deadline `timeout_ms`: the server stops
    generating then, even where the client's own deadline does not reach it.
    """
    if isinstance(stop, str):
        stop = [stop]
    sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
    validate_sampling(**sampling, stop=stop)
    messages_json, images = prepare_messages(messages)
    inputs = [_input("messages", [messages_json.encode("utf-8")])]
    if images:
        inputs.append(_input("images", images))
    for keyword, value in sampling.items():
        if value is not None:
            inputs.append(_input(SAMPLING_INPUTS[keyword], [value]))
    if stop:
        inputs.append(_input(SAMPLING_INPUTS["stop"], [word.encode("utf-8") for word in stop]))
    inputs.append(_input("stream", [bool(stream)]))
    if timeout is not None:
        if timeout <= 0:
            raise InvalidArgumentError(f"timeout must be positive seconds, got {timeout}")
        inputs.append(_input("timeout_ms", [max(1, round(timeout * 1e3))]))
    outputs = [grpcclient.InferRequestedOutput(name) for name in _OUTPUT_NAMES]
    return ChatRequest(messages_json, images, bool(stream), inputs, outputs)
