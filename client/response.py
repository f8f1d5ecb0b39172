"""The `medgemma` model's responses -> text deltas and a `ChatResult`; tritonclient and gRPC failures
-> the typed errors of errors.py.

What the server sends when it refuses or fails a request (model_repository/medgemma, the BLS model
serving.pipeline drives): one final response in the stream whose error has a message but, over a
gRPC stream, no status code. Refusals (runtime.limits.InvalidRequest, raised by preprocessing or by
the llm and forwarded as they are) start with contract.INVALID_ARGUMENT_PREFIX and become
InvalidArgumentError; the rest ("the medgemma pipeline failed: ...", "generation failed: ...",
Triton's own "unexpected inference input ...") become ServerError. RPCs outside a stream (connect,
readiness) carry a gRPC status, mapped by errors.from_triton / from_grpc.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from tritonclient.utils import InferenceServerException

from medgemma_triton.client.errors import (
    DeadlineExceededError,
    MedGemmaError,
    ServerBusyError,
    UnavailableError,
    describe_unavailable,
    from_grpc,
    from_triton,
)
from medgemma_triton.contract import TOP_OUTPUTS, FINISH_CANCELLED


def _output(name: str) -> str:
    assert name in {t.name for t in TOP_OUTPUTS}, f"{name} is not an output of the contract"
    return name


TEXT_OUTPUT = _output("text_output")
OUTPUT_IDS = _output("output_ids")
FINISH_REASON = _output("finish_reason")
PROMPT_TOKENS = _output("prompt_tokens")
COMPLETION_TOKENS = _output("completion_tokens")


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str  # contract.FINISH_STOP | FINISH_LENGTH | FINISH_TIMEOUT | FINISH_CANCELLED
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...]


def _scalar(result, name: str):
    values = result.as_numpy(name)
    if values is None or values.size == 0:
        return None
    return values.reshape(-1)[0]


class Accumulator:
    """Folds the responses of one request into text deltas and a `ChatResult`."""

    def __init__(self):
        # deltas are whole characters from the server; the incremental decoder only guards byte splits
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self.finish_reason = ""
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.responses = 0  # responses folded in (a cancellation adds none)

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason)

    @property
    def started(self) -> bool:
        """Whether any response has been folded in (after which a request is never sent again)."""
        return self.responses > 0

    def add(self, result) -> str:
        self.responses += 1
        text = _scalar(result, TEXT_OUTPUT)
        delta = self._decoder.decode(bytes(text) if text is not None else b"")
        ids = result.as_numpy(OUTPUT_IDS)
        if ids is not None:
            self._token_ids.extend(int(i) for i in ids.reshape(-1))
        for name in (PROMPT_TOKENS, COMPLETION_TOKENS):
            value = _scalar(result, name)
            if value is not None:
                setattr(self, name, int(value))
        reason = _scalar(result, FINISH_REASON)
        if reason:
            self.finish_reason = bytes(reason).decode("utf-8")
            delta += self._decoder.decode(b"", final=True)
        self._text.append(delta)
        return delta

    def cancel(self) -> None:
        if not self.finished:
            self.finish_reason = FINISH_CANCELLED

    def result(self) -> ChatResult:
        return ChatResult(
            text="".join(self._text),
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            token_ids=tuple(self._token_ids),
        )


def client_error(exc, url: str) -> MedGemmaError:
    """A tritonclient exception (RPC or in-stream) or a raw grpc.RpcError (grpc.aio lets some through)
    as a MedGemmaError; an unreachable server is named by its URL, in one line."""
    error = from_triton(exc) if isinstance(exc, InferenceServerException) else from_grpc(exc)
    if isinstance(error, UnavailableError) and not isinstance(error, ServerBusyError):
        return UnavailableError(describe_unavailable(url, error.message))
    return error


def timed_out(timeout: float, cause: MedGemmaError | None = None) -> DeadlineExceededError:
    """A request that had no complete answer within `timeout` s (`cause`: what gRPC said, if it did)."""
    detail = f" ({cause})" if cause is not None else ""
    return DeadlineExceededError(f"no complete answer within {timeout:g} s{detail}")
