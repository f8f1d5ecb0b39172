"""The `medgemma` model: preprocessing -> vision_encoder (with images) -> llm -> text, driven through BLS.

Data flows one way. The request's images become pixel values in `preprocessing`, image embeddings in
`vision_encoder` (called from here, only for requests with images, in batches of its max_batch_size;
concurrent requests' images batch together there), and the `llm` gets token ids and embeddings and
answers with token ids only. A request with more images than one vision batch (a CT volume sends
85) asks `preprocessing` for its prompt first, then for one batch of pixel values at a time, each
encoded before the next is decoded: only one batch's pixels exist at once. Their text is decoded
once, here (serving/text.py), where the stop words are applied: a stop word ends the client's
response at once and stops the llm request by id. A request with stop words therefore always
streams from the llm to this model, so that the llm learns early that it may stop.

Every BLS call here is answered by one response: the llm's stream comes as answers to `poll`
requests, one after another (serving/polled.py says why: Triton 2.51's Python backend can deadlock
a process that waits on a decoupled BLS stream while it makes other decoupled BLS calls).

Why BLS and not `platform: "ensemble"`: in Triton 2.51 (the nvidia-pytriton wheel) cancelling an
ensemble request stops the ensemble from scheduling further steps but never reaches the request
in flight inside a composing decoupled model, so the llm would keep generating for a client that
has gone (measured: see tests/test_serving.py::test_cancelled_stream_stops_generating). A decoupled
Python model sees its own cancellation; it then tells the llm to stop that request with a `stop`
request carrying the same request id - the protocol of TensorRT-LLM's `tensorrt_llm_bls` model.

Deadlines: a request's timeout_ms counts from its arrival here and holds at every wait. What is left
of it goes to preprocessing (which decodes no image after it and answers finish_reason "timeout"),
to each vision_encoder call (checked before the call, and as the BLS request's timeout in Triton's
queue: vision_encoder's queue policy rejects it there) and to the llm (whose queue and generation
stop at it). A request whose deadline passes before generation gets finish_reason "timeout" and no text.

The wiring below is data: repository.config.validate_configs checks it against every model's config.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from medgemma_triton import contract
from medgemma_triton.contract import (  # the internal contract: what the models say to each other
    IMAGE_OFFSET_INPUT,
    INPUT_IDS,
    LLM_OUTPUTS,
    LLM_POLL_INPUT,
    LLM_REQUEST_INPUTS,
    LLM_STOP_INPUT,
    LLM_STOP_REASON_INPUT,
    LLM_STREAM_INPUT,
    PIXELS_INPUT,
    PREPROCESSING_FINISH_OUTPUT,
    PREPROCESSING_INPUTS,
    PREPROCESSING_OUTPUTS,
    TIMEOUT_INPUT,
    VISION_INPUT,
    VISION_OUTPUT,
)
from medgemma_triton.serving.parameters import MedgemmaParameters
from medgemma_triton.serving.text import SequenceText
from medgemma_triton.serving.triton_io import int32_tensor, string_tensor

log = logging.getLogger(__name__)

# top-level input -> the steps that read it

CANCEL_POLL_S = 0.05


class ClientSender:
    """A `medgemma` request's response sender, shared by its worker thread and its cancellation watcher.

    Triton 2.51's Python backend frees the response factory when the final response is sent, and an
    is_cancelled() after that reads freed memory (tritonserver dies with SIGSEGV in
    TRITONBACKEND_ResponseFactoryIsCancelled). A lock orders the two; after the final response
    nothing is asked or sent.
    """

    def __init__(self, pb, sender):
        self.pb = pb
        self._sender = sender
        self._lock = threading.Lock()
        self._finished = False

    def is_cancelled(self) -> bool:
        """True when the client cancelled before the final response (False after it)."""
        with self._lock:
            return not self._finished and self._sender.is_cancelled()

    def send(self, response=None, final: bool = False) -> None:
        with self._lock:
            if self._finished:
                return
            flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
            if response is None:
                self._sender.send(flags=flags)
            else:
                self._sender.send(response, flags=flags)
            self._finished = final


class Pipeline:
    """One instance per `medgemma` model instance; every request runs on its own worker thread."""

    def __init__(self, pb, tokenizer, parameters: MedgemmaParameters | None = None, in_flight_gauge=None):
        """parameters: the model's config.pbtxt parameters (serving/parameters.py). in_flight_gauge: where
        the count of requests in flight is published (set(n)), for serve's drain."""
        parameters = parameters or MedgemmaParameters()
        self.pb = pb
        self.tokenizer = tokenizer
        self.vision_batch = parameters.vision_max_batch_size
        self.max_concurrent_requests = parameters.max_concurrent_requests
        self._workers = ThreadPoolExecutor(self.max_concurrent_requests, thread_name_prefix="medgemma-request")
        self._in_flight = 0
        self._in_flight_changed = threading.Condition()
        self._in_flight_gauge = in_flight_gauge
        self._publish_lock = threading.Lock()
        self._stopping = False

    def submit(self, request) -> None:
        received = time.monotonic()
        sender = ClientSender(self.pb, request.get_response_sender())
        with self._in_flight_changed:
            stopping = self._stopping
            busy = self._in_flight >= self.max_concurrent_requests
            if not busy and not stopping:
                self._count_in_flight(+1)
        if stopping:
            sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(
                f"{contract.SERVER_STOPPING_PREFIX}this server is shutting down; send the request to another replica")),
                final=True)
            return
        if busy:  # no unbounded queue of waiting threads: refuse now, the client may retry elsewhere
            sender.send(self.pb.InferenceResponse(error=self.pb.TritonError(
                f"{contract.SERVER_BUSY_PREFIX}{self.max_concurrent_requests} requests in flight, the limit "
                "(max_concurrent_requests of the medgemma model); retry later")), final=True)
            return
        # Triton releases the request when execute() returns: copy its inputs out now.
        tensors = {}
        for name in _TOP_INPUT_NAMES:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                tensors[name] = self.pb.Tensor(name, tensor.as_numpy().copy())
        self._workers.submit(self._run_guarded, sender, tensors, received)

    def shutdown(self, drain_timeout_s: float = 0.0) -> bool:
        """Refuse new requests, let those in flight finish for up to `drain_timeout_s`, then stop the
        workers; True if none was left in flight."""
        deadline = time.monotonic() + drain_timeout_s
        with self._in_flight_changed:
            self._stopping = True
            while self._in_flight and time.monotonic() < deadline:
                self._in_flight_changed.wait(deadline - time.monotonic())
            drained = not self._in_flight
        self._workers.shutdown(wait=False, cancel_futures=True)
        return drained

    def _count_in_flight(self, change: int) -> None:
        """Called holding _in_flight_changed; the gauge is published by _publish_in_flight, outside it."""
        self._in_flight += change
        self._in_flight_changed.notify_all()

    def _publish_in_flight(self) -> None:
        # A metric update is a round trip to the server: never made holding the lock execute() takes.
        if self._in_flight_gauge is not None:
            with self._publish_lock:  # the value read inside it: the last one published is the latest
                self._in_flight_gauge.set(self._in_flight)

    def _run_guarded(self, sender, tensors, received: float) -> None:
        self._publish_in_flight()  # on this worker thread: execute() makes no metric round trip
        try:
            self._run(sender, tensors, received)
        except Exception:  # noqa: BLE001 - report, keep serving the others
            log.exception("medgemma pipeline failed")
            self._fail(sender, "the medgemma pipeline failed on the server (an internal error, in its log)",
                       self.pb.TritonError.INTERNAL)
        finally:
            with self._in_flight_changed:
                self._count_in_flight(-1)
            self._publish_in_flight()

    def _fail(self, sender, message: str, code) -> None:
        pb = self.pb
        if code == pb.TritonError.INVALID_ARG and not message.startswith(contract.INVALID_ARGUMENT_PREFIX):
            message = contract.INVALID_ARGUMENT_PREFIX + message
        sender.send(pb.InferenceResponse(error=pb.TritonError(message, code)), final=True)

    def _forward_error(self, sender, response) -> None:
        error = response.error()
        self._fail(sender, error.message(), error.code())

    def _run(self, sender, tensors, received: float) -> None:
        pb = self.pb
        deadline = None
        if TIMEOUT_INPUT in tensors:
            deadline = received + int(tensors[TIMEOUT_INPUT].as_numpy().reshape(-1)[0]) / 1e3
        images = tensors["images"].as_numpy().reshape(-1) if "images" in tensors else np.zeros(0, dtype=object)
        pre_inputs = [tensors[n] for n in PREPROCESSING_INPUTS if n in tensors]
        batched = len(images) > self.vision_batch  # more than one vision batch: the pixels come a batch at a time
        if batched:  # the prompt only
            pre_inputs.append(pb.Tensor(PIXELS_INPUT, np.array([False])))
        pre = self._preprocess(pre_inputs, deadline)
        if pre.has_error():
            self._forward_error(sender, pre)
            return
        if sender.is_cancelled():
            sender.send(final=True)
            return
        input_ids = pb.get_output_tensor_by_name(pre, INPUT_IDS)
        prompt_tokens = len(input_ids.as_numpy().reshape(-1))
        if _preprocessing_timed_out(pb, pre):
            self._timed_out(sender, prompt_tokens)
            return
        llm_inputs = [input_ids]
        if len(images):
            pixel_values = None if batched else pb.get_output_tensor_by_name(pre, VISION_INPUT)
            embeddings = self._encode_images(sender, images, pixel_values, deadline, prompt_tokens)
            if embeddings is None:  # failed or timed out (the client has its answer), or cancelled
                return
            llm_inputs.append(embeddings)

        stop_words = _strings(tensors.get("stop_words"))
        client_streams = bool(tensors["stream"].as_numpy().reshape(-1)[0]) if "stream" in tensors else False
        llm_inputs += [tensors[n] for n in LLM_REQUEST_INPUTS if n in tensors]
        llm_inputs.append(pb.Tensor(LLM_STREAM_INPUT, np.array([client_streams or bool(stop_words)])))
        if deadline is not None:
            if _expired(deadline):  # spent before generation began (queues, images): nothing generated
                self._timed_out(sender, prompt_tokens)
                return
            llm_inputs.append(_timeout_tensor(pb, deadline))

        request_id = uuid.uuid4().hex
        # exec() returns only once the llm's first answer has arrived - with stream=false that is the
        # whole generation - so the watcher must be running before it.
        # A stop that reaches the llm before the request does is kept there until the request comes.
        done = threading.Event()
        watcher = threading.Thread(
            target=self._watch_cancellation, args=(sender, request_id, done), name="medgemma-cancel", daemon=True
        )
        watcher.start()
        try:
            first = self._llm_answer(llm_inputs, request_id)
            self._relay(sender, first, SequenceText(self.tokenizer, stop_words), client_streams, request_id)
        finally:
            done.set()

    def _llm_answer(self, inputs, request_id: str):
        """The llm's one answer to a request (a generation, or a poll for its next tokens); None for an
        empty one (the generation was stopped)."""
        return _only_response(self.pb.InferenceRequest(
            model_name=contract.LLM_MODEL, inputs=inputs, requested_output_names=list(LLM_OUTPUTS),
            request_id=request_id,
        ).exec(decoupled=True))

    def _next_answer(self, request_id: str):
        return self._llm_answer([self.pb.Tensor(LLM_POLL_INPUT, np.array([True]))], request_id)

    def _relay(self, sender, response, text: SequenceText, client_streams: bool, request_id: str) -> None:
        """The llm's answers (the first, then polls) -> the client's text responses (one at the end
        unless it streams)."""
        pb = self.pb
        held_ids: list[int] = []  # ids not yet sent to a client that does not stream
        while response is not None:  # None: the llm's empty last answer (the request was stopped)
            if response.has_error():
                self._forward_error(sender, response)
                return
            get = lambda name: pb.get_output_tensor_by_name(response, name).as_numpy().reshape(-1)  # noqa: E731
            reason = get("finish_reason")[0]
            reason = reason.decode("utf-8") if isinstance(reason, bytes) else str(reason)
            llm_finished = bool(reason)
            for token in get("output_ids").tolist():
                held_ids.append(token)
                if text.add(token):
                    reason = contract.FINISH_STOP
                    break
            if reason:
                text.finish()
            if client_streams or reason:
                self._respond(sender, text.take_text(), held_ids, reason, int(get("prompt_tokens")[0]), len(text.ids))
                held_ids = []
            if reason:
                if not llm_finished:  # a stop word: the llm is still generating
                    self._stop_llm(request_id, contract.FINISH_STOP)
                    self._drain(request_id)
                return
            response = self._next_answer(request_id)
        sender.send(final=True)  # stopped without a finish reason

    def _drain(self, request_id: str) -> None:
        """Poll a stopped llm request to its last answer, so that the llm forgets it."""
        while (response := self._next_answer(request_id)) is not None and not response.has_error():
            reason = self.pb.get_output_tensor_by_name(response, "finish_reason").as_numpy().reshape(-1)[0]
            if reason:
                return

    def _respond(self, sender, text: str, ids: list[int], reason: str, prompt_tokens: int, completion_tokens: int):
        """One response to the client; the final one when `reason` is set."""
        pb = self.pb
        outputs = [
            string_tensor(pb, "text_output", text),
            pb.Tensor("output_ids", np.asarray(ids, dtype=np.int64)),
            string_tensor(pb, "finish_reason", reason),
            int32_tensor(pb, "prompt_tokens", prompt_tokens),
            int32_tensor(pb, "completion_tokens", completion_tokens),
        ]
        # Asked per response, not only by the watcher: without this round trip between sends,
        # concurrent streams crashed Triton 2.51's Python stub for this model (docs/design.md, the
        # Python-stub hazards). A process-wide lock around every send did not prevent it.
        if not sender.is_cancelled():
            sender.send(pb.InferenceResponse(output_tensors=outputs), final=bool(reason))

    def _timed_out(self, sender, prompt_tokens: int) -> None:
        """The deadline passed before generation began: finish_reason "timeout", no text."""
        self._respond(sender, "", [], contract.FINISH_TIMEOUT, prompt_tokens, 0)

    def _preprocess(self, inputs: list, deadline: float | None):
        """preprocessing's one answer (it answers each request once, with the final flag)."""
        if deadline is not None:
            inputs = inputs + [_timeout_tensor(self.pb, deadline)]
        return _only_response(self.pb.InferenceRequest(
            model_name=contract.PREPROCESSING_MODEL, inputs=inputs, requested_output_names=list(PREPROCESSING_OUTPUTS),
        ).exec(decoupled=True))

    def _encode_images(self, sender, images: np.ndarray, pixel_values, deadline: float | None, prompt_tokens: int):
        """The request's encoded images -> the `image_embeddings` tensor for the llm. `pixel_values`: all
        of them, when preprocessing decoded them with the prompt (one vision batch or fewer); None:
        one batch at a time, preprocessing decodes a batch, vision_encoder encodes it, and its pixels
        are gone before the next batch is decoded. None when the request ended here (an image or
        vision_encoder failed, the deadline passed, or the client cancelled: nothing more is decoded or encoded)."""
        pb = self.pb
        count = len(images)
        embeddings = None  # [count, tokens, hidden], filled a batch at a time
        for start in range(0, count, self.vision_batch):
            if _expired(deadline):
                self._timed_out(sender, prompt_tokens)
                return None
            if pixel_values is None:
                if sender.is_cancelled():
                    sender.send(final=True)
                    return None
                pre = self._preprocess([pb.Tensor("images", images[start : start + self.vision_batch]),
                                        pb.Tensor(IMAGE_OFFSET_INPUT, np.array([start], np.int32))], deadline)
                if pre.has_error():
                    self._forward_error(sender, pre)
                    return None
                if _preprocessing_timed_out(pb, pre):
                    self._timed_out(sender, prompt_tokens)
                    return None
                batch = pb.get_output_tensor_by_name(pre, VISION_INPUT)  # a host tensor: preprocessing runs on CPU
            else:
                batch = pixel_values  # one vision batch or fewer: passed on as it is, without a copy
            # The BLS timeout (microseconds) bounds its wait in vision_encoder's queue (its queue policy).
            timeout_us = 0 if deadline is None else max(1, int((deadline - time.monotonic()) * 1e6))
            response = pb.InferenceRequest(
                model_name=contract.VISION_ENCODER_MODEL, inputs=[batch], requested_output_names=[VISION_OUTPUT],
                timeout=timeout_us,
            ).exec()
            if response.has_error():
                if _expired(deadline):  # rejected from the queue at its deadline (or failed after it)
                    self._timed_out(sender, prompt_tokens)
                else:
                    self._forward_error(sender, response)
                return None
            part = pb.get_output_tensor_by_name(response, VISION_OUTPUT)
            if count <= self.vision_batch:  # as vision_encoder returned it (on the gpu profile it may live on the GPU)
                embeddings = part
                break
            part = _host_array(part)
            if embeddings is None:
                embeddings = np.empty((count, *part.shape[1:]), dtype=part.dtype)
            embeddings[start : start + len(part)] = part
        if sender.is_cancelled():
            sender.send(final=True)
            return None
        return embeddings if count <= self.vision_batch else pb.Tensor(VISION_OUTPUT, embeddings)

    def _watch_cancellation(self, sender, request_id: str, done: threading.Event) -> None:
        while not done.wait(CANCEL_POLL_S):
            if sender.is_cancelled():
                self._stop_llm(request_id, contract.FINISH_CANCELLED)
                return

    def _stop_llm(self, request_id: str, reason: str) -> None:
        pb = self.pb
        stop = pb.InferenceRequest(
            model_name=contract.LLM_MODEL,
            inputs=[pb.Tensor(LLM_STOP_INPUT, np.array([True])), string_tensor(pb, LLM_STOP_REASON_INPUT, reason)],
            requested_output_names=[],
            request_id=request_id,
        )
        for response in stop.exec(decoupled=True):
            if response.has_error():
                log.warning("stopping an llm request failed: %s", response.error().message())


