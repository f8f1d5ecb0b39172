"""OpenAI's response objects: `chat.completion`, `chat.completion.chunk` and the SSE framing.

Field for field what the `openai` SDK parses; `usage` carries the server's own token counts
(`prompt_tokens` includes image tokens).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from medgemma_triton.client.response import ChatResult
from medgemma_triton.contract import FINISH_LENGTH, FINISH_TIMEOUT

DONE = b"data: [DONE]\n\n"


def finish_reason(server_reason: str) -> str:
    """OpenAI knows stop and length; the server's `stop` covers end of turn, eos and stop words, and an
    answer cut by the server's deadline (`timeout`) is reported as cut short: `length`."""
    return "length" if server_reason in (FINISH_LENGTH, FINISH_TIMEOUT) else "stop"


def usage(result: ChatResult) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


@dataclass
class Completion:
    """One chat completion's identity, shared by its chunks."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def whole(self, result: ChatResult) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(result.finish_reason),
            }],
            "usage": usage(result),
        }

    def chunk(self, delta: dict, finish: str | None = None, include_usage: bool = False) -> bytes:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None  # OpenAI: null on every chunk but the last when usage is asked for
        return sse(body)

    def usage_chunk(self, result: ChatResult) -> bytes:
        return sse({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [],
            "usage": usage(result),
        })


def sse(body: dict) -> bytes:
    return b"data: " + json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"
