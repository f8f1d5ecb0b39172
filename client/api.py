"""`MedGemmaClient` (blocking) and `AsyncMedGemmaClient` (asyncio) for the `medgemma` ensemble.

Both speak gRPC through tritonclient and share one request builder (`build_request`) and one
response parser (`_Accumulator`). The ensemble's llm step is decoupled, so Triton refuses unary
ModelInfer for it: every request, streaming or not, goes over a ModelStreamInfer stream
(`stream=false` just asks the server for one response carrying the whole text).

Cancellation: closing a stream before it finishes (leaving a `for` loop over it, `close()`, leaving
its `with` block, cancelling the task that reads it) cancels the gRPC call; Triton then marks the
request cancelled and a model that checks for cancellation stops generating.
"""

from __future__ import annotations

import codecs
import json
import queue
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from medgemma_triton.client.errors import (
    CancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    MedGemmaError,
    ModelNotReadyError,
    ServerError,
    UnavailableError,
    describe_unavailable,
    from_grpc,
    from_triton,
)
from medgemma_triton.client.images import encode_image
from medgemma_triton.contract import (
    CLIENT_DTYPES,
    ENSEMBLE_INPUTS,
    ENSEMBLE_MODEL,
    ENSEMBLE_OUTPUTS,
    FINISH_CANCELLED,
)

_INPUTS = {t.name: t for t in ENSEMBLE_INPUTS}
_OUTPUT_NAMES = tuple(t.name for t in ENSEMBLE_OUTPUTS)


def _output(name: str) -> str:
    assert name in _OUTPUT_NAMES, f"{name} is not an output of the ensemble contract"
    return name


TEXT_OUTPUT = _output("text_output")
OUTPUT_IDS = _output("output_ids")
FINISH_REASON = _output("finish_reason")
PROMPT_TOKENS = _output("prompt_tokens")
COMPLETION_TOKENS = _output("completion_tokens")

# client keyword -> ensemble input (contract.ENSEMBLE_INPUTS)
SAMPLING_INPUTS = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "random_seed",
    "stop": "stop_words",
}
assert set(SAMPLING_INPUTS.values()) <= set(_INPUTS)

READY_PROBE_TIMEOUT_S = 10.0  # readiness RPCs when the client has no timeout of its own
IMAGE_KEYS = ("image", "path", "url")  # model card: "image"; transformers also reads "path"/"url"


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str  # contract.FINISH_STOP | FINISH_LENGTH | FINISH_CANCELLED
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...]


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

    Images are taken in order; validation is the server's own (runtime.chat.parse_messages), without
    its size limit (that one is the server's to apply).
    """
    from medgemma_triton.runtime.chat import parse_messages
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
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"messages cannot be sent as JSON: {exc}") from None
    try:
        parse_messages(messages_json, Limits(max_messages_bytes=2**62))
    except InvalidRequest as exc:
        raise InvalidArgumentError(str(exc)) from None
    return messages_json, images


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
) -> ChatRequest:
    """The ensemble inputs for one chat request; None leaves a parameter to the server's default."""
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
    outputs = [grpcclient.InferRequestedOutput(name) for name in _OUTPUT_NAMES]
    return ChatRequest(messages_json, images, bool(stream), inputs, outputs)


def _scalar(result, name: str):
    values = result.as_numpy(name)
    if values is None or values.size == 0:
        return None
    return values.reshape(-1)[0]


class _Accumulator:
    """Folds the responses of one request into text deltas and a `ChatResult`."""

    def __init__(self):
        # deltas are whole characters from the server; the incremental decoder only guards byte splits
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self.finish_reason = ""
        self.prompt_tokens = 0
        self.completion_tokens = 0

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason)

    def add(self, result) -> str:
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


@dataclass(frozen=True)
class _Connection:
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