def _preprocessing_timed_out(pb, response) -> bool:
    """True when preprocessing answered finish_reason "timeout" (the deadline passed before its images)."""
    return _strings(pb.get_output_tensor_by_name(response, PREPROCESSING_FINISH_OUTPUT)) == [contract.FINISH_TIMEOUT]


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _timeout_tensor(pb, deadline: float):
    """What is left of the request's timeout_ms, for the next model (0 when none is left)."""
    left_ms = max(0, int((deadline - time.monotonic()) * 1e3))
    return pb.Tensor(TIMEOUT_INPUT, np.array([left_ms], dtype=np.uint64))


def _only_response(responses):
    """The one response of a decoupled model that answers each request once (with or before its final flag)."""
    answer = None
    for response in responses:
        if answer is None and (response.has_error() or response.output_tensors()):
            answer = response
    return answer


def _host_array(tensor) -> np.ndarray:
    if tensor.is_cpu():
        return tensor.as_numpy()
    import torch  # device tensors come only from the gpu profile's vision engine; its container has torch

    return torch.from_dlpack(tensor.to_dlpack()).cpu().numpy()


def _strings(tensor) -> list[str]:
    """A STRING tensor (preprocessing has validated it) as str values; [] when absent."""
    if tensor is None:
        return []
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1).tolist()]


_TOP_INPUT_NAMES = tuple(t.name for t in contract.TOP_INPUTS)
