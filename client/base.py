"""What `MedGemmaClient` and `AsyncMedGemmaClient` share: the constructor and its connection options,
the endpoints and failover rules, the readiness rules, and a request stream's state. Each client adds
only its I/O (tritonclient.grpc or tritonclient.grpc.aio).

Several endpoints: requests start on each in turn (round robin). A request whose endpoint is
unreachable, not ready or refuses it as busy before any response is sent to the next endpoint, each
endpoint at most once; one that has begun to stream is never sent again (a failure then is the
caller's error to see, not a silent duplicate).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from medgemma_triton.client.errors import (
    CancelledError,
    DeadlineExceededError,
    MedGemmaError,
    ModelNotReadyError,
    ServerError,
    UnavailableError,
)
from medgemma_triton.client.request import build_request
from medgemma_triton.client.response import Accumulator, ChatResult, client_error, timed_out
from medgemma_triton.contract import TOP_MODEL

BEST_EFFORT_INPUTS = ("timeout_ms",)  # sent only to servers whose model declares them
READY_PROBE_TIMEOUT_S = 10.0  # readiness RPCs when the client has no timeout of its own


@dataclass(frozen=True)
class Connection:
    """How to reach the server; the keywords tritonclient's sync and aio constructors both take."""

    url: str
    ssl: bool = False
    root_certificates: str | None = None  # file paths (PEM), read by tritonclient
    private_key: str | None = None
    certificate_chain: str | None = None

    def triton_kwargs(self) -> dict:
        return {
            "url": self.url,
            "ssl": self.ssl,
            "root_certificates": self.root_certificates,
            "private_key": self.private_key,
            "certificate_chain": self.certificate_chain,
        }


