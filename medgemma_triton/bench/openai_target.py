"""The deployment under test through the OpenAI-compatible gateway (`medgemma-triton openai`).

Same workload and the same records as target.TritonTarget, sent with the official `openai` SDK as
streamed chat completions (`stream_options.include_usage`, so token counts are the server's own):
a content chunk is a content response, the usage chunk gives prompt and completion tokens. A 503
from the gateway is a refusal as busy. Metadata, statistics and the queue gauge still come from
Triton (`--url`), which the gateway fronts.
"""

from __future__ import annotations

import base64
import time

from .metrics import RequestRecord
from .workload import BenchRequest

BUSY_STATUS = 503  # the gateway's answer to the server's "server busy" (gateway/errors.py)


def openai_messages(request: BenchRequest) -> list:
    """The request's chat in OpenAI's form: image parts become base64 data URIs."""
    images = iter(request.images)
    out = []
    for message in request.messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    data = next(images)
                    kind = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpeg"
                    uri = f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"
                    parts.append({"type": "image_url", "image_url": {"url": uri}})
                else:
                    parts.append(dict(part))
            content = parts
        out.append({"role": message["role"], "content": content})
    return out


class OpenAITarget:
    """`async with OpenAITarget(base_url) as target: await target.send(request, index)`."""

    def __init__(self, base_url: str, request_timeout_s: float = 600.0, api_key: str | None = None):
        self.base_url, self.request_timeout_s = base_url, request_timeout_s
        self.api_key = api_key or "unused"  # the gateway checks a key only when it was started with one
        self.client = None
        self.model = None

    async def __aenter__(self) -> "OpenAITarget":
        import openai

        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key,
                                         timeout=self.request_timeout_s, max_retries=0)
        models = await self.client.models.list()
        self.model = models.data[0].id
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()

    async def send(self, request: BenchRequest, index: int) -> RequestRecord:
        """Stream one request greedily (temperature 0, the model card's setting)."""
        import openai

        record = RequestRecord(index=index, start_s=time.perf_counter(), num_images=len(request.images))
        try:
            stream = await self.client.chat.completions.create(
                model=self.model, messages=openai_messages(request), max_tokens=request.max_tokens,
                temperature=0.0, stream=True, stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    record.input_tokens = chunk.usage.prompt_tokens
                    record.output_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        record.content_times_s.append(time.perf_counter())
                    if choice.finish_reason:
                        record.finish_reason = choice.finish_reason
        except openai.APIStatusError as exc:
            record.error = f"{type(exc).__name__}: {exc.status_code} {exc.message}"
            record.refused = exc.status_code == BUSY_STATUS
        except Exception as exc:  # noqa: BLE001 - a broken stream is a failed request, not a failed benchmark
            record.error = f"{type(exc).__name__}: {exc}"
        record.end_s = time.perf_counter()
        if record.error is None and not record.content_times_s:
            record.error = f"no text in the answer (finish_reason {record.finish_reason!r}, {record.output_tokens} tokens)"
        return record
