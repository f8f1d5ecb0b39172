"""`AsyncMedGemmaClient`: the asyncio client, over tritonclient.grpc.aio (the same stream protocol as
sync.py). Cancelling the task that reads a stream, or closing the stream early, cancels the gRPC call
and with it the request on the server."""

from __future__ import annotations

import asyncio
import uuid

import grpc
from tritonclient.utils import InferenceServerException

from medgemma_triton.client.base import ClientBase, ReadinessPolling, StreamBase
from medgemma_triton.client.errors import MedGemmaError
from medgemma_triton.client.request import ChatRequest
from medgemma_triton.client.response import ChatResult


class AsyncMedGemmaClient(ClientBase):
    """asyncio client over tritonclient.grpc.aio: one channel, any number of concurrent streams.

    Use it from one event loop (its gRPC channels are created on first use, in that loop). `url` may
    be a list of endpoints: requests are spread across them and fail over before they stream
    (ClientBase). The constructor's keywords (timeout, TLS files, headers) are ClientBase's.
    """

    def _open(self) -> None:
        self._triton: dict = {}  # url -> its tritonclient.grpc.aio client (one channel each)

    def _triton_client(self, url: str | None = None):
        url = url or self.url
        if url not in self._triton:
            import tritonclient.grpc.aio as grpcclient_aio

            self._triton[url] = grpcclient_aio.InferenceServerClient(**self._connections[url].triton_kwargs())
        return self._triton[url]

    async def close(self) -> None:
        clients, self._triton = self._triton, {}
        for triton_client in clients.values():
            await triton_client.close()

    async def __aenter__(self) -> "AsyncMedGemmaClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def check_ready(self, timeout: float | None = None) -> None:
        """Raise UnavailableError / ModelNotReadyError unless the server is live and the model ready."""
        error = await self._readiness(timeout)
        if error is not None:
            raise error

    async def is_ready(self, timeout: float | None = None) -> bool:
        return await self._readiness(timeout) is None

    async def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> None:
        """Poll until the model is ready; after `timeout` seconds raise the last readiness error."""
        polling = ReadinessPolling(timeout, interval)
        while (error := await self._readiness(polling.probe_timeout())) is not None:
            await asyncio.sleep(polling.pause_after(error))

    async def _readiness(self, timeout: float | None) -> MedGemmaError | None:
        """Why the model cannot take requests now (None when it can, at one endpoint at least)."""
        error = None
        for url in self.urls:
            error = await self._endpoint_readiness(url, timeout)
            if error is None:
                return None
        return error

    async def _endpoint_readiness(self, url: str, timeout: float | None) -> MedGemmaError | None:
        triton_client = self._triton_client(url)
        options = self._probe_options(timeout)
        try:
            live = await triton_client.is_server_live(**options)
            return self._readiness_error(live, live and await triton_client.is_model_ready(self.model, **options), url)
        except (InferenceServerException, grpc.RpcError) as exc:
            return self._error(exc, url)

    def stream_chat(self, messages, *, timeout: float | None = None, **sampling) -> "AsyncChatStream":
        """`async for delta in client.stream_chat(...)`; use `async with` so an abandoned stream is cancelled."""
        return self.send(self._chat_request(messages, timeout, sampling), timeout=timeout)

    async def chat(self, messages, *, timeout: float | None = None, **sampling) -> ChatResult:
        """One request, the whole answer (streamed from the server, as MedGemmaClient.chat explains)."""
        async with self.send(self._chat_request(messages, timeout, sampling), timeout=timeout) as stream:
            return await stream.final_result()

    def send(self, request: ChatRequest, *, timeout: float | None = None) -> "AsyncChatStream":
        """Start a request prepared by `build_request`; the call begins on the first read."""
        return AsyncChatStream(self, request, self._request_timeout(timeout))


class AsyncChatStream(StreamBase):
    """Async iterator of text deltas for one request; `await final_result()` for the whole answer."""

    def __init__(self, client: AsyncMedGemmaClient, request: ChatRequest, timeout: float | None):
        super().__init__(client, timeout)
        self._request = request
        self._call = None
        self._responses = None

    def _start(self) -> None:
        request, client, url = self._request, self._client, self.url
        triton_client = client._triton_client(url)

        async def one_request():
            if url not in client._server_inputs:
                try:
                    client._learn_inputs(url, await triton_client.get_model_metadata(
                        client.model, headers=client.headers, as_json=True))
                except (InferenceServerException, grpc.RpcError):
                    pass  # the request itself will say what is wrong
            yield {
                "model_name": client.model,
                "inputs": client._inputs_for(url, request),
                "outputs": request.outputs,
                "request_id": uuid.uuid4().hex,
            }

        # the deadline is kept here, not by gRPC: see ChatStream.__init__
        self._call = triton_client.stream_infer(one_request(), headers=client.headers)
        self._responses = self._call.__aiter__()
        self._start_clock()

    async def _next_response(self):
        try:
            if self._deadline is None:
                return await self._responses.__anext__()
            return await asyncio.wait_for(self._responses.__anext__(), self._time_left())
        except asyncio.TimeoutError:
            self.close_now()
            raise self._timed_out() from None
        except StopAsyncIteration:
            self._done = self._closed = True
            raise self._unfinished() from None
        except (InferenceServerException, grpc.RpcError) as exc:
            self.close_now()
            raise self._mapped(exc) from None
        except BaseException:  # asyncio cancellation of the reading task: cancel the request too
            self.close_now()
            raise

    def _is_last(self, result) -> bool:
        return self._accumulator.finished  # the contract's last response; the call then ends by itself

    async def _next_delta(self) -> str | None:
        if self._call is None:
            self._start()
        while not self._done:
            self._raise_if_closed()
            try:
                delta = self._fold(*await self._next_response())
            except MedGemmaError as error:  # the call has ended; maybe another endpoint takes it
                self._next_endpoint(error)
                self._start()
                continue
            if delta:
                return delta
        return None

    async def __aiter__(self):
        try:
            while (delta := await self._next_delta()) is not None:
                yield delta
        finally:
            self.close_now()

    async def final_result(self) -> ChatResult:
        """Read the rest of the stream and return the whole answer (finish_reason "cancelled" if closed early)."""
        if not self._closed:
            try:
                while await self._next_delta() is not None:
                    pass
            finally:
                self.close_now()
        return self._accumulator.result()

    def close_now(self) -> None:
        """Stop reading; if the request is still running, cancel its gRPC call."""
        self._close()

    def _end_call(self, cancel: bool) -> None:
        if cancel and self._call is not None:
            self._call.cancel()

    async def aclose(self) -> None:
        self.close_now()

    async def __aenter__(self) -> "AsyncChatStream":
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close_now()
