"""`MedGemmaClient`: the blocking client, over tritonclient.grpc.

The `medgemma` model is decoupled, so Triton refuses unary ModelInfer for it: every request,
streaming or not, goes over a ModelStreamInfer stream (`stream=false` just asks the server for one
response carrying the whole text). Closing a stream before it finishes (leaving a `for` loop over it,
`close()`, leaving its `with` block) cancels the gRPC call; Triton then marks the request cancelled
and the model stops generating.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from medgemma_triton.client.base import ClientBase, ReadinessPolling, StreamBase
from medgemma_triton.client.errors import MedGemmaError
from medgemma_triton.client.request import ChatRequest
from medgemma_triton.client.response import ChatResult


class MedGemmaClient(ClientBase):
    """Blocking client. Thread-safe: concurrent requests each use their own gRPC stream.

    `url` may be a list of endpoints: requests are spread across them and fail over before they
    stream (ClientBase). The constructor's keywords (timeout, TLS files, headers) are ClientBase's.
    """

    def _open(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        # tritonclient allows one stream per client object: keep idle ones for reuse, one per concurrent
        # call, per endpoint; built now, so bad TLS files fail here
        self._idle = {url: [self._new_triton_client(url)] for url in self.urls}

    def _new_triton_client(self, url: str) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(**self._connections[url].triton_kwargs())

    def _acquire(self, url: str | None = None) -> grpcclient.InferenceServerClient:
        url = url or self.url
        with self._lock:
            if self._closed:
                raise MedGemmaError("the client is closed")
            if self._idle[url]:
                return self._idle[url].pop()
        return self._new_triton_client(url)

    def _release(self, triton_client, url: str | None = None) -> None:
        with self._lock:
            if not self._closed:
                self._idle[url or self.url].append(triton_client)
                return
        triton_client.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {url: [] for url in self.urls}
        for clients in idle.values():
            for triton_client in clients:
                triton_client.close()

    def __enter__(self) -> "MedGemmaClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def check_ready(self, timeout: float | None = None) -> None:
        """Raise UnavailableError / ModelNotReadyError unless the server is live and the model ready."""
        error = self._readiness(timeout)
        if error is not None:
            raise error

    def is_ready(self, timeout: float | None = None) -> bool:
        return self._readiness(timeout) is None

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> None:
        """Poll until the model is ready; after `timeout` seconds raise the last readiness error."""
        polling = ReadinessPolling(timeout, interval)
        while (error := self._readiness(polling.probe_timeout())) is not None:
            time.sleep(polling.pause_after(error))

    def _readiness(self, timeout: float | None) -> MedGemmaError | None:
        """Why the model cannot take requests now (None when it can, at one endpoint at least)."""
        error = None
        for url in self.urls:
            error = self._endpoint_readiness(url, timeout)
            if error is None:
                return None
        return error

    def _endpoint_readiness(self, url: str, timeout: float | None) -> MedGemmaError | None:
        try:
            triton_client = self._acquire(url)
        except MedGemmaError as exc:  # the client is closed
            return exc
        options = self._probe_options(timeout)
        try:
            live = triton_client.is_server_live(**options)
            return self._readiness_error(live, live and triton_client.is_model_ready(self.model, **options), url)
        except InferenceServerException as exc:
            return self._error(exc, url)
        finally:
            self._release(triton_client, url)

    def stream_chat(self, messages, *, timeout: float | None = None, **sampling) -> "ChatStream":
        """Start one streaming request; iterate the returned stream for text deltas.

        sampling: max_tokens, temperature, top_p, top_k, seed, stop (None: the server's default).
        Use it as a context manager (or iterate it to the end) so an abandoned stream is cancelled.
        """
        return self.send(self._chat_request(messages, timeout, sampling), timeout=timeout)

    def chat(self, messages, *, timeout: float | None = None, **sampling) -> ChatResult:
        """One request, the whole answer: a `ChatResult`.

        Asks the server to stream and joins the deltas: a streamed request stops generating as soon as
        it is cancelled (timeout, Ctrl-C), where the tritonserver 2.51 pipeline finishes a `stream=false`
        one regardless (measured: it generated on after cancellation); the text is the same either way.
        """
        with self.send(self._chat_request(messages, timeout, sampling), timeout=timeout) as stream:
            return stream.final_result()

    def send(self, request: ChatRequest, *, timeout: float | None = None) -> "ChatStream":
        """Start a request prepared by `build_request` (validated, images encoded) and return its stream."""
        return ChatStream(self, request, self._request_timeout(timeout))


class ChatStream(StreamBase):
    """Text deltas of one request, in order, as an iterator; `final_result()` once it has finished."""

    def __init__(self, client: MedGemmaClient, request: ChatRequest, timeout: float | None):
        super().__init__(client, timeout)
        self._request = request
        self._triton = None
        self._start_clock()
        while True:
            try:
                self._open_call()
                return
            except MedGemmaError as error:
                self._next_endpoint(error)

    def _open_call(self) -> None:
        """Send the request to `self.url` on a fresh gRPC stream."""
        client, request = self._client, self._request
        self._triton = client._acquire(self.url)  # a closed client raises before there is a stream to close
        self._responses: queue.SimpleQueue = queue.SimpleQueue()
        try:
            # No gRPC deadline: Triton 2.51 does not cancel a request whose stream deadline passed (it
            # generates on). The client keeps the deadline itself and cancels the request explicitly.
            if self.url not in client._server_inputs:
                client._learn_inputs(self.url, self._model_metadata())
            self._triton.start_stream(self._on_response, headers=client.headers)
            self._triton.async_stream_infer(
                client.model,
                client._inputs_for(self.url, request),
                outputs=request.outputs,
                request_id=uuid.uuid4().hex,  # names the request in the server's log
                enable_empty_final_response=True,  # so the last response is always marked final
            )
        except InferenceServerException as exc:
            # a stream that failed at once (e.g. connection refused) reports why through the callback
            try:
                _, reported = self._responses.get(timeout=1.0)
            except queue.Empty:
                reported = None
            self.close()
            raise self._mapped(reported or exc) from None

    def _model_metadata(self) -> dict | None:
        try:
            return self._triton.get_model_metadata(self._client.model, headers=self._client.headers, as_json=True,
                                                   client_timeout=self._time_left() if self._deadline else None)
        except InferenceServerException:
            return None  # the request itself will say what is wrong

    def _on_response(self, result, error) -> None:  # tritonclient's stream thread
        self._responses.put((result, error))

    def _next_response(self):
        if self._deadline is None:
            return self._responses.get()
        try:
            return self._responses.get(timeout=self._time_left())
        except queue.Empty:
            self.close()  # cancels the request on the server
            raise self._timed_out() from None

    def _is_last(self, result) -> bool:
        return result.get_response().parameters["triton_final_response"].bool_param

    def _next_delta(self) -> str | None:
        while not self._done:
            self._raise_if_closed()
            try:
                delta = self._fold(*self._next_response())
            except MedGemmaError as error:  # the call has ended; maybe another endpoint takes it
                self._next_endpoint(error)
                self._open_call()
                continue
            if delta:
                return delta
        return None

    def __iter__(self):
        try:
            while (delta := self._next_delta()) is not None:
                yield delta
        finally:
            self.close()  # after a `break` this cancels the request

    def final_result(self) -> ChatResult:
        """Read the rest of the stream and return the whole answer (finish_reason "cancelled" if closed early)."""
        if not self._closed:
            try:
                while self._next_delta() is not None:
                    pass
            finally:
                self.close()
        return self._accumulator.result()

    def close(self) -> None:
        """Stop reading; if the request is still running, cancel it."""
        self._close()

    def _end_call(self, cancel: bool) -> None:
        try:
            self._triton.stop_stream(cancel_requests=cancel)
        finally:
            self._client._release(self._triton, self.url)

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()