class _ClientBase:
    def __init__(
        self,
        url: str,
        *,
        model: str,
        timeout: float | None,
        ssl: bool,
        root_certificates: str | None,
        private_key: str | None,
        certificate_chain: str | None,
        headers: Mapping[str, str] | None,
    ):
        self.url = url
        self.model = model
        self.timeout = timeout
        self.headers = dict(headers) if headers else None
        self._connection = _Connection(url, ssl, root_certificates, private_key, certificate_chain)

    def _probe_timeout(self, timeout: float | None) -> float:
        return timeout if timeout is not None else (self.timeout if self.timeout is not None else READY_PROBE_TIMEOUT_S)

    def _request_timeout(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout

    def _error(self, exc) -> MedGemmaError:
        """A tritonclient/gRPC failure as a MedGemmaError that names this server where it helps."""
        error = from_triton(exc) if isinstance(exc, InferenceServerException) else from_grpc(exc)
        if isinstance(error, UnavailableError):
            return UnavailableError(describe_unavailable(self.url, error.message))
        return error

    def _readiness_error(self, live: bool, ready: bool) -> MedGemmaError | None:
        if not live:
            return UnavailableError(f"the server at {self.url} is not live")
        if not ready:
            return ModelNotReadyError(f"model {self.model} is not ready")
        return None


class MedGemmaClient(_ClientBase):
    """Blocking client. Thread-safe: concurrent requests each use their own gRPC stream.

    `timeout` (seconds) is the default for each whole request; `root_certificates`, `private_key`
    and `certificate_chain` are PEM file paths (TLS when `ssl=True`); `headers` go with every call.
    """

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        *,
        model: str = ENSEMBLE_MODEL,
        timeout: float | None = None,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(
            url,
            model=model,
            timeout=timeout,
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            headers=headers,
        )
        self._lock = threading.Lock()
        self._closed = False
        # tritonclient allows one stream per client object: keep idle ones for reuse, one per concurrent call
        self._idle = [self._new_triton_client()]  # built now, so bad TLS files fail here

    def _new_triton_client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(**self._connection.triton_kwargs())

    def _acquire(self) -> grpcclient.InferenceServerClient:
        with self._lock:
            if self._closed:
                raise MedGemmaError("the client is closed")
            if self._idle:
                return self._idle.pop()
        return self._new_triton_client()

    def _release(self, triton_client) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(triton_client)
                return
        triton_client.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for triton_client in idle:
            triton_client.close()

    def __enter__(self) -> "MedGemmaClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def check_ready(self, timeout: float | None = None) -> None:
        """Raise UnavailableError / ModelNotReadyError unless the server is live and the model ready."""
        triton_client = self._acquire()
        probe = self._probe_timeout(timeout)
        try:
            live = triton_client.is_server_live(headers=self.headers, client_timeout=probe)
            ready = live and triton_client.is_model_ready(self.model, headers=self.headers, client_timeout=probe)
        except InferenceServerException as exc:
            raise self._error(exc) from None
        finally:
            self._release(triton_client)
        error = self._readiness_error(live, ready)
        if error is not None:
            raise error

    def is_ready(self, timeout: float | None = None) -> bool:
        try:
            self.check_ready(timeout)
        except MedGemmaError:
            return False
        return True

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> None:
        """Poll until the model is ready; after `timeout` seconds raise the last readiness error."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                self.check_ready(timeout=max(min(remaining, READY_PROBE_TIMEOUT_S), 0.1))
                return
            except MedGemmaError as exc:
                if time.monotonic() + interval > deadline:
                    raise type(exc)(f"{exc} (waited {timeout:g} s)") from None
            time.sleep(interval)

    def stream_chat(self, messages, *, timeout: float | None = None, **sampling) -> "ChatStream":
        """Start one streaming request; iterate the returned stream for text deltas.

        sampling: max_tokens, temperature, top_p, top_k, seed, stop (None: the server's default).
        Use it as a context manager (or iterate it to the end) so an abandoned stream is cancelled.
        """
        return self.send(build_request(messages, stream=True, **sampling), timeout=timeout)

    def chat(self, messages, *, timeout: float | None = None, **sampling) -> ChatResult:
        """One request, the whole answer: a `ChatResult`.

        Asks the server to stream and joins the deltas: a streamed request stops generating as soon as
        it is cancelled (timeout, Ctrl-C), where the tritonserver 2.51 pipeline finishes a `stream=false`
        one regardless (measured: it generated on after cancellation); the text is the same either way.
        """
        with self.send(build_request(messages, stream=True, **sampling), timeout=timeout) as stream:
            return stream.final_result()

    def send(self, request: ChatRequest, *, timeout: float | None = None) -> "ChatStream":
        """Start a request prepared by `build_request` (validated, images encoded) and return its stream."""
        return ChatStream(self, request, self._request_timeout(timeout))


class ChatStream:
    """Text deltas of one request, in order, as an iterator; `final_result()` once it has finished."""

    def __init__(self, client: MedGemmaClient, request: ChatRequest, timeout: float | None):
        self._client = client
        self._accumulator = _Accumulator()
        self._responses: queue.SimpleQueue = queue.SimpleQueue()
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._done = False
        self._closed = False
        self._triton = client._acquire()
        try:
            # No gRPC deadline: Triton 2.51 does not cancel a request whose stream deadline passed (it
            # generates on). The client keeps the deadline itself and cancels the request explicitly.
            self._triton.start_stream(self._on_response, headers=client.headers)
            self._triton.async_stream_infer(
                client.model,
                request.inputs,
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
            raise client._error(reported or exc) from None

    def _on_response(self, result, error) -> None:  # tritonclient's stream thread
        self._responses.put((result, error))

    def _next_response(self):
        if self._deadline is None:
            return self._responses.get()
        try:
            return self._responses.get(timeout=max(self._deadline - time.monotonic(), 0.0))
        except queue.Empty:
            self.close()  # cancels the request on the server
            raise DeadlineExceededError(f"no complete answer within {self._timeout:g} s") from None

    def _next_delta(self) -> str | None:
        while not self._done:
            if self._closed:
                raise CancelledError("the stream was closed before it finished")
            result, error = self._next_response()
            if error is not None:
                self.close()
                mapped = self._client._error(error)
                if isinstance(mapped, DeadlineExceededError):
                    mapped = DeadlineExceededError(f"no complete answer within {self._timeout:g} s ({mapped})")
                raise mapped
            delta = self._accumulator.add(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                self._done = True
                self.close()
                if not self._accumulator.finished:
                    raise ServerError("the server ended the response without a finish_reason")
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

    @property
    def result(self) -> ChatResult | None:
        """The whole answer once the stream has finished or been closed; None while it runs."""
        return self._accumulator.result() if self._closed else None

    def close(self) -> None:
        """Stop reading; if the request is still running, cancel it."""
        if self._closed:
            return
        self._closed = True
        cancel = not self._done
        if cancel:
            self._accumulator.cancel()
        try:
            self._triton.stop_stream(cancel_requests=cancel)
        finally:
            self._client._release(self._triton)

    def __enter__(self) -> "ChatStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()


class AsyncMedGemmaClient(_ClientBase):
    """asyncio client over tritonclient.grpc.aio: one channel, any number of concurrent streams.

    Use it from one event loop (its gRPC channel is created on first use, in that loop).
    """

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        *,
        model: str = ENSEMBLE_MODEL,
        timeout: float | None = None,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(
            url,
            model=model,
            timeout=timeout,
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            headers=headers,
        )
        self._triton = None

    def _triton_client(self):
        if self._triton is None:
            import tritonclient.grpc.aio as grpcclient_aio

            self._triton = grpcclient_aio.InferenceServerClient(**self._connection.triton_kwargs())
        return self._triton

    async def close(self) -> None:
        if self._triton is not None:
            triton_client, self._triton = self._triton, None
            await triton_client.close()

    async def __aenter__(self) -> "AsyncMedGemmaClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def check_ready(self, timeout: float | None = None) -> None:
        import grpc

        triton_client = self._triton_client()
        probe = self._probe_timeout(timeout)
        try:
            live = await triton_client.is_server_live(headers=self.headers, client_timeout=probe)
            ready = live and await triton_client.is_model_ready(self.model, headers=self.headers, client_timeout=probe)
        except (InferenceServerException, grpc.RpcError) as exc:
            raise self._error(exc) from None
        error = self._readiness_error(live, ready)
        if error is not None:
            raise error

    async def is_ready(self, timeout: float | None = None) -> bool:
        try:
            await self.check_ready(timeout)
        except MedGemmaError:
            return False
        return True

    async def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5) -> None:
        import asyncio

        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                await self.check_ready(timeout=max(min(remaining, READY_PROBE_TIMEOUT_S), 0.1))
                return
            except MedGemmaError as exc:
                if time.monotonic() + interval > deadline:
                    raise type(exc)(f"{exc} (waited {timeout:g} s)") from None
            await asyncio.sleep(interval)

    def stream_chat(self, messages, *, timeout: float | None = None, **sampling) -> "AsyncChatStream":
        """`async for delta in client.stream_chat(...)`; use `async with` so an abandoned stream is cancelled."""
        return self.send(build_request(messages, stream=True, **sampling), timeout=timeout)

    async def chat(self, messages, *, timeout: float | None = None, **sampling) -> ChatResult:
        """One request, the whole answer (streamed from the server, as MedGemmaClient.chat explains)."""
        async with self.send(build_request(messages, stream=True, **sampling), timeout=timeout) as stream:
            return await stream.final_result()

    def send(self, request: ChatRequest, *, timeout: float | None = None) -> "AsyncChatStream":
        """Start a request prepared by `build_request`; the call begins on the first read."""
        return AsyncChatStream(self, request, self._request_timeout(timeout))


class AsyncChatStream:
    """Async iterator of text deltas for one request; `await final_result()` for the whole answer."""

    def __init__(self, client: AsyncMedGemmaClient, request: ChatRequest, timeout: float | None):
        self._client = client
        self._request = request
        self._timeout = timeout
        self._accumulator = _Accumulator()
        self._call = None
        self._responses = None
        self._done = False
        self._closed = False

    def _start(self) -> None:
        request = self._request

        async def one_request():
            yield {
                "model_name": self._client.model,
                "inputs": request.inputs,
                "outputs": request.outputs,
                "request_id": uuid.uuid4().hex,
            }

        # the deadline is kept here, not by gRPC: see ChatStream.__init__
        self._call = self._client._triton_client().stream_infer(one_request(), headers=self._client.headers)
        self._responses = self._call.__aiter__()
        self._deadline = None if self._timeout is None else time.monotonic() + self._timeout

    async def _next_delta(self) -> str | None:
        import asyncio

        import grpc

        if self._call is None:
            self._start()
        while not self._done:
            if self._closed:
                raise CancelledError("the stream was closed before it finished")
            try:
                if self._deadline is None:
                    result, error = await self._responses.__anext__()
                else:
                    remaining = max(self._deadline - time.monotonic(), 0.0)
                    result, error = await asyncio.wait_for(self._responses.__anext__(), remaining)
            except asyncio.TimeoutError:
                self.close_now()
                raise DeadlineExceededError(f"no complete answer within {self._timeout:g} s") from None
            except StopAsyncIteration:
                self._done = True
                self._closed = True
                raise ServerError("the server ended the response without a finish_reason") from None
            except (InferenceServerException, grpc.RpcError) as exc:
                self.close_now()
                raise self._mapped(exc) from None
            except BaseException:  # asyncio cancellation of the reading task: cancel the request too
                self.close_now()
                raise
            if error is not None:
                self.close_now()
                raise self._mapped(error)
            delta = self._accumulator.add(result)
            if self._accumulator.finished:  # the contract's last response; the call then ends by itself
                self._done = True
                self._closed = True
            if delta:
                return delta
        return None

    def _mapped(self, exc) -> MedGemmaError:
        error = self._client._error(exc)
        if isinstance(error, DeadlineExceededError):
            return DeadlineExceededError(f"no complete answer within {self._timeout:g} s ({error})")
        return error

    async def __aiter__(self):
        try:
            while (delta := await self._next_delta()) is not None:
                yield delta
        finally:
            self.close_now()

    async def final_result(self) -> ChatResult:
        """Read the rest of the stream and return the whole answer (finish_reason "cancelled" if closed early)."""
        if self._closed:
            return self._accumulator.result()
        try:
            while await self._next_delta() is not None:
                pass
        finally:
            self.close_now()
        return self._accumulator.result()

    @property
    def result(self) -> ChatResult | None:
        return self._accumulator.result() if self._closed else None

    def close_now(self) -> None:
        """Stop reading; if the request is still running, cancel its gRPC call."""
        if self._closed:
            return
        self._closed = True
        if not self._done:
            self._accumulator.cancel()
            if self._call is not None:
                self._call.cancel()

    async def aclose(self) -> None:
        self.close_now()

    async def __aenter__(self) -> "AsyncChatStream":
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.close_now()
