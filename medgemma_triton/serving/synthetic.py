"""A synthetic deployment: the `medgemma` contract with no model behind it, for calibrating load generators.

`medgemma-triton build synthetic --output REPO` writes a repository with one model,
`medgemma`, that answers every request with deterministic tokens at a fixed rate: each request gets
`tokens_per_second` tokens per second, sent `tokens_per_response` tokens to a response, until
`max_tokens` (finish_reason "length"). Nothing is computed, so what a benchmark measures against it
is the harness and Triton's transport: point `throughput.py`, perf_analyzer or AIPerf at it to see
the request and token rates a client can drive before trusting it against a fast (GPU) deployment.

Vision time: a request with images waits `seconds_per_image` for each of them before its first token
(the time a vision encoder would spend on them), so a many-image workload (a CT volume's 85 slices)
can be planned for without a model: set it to a per-image time measured on the real deployment.
Like the token rate it is per request: concurrent requests do not queue behind one another's images.

Inputs are checked as the contract says (exactly one of `messages` / `text_input`; `max_tokens` at
least 1) and refused over the protocol's error channel otherwise; sampling options and stop words are
accepted and ignored. `prompt_tokens` counts whitespace-separated words of the prompt text. Requests
run as tasks on one asyncio thread, which also sends every response.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medgemma_triton import contract
from medgemma_triton.runtime.limits import InvalidRequest
from medgemma_triton.serving.triton_io import error_response, input_getter, int32_tensor, string_tensor

PROFILE = "synthetic"
VOCABULARY = 64  # distinct synthetic tokens: id TOKEN_ID_BASE + i % VOCABULARY, text " w<i % VOCABULARY>"
TOKEN_ID_BASE = 1000
MAX_TOKENS_LIMIT = 1 << 20
CANCEL_CHECK_S = 0.05  # how often a request asks whether its client cancelled
MODEL_SOURCE = Path(__file__).with_name("synthetic_model.py")


@dataclass(frozen=True)
class SyntheticSettings:
    tokens_per_second: float = 1000.0  # per request
    tokens_per_response: int = 1
    max_concurrent_requests: int = 1024
    seconds_per_image: float = 0.0  # modelled vision time, for each image of a request

    def __post_init__(self):
        if not self.tokens_per_second > 0:
            raise ValueError(f"tokens_per_second must be positive, got {self.tokens_per_second}")
        if self.tokens_per_response < 1:
            raise ValueError(f"tokens_per_response must be at least 1, got {self.tokens_per_response}")
        if self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be at least 1, got {self.max_concurrent_requests}")
        if not self.seconds_per_image >= 0:
            raise ValueError(f"seconds_per_image must be 0 or more, got {self.seconds_per_image}")

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> "SyntheticSettings":
        return cls(float(parameters["tokens_per_second"]), int(parameters["tokens_per_response"]),
                   int(parameters["max_concurrent_requests"]),
                   # absent from repositories built before vision time was modelled
                   float(parameters.get("seconds_per_image", cls.seconds_per_image)))

    def vision_seconds(self, images: int) -> float:
        """The modelled vision time of a request with `images` images, before its first token."""
        return images * self.seconds_per_image


def token(i: int) -> tuple[int, str]:
    """The i-th generated token of every request: (id, text)."""
    return TOKEN_ID_BASE + i % VOCABULARY, f" w{i % VOCABULARY}"


def chunks(max_tokens: int, settings: SyntheticSettings, images: int = 0):
    """(seconds after the request arrived, token ids, text, tokens so far) for each response: the
    images' vision time first, then tokens at the configured rate."""
    size, vision_s = settings.tokens_per_response, settings.vision_seconds(images)
    for first in range(0, max_tokens, size):
        count = min(first + size, max_tokens)
        ids, texts = zip(*(token(i) for i in range(first, count)))
        yield vision_s + count / settings.tokens_per_second, list(ids), "".join(texts), count


def prompt_words(text_input: str | None, messages: str | None) -> int:
    if text_input is not None:
        return len(text_input.split())
    try:
        chat = json.loads(messages)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"messages is not JSON: {exc}") from None
    if not isinstance(chat, list):
        raise InvalidRequest("messages must be a JSON list of {role, content}")
    words = 0
    for message in chat:
        content = message.get("content", "") if isinstance(message, dict) else ""
        parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content if isinstance(p, dict)]
        words += sum(len(str(part).split()) for part in parts)
    return words


def _scalar(get, name: str):
    value = get(name)
    return None if value is None else value.reshape(-1)[0]


def _text(value) -> str | None:
    return None if value is None else (value.decode("utf-8") if isinstance(value, bytes) else str(value))