class ClientBase:
    """`timeout` (seconds) is the default for each whole request; `root_certificates`, `private_key`
    and `certificate_chain` are PEM file paths (TLS when `ssl=True`); `headers` go with every call."""

    def __init__(
        self,
        url: str | Sequence[str] = "127.0.0.1:8001",
        *,
        model: str = TOP_MODEL,
        timeout: float | None = None,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        self.urls = (url,) if isinstance(url, str) else tuple(url)
        if not self.urls:
            raise ValueError("no server URL given")
        self.url = self.urls[0]
        self.model = model
        self.timeout = timeout
        self.headers = dict(headers) if headers else None
        self._connections = {u: Connection(u, ssl, root_certificates, private_key, certificate_chain) for u in self.urls}
        self._server_inputs: dict[str, frozenset[str]] = {}  # url -> the model's input names, read once
        self._turn = itertools.count()
        self._open()

    def _endpoint_order(self) -> list[str]:
        """Every endpoint once, starting with the next in turn (round robin across requests)."""
        start = next(self._turn) % len(self.urls)
        return [self.urls[(start + k) % len(self.urls)] for k in range(len(self.urls))]

    def _open(self) -> None:
        """Set up the client's tritonclient side (a subclass's only construction step)."""

    def _probe_options(self, timeout: float | None) -> dict:
        """Keywords for one readiness RPC: a deadline even when the client has none for requests."""
        if timeout is None:
            timeout = self.timeout if self.timeout is not None else READY_PROBE_TIMEOUT_S
        return {"headers": self.headers, "client_timeout": timeout}

    def _request_timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    def _chat_request(self, messages, timeout: float | None, sampling: dict):
        """A streamed chat request that carries this request's timeout as the server-side deadline."""
        return build_request(messages, stream=True, timeout=self._request_timeout(timeout), **sampling)

    def _learn_inputs(self, url: str, metadata: dict | None) -> None:
        """Remember the model's inputs at `url` (from its metadata, JSON form; None: unknown, keep all)."""
        if metadata is not None and url not in self._server_inputs:
            self._server_inputs[url] = frozenset(t["name"] for t in metadata.get("inputs", []))

    def _inputs_for(self, url: str, request) -> list:
        """The request's input tensors, less the best-effort ones (BEST_EFFORT_INPUTS) that the model at
        `url` does not declare: a server older than this client still answers, without them."""
        known = self._server_inputs.get(url)
        if known is None:
            return request.inputs
        return [t for t in request.inputs if t.name() in known or t.name() not in BEST_EFFORT_INPUTS]

    def _error(self, exc, url: str | None = None) -> MedGemmaError:
        return client_error(exc, url or self.url)

    def _readiness_error(self, live: bool, ready: bool, url: str | None = None) -> MedGemmaError | None:
        """What the two readiness probes mean for a caller: None when the model can take requests."""
        if not live:
            return UnavailableError(f"the server at {url or self.url} is not live")
        if not ready:
            return ModelNotReadyError(f"model {self.model} is not ready")
        return None


class ReadinessPolling:
    """wait_until_ready's schedule; the clients differ only in how they probe and sleep."""

    def __init__(self, timeout: float, interval: float):
        self.timeout = timeout
        self.interval = interval
        self.deadline = time.monotonic() + timeout

    def probe_timeout(self) -> float:
        return max(min(self.deadline - time.monotonic(), READY_PROBE_TIMEOUT_S), 0.1)

    def pause_after(self, error: MedGemmaError) -> float:
        """The pause before the next probe; raises the last error once no probe fits before the deadline."""
        if time.monotonic() + self.interval > self.deadline:
            raise type(error)(f"{error} (waited {self.timeout:g} s)")
        return self.interval


class StreamBase:
    """One request's state, shared by ChatStream and AsyncChatStream: they differ in how they read
    responses and how they end the gRPC call (`_end_call`)."""

    def __init__(self, client: ClientBase, timeout: float | None):
        self._client = client
        self._endpoints = client._endpoint_order()
        self.url = self._endpoints.pop(0)  # where the request is (being) sent
        self._timeout = timeout  # kept here, not by gRPC: see ChatStream.__init__
        self._deadline: float | None = None
        self._accumulator = Accumulator()
        self._done = False  # the server sent its last response
        self._closed = False  # nothing more is read; the request was cancelled unless done
        self._first_token_at: float | None = None

    def _start_clock(self) -> None:
        """The request's deadline starts with its first attempt and covers every later one."""
        if self._deadline is None and self._timeout is not None:
            self._deadline = time.monotonic() + self._timeout

    def _time_left(self) -> float:
        return max(self._deadline - time.monotonic(), 0.0)

    def _timed_out(self) -> DeadlineExceededError:
        return timed_out(self._timeout)

    def _unfinished(self) -> ServerError:
        return ServerError("the server ended the response without a finish_reason")

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise CancelledError("the stream was closed before it finished")

    def _is_last(self, result) -> bool:
        """Whether `result` (already folded) is the server's last response for this request."""
        raise NotImplementedError

    def _fold(self, result, error) -> str:
        """One response read from the server: its text delta; an error response is raised, typed."""
        if error is not None:
            self._close()
            raise self._mapped(error)
        delta = self._accumulator.add(result)
        if self._first_token_at is None and self._accumulator.completion_tokens > 0:
            self._first_token_at = time.perf_counter()
        if self._is_last(result):
            self._done = True
            self._close()
            if not self._accumulator.finished:
                raise self._unfinished()
        return delta

    def _may_retry(self, error: MedGemmaError) -> bool:
        """Whether a failed attempt may go to the next endpoint: the error says the request can be
        retried (unreachable, not ready, busy) and nothing of it has been received."""
        return error.retryable and bool(self._endpoints) and not self._accumulator.started

    def _next_endpoint(self, error: MedGemmaError) -> None:
        """After a failed attempt: raise `error` unless the request may go to the next endpoint, else
        start over there with a fresh stream state (the deadline keeps running)."""
        if not self._may_retry(error):
            raise error
        self.url = self._endpoints.pop(0)
        self._accumulator = Accumulator()
        self._done = self._closed = False

    def _mapped(self, exc) -> MedGemmaError:
        error = self._client._error(exc, self.url)
        if isinstance(error, DeadlineExceededError) and self._timeout is not None:
            return timed_out(self._timeout, error)
        return error

    def _close(self) -> None:
        """Stop reading; if the request is still running, cancel it."""
        if self._closed:
            return
        self._closed = True
        cancel = not self._done
        if cancel:
            self._accumulator.cancel()
        self._end_call(cancel)

    def _end_call(self, cancel: bool) -> None:
        raise NotImplementedError

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far, as the server counted them in its latest response."""
        return self._accumulator.completion_tokens

    @property
    def first_token_at(self) -> float | None:
        """time.perf_counter() when the first response carrying a generated token arrived; None before.
        A streamed token may decode to no text yet (part of a character), so this can precede the
        first text delta: it is when the server finished the prompt, the first text when a reader saw it."""
        return self._first_token_at

    @property
    def result(self) -> ChatResult | None:
        """The whole answer once the stream has finished or been closed; None while it runs."""
        return self._accumulator.result() if self._closed else None
