"""The client's public names from where they were first importable; the code is split by job:
request.py (messages -> input tensors), response.py (responses -> text, typed errors), base.py (what
both clients share), sync.py (`MedGemmaClient`) and aio.py (`AsyncMedGemmaClient`)."""

from medgemma_triton.client.aio import AsyncChatStream, AsyncMedGemmaClient
from medgemma_triton.client.base import READY_PROBE_TIMEOUT_S
from medgemma_triton.client.request import (
    IMAGE_KEYS,
    SAMPLING_INPUTS,
    ChatRequest,
    build_request,
    prepare_messages,
    validate_sampling,
)
from medgemma_triton.client.response import (
    COMPLETION_TOKENS,
    FINISH_REASON,
    OUTPUT_IDS,
    PROMPT_TOKENS,
    TEXT_OUTPUT,
    ChatResult,
)
from medgemma_triton.client.sync import ChatStream, MedGemmaClient

__all__ = [
    "COMPLETION_TOKENS",
    "FINISH_REASON",
    "IMAGE_KEYS",
    "OUTPUT_IDS",
    "PROMPT_TOKENS",
    "READY_PROBE_TIMEOUT_S",
    "SAMPLING_INPUTS",
    "TEXT_OUTPUT",
    "AsyncChatStream",
    "AsyncMedGemmaClient",
    "ChatRequest",
    "ChatResult",
    "ChatStream",
    "MedGemmaClient",
    "build_request",
    "prepare_messages",
    "validate_sampling",
]