class SyntheticServer:
    """The synthetic `medgemma` model's request handling (synthetic_model.py adapts Triton to it)."""

    def __init__(self, pb, settings: SyntheticSettings):
        self.pb, self.settings = pb, settings
        self.in_flight = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="synthetic-medgemma", daemon=True)
        self.thread.start()

    def submit(self, request) -> None:
        arrived = time.monotonic()
        asyncio.run_coroutine_threadsafe(self._serve(request, arrived), self.loop)

    def _response(self, text: str, ids: list[int], reason: str, prompt_tokens: int, completion_tokens: int):
        pb = self.pb
        return pb.InferenceResponse(output_tensors=[
            string_tensor(pb, "text_output", text),
            pb.Tensor("output_ids", np.asarray(ids, dtype=np.int64)),
            string_tensor(pb, "finish_reason", reason),
            int32_tensor(pb, "prompt_tokens", prompt_tokens),
            int32_tensor(pb, "completion_tokens", completion_tokens),
        ])

    def _parse(self, request):
        get = input_getter(self.pb, request)
        text_input, messages = _text(_scalar(get, "text_input")), _text(_scalar(get, "messages"))
        if (text_input is None) == (messages is None):
            raise InvalidRequest("send exactly one of messages and text_input")
        max_tokens = _scalar(get, "max_tokens")
        max_tokens = contract.SAMPLING_DEFAULTS.max_tokens if max_tokens is None else int(max_tokens)
        if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
            raise InvalidRequest(f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}], got {max_tokens}")
        stream = _scalar(get, "stream")
        timeout_ms = _scalar(get, contract.TIMEOUT_INPUT)
        images = get("images")
        images = 0 if images is None else int(images.size)
        prompt = prompt_words(text_input, messages) + images
        return max_tokens, bool(stream) if stream is not None else False, timeout_ms, prompt, images

    async def _serve(self, request, arrived: float) -> None:
        sender = request.get_response_sender()
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if self.in_flight >= self.settings.max_concurrent_requests:
            message = (f"{contract.SERVER_BUSY_PREFIX}{self.in_flight} requests in flight, the limit is "
                       f"{self.settings.max_concurrent_requests} (synthetic max_concurrent_requests)")
            sender.send(error_response(self.pb, message, invalid_request=False), flags=final)
            return
        try:
            max_tokens, stream, timeout_ms, prompt, images = self._parse(request)
        except InvalidRequest as exc:
            sender.send(error_response(self.pb, str(exc), invalid_request=True), flags=final)
            return
        self.in_flight += 1
        try:
            deadline = None if timeout_ms is None else arrived + int(timeout_ms) / 1e3
            texts, ids, sent, next_check = [], [], 0, 0.0
            vision_end = arrived + self.settings.vision_seconds(images)
            if await self._cancelled_before(sender, vision_end if deadline is None else min(vision_end, deadline)):
                sender.send(flags=final)
                return
            for due, chunk_ids, text, count in chunks(max_tokens, self.settings, images):
                at = arrived + due
                if deadline is not None and at > deadline:  # what was generated by then, and "timeout"
                    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                    text, chunk_ids = ("", []) if stream else ("".join(texts), ids)
                    sender.send(self._response(text, chunk_ids, contract.FINISH_TIMEOUT, prompt, sent), flags=final)
                    return
                await asyncio.sleep(max(0.0, at - time.monotonic()))
                if time.monotonic() >= next_check:  # a round trip to the server: not for every response
                    next_check = time.monotonic() + CANCEL_CHECK_S
                    if sender.is_cancelled():
                        sender.send(flags=final)
                        return
                last = count == max_tokens
                sent = count
                if stream:
                    sender.send(self._response(text, chunk_ids, contract.FINISH_LENGTH if last else "", prompt, count),
                                flags=final if last else 0)
                else:
                    texts.append(text)
                    ids.extend(chunk_ids)
            if not stream:
                sender.send(self._response("".join(texts), ids, contract.FINISH_LENGTH, prompt, sent), flags=final)
        finally:
            self.in_flight -= 1

    async def _cancelled_before(self, sender, until: float) -> bool:
        """Sleep until `until` (monotonic), asking every CANCEL_CHECK_S whether the client cancelled: a
        cancelled volume frees its place at once rather than after its modelled vision time."""
        while (left := until - time.monotonic()) > 0:
            await asyncio.sleep(min(left, CANCEL_CHECK_S))
            if left > CANCEL_CHECK_S and sender.is_cancelled():
                return True
        return False

    def shutdown(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
