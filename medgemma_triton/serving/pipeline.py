"""The `medgemma` model: preprocessing -> llm (-> vision_encoder) -> postprocessing, driven through BLS.

Detokenization: by default (`detokenize: "pipeline"`) each llm response's text is rendered here, with
the same function the `postprocessing` model runs (serving.text.render), saving a BLS round trip per
generated token. Measured on a 2-core host (benchmarks/overhead.py, int4 dev, concurrency 1) the saving
was inside the noise: 7.2% vs 7.6% served overhead. `detokenize: "postprocessing"` calls the model
instead, as TensorRT-LLM's `tensorrt_llm_bls` does; the `postprocessing` model is served either way.

Why BLS and not `platform: "ensemble"`: in Triton 2.51 (the nvidia-pytriton wheel) cancelling an
ensemble request stops the ensemble from scheduling further steps but never reaches the request
in flight inside a composing decoupled model, so the llm would keep generating for a client that
has gone (measured: see tests/test_serving.py::test_cancelled_stream_stops_generating). A decoupled
Python model sees its own cancellation; it then tells the llm to stop that request with a `stop`
request carrying the same request id - the protocol of TensorRT-LLM's `tensorrt_llm_bls` model.

The wiring below is data: repository.validate_configs checks it against every model's config.
"""

from __future__ import annotations

import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from medgemma_triton import contract
from medgemma_triton.serving.text import render
from medgemma_triton.serving.triton_io import string_tensor, text_window

log = logging.getLogger(__name__)

# ensemble input -> the steps that read it
PREPROCESSING_INPUTS = (
    "text_input", "messages", "images", "max_tokens", "temperature", "top_p", "top_k", "random_seed", "stop_words",
)
LLM_REQUEST_INPUTS = ("max_tokens", "temperature", "top_p", "top_k", "random_seed", "stop_words", "stream")
PREPROCESSING_TO_LLM = ("input_ids", "pixel_values")
LLM_TO_POSTPROCESSING = ("window_ids", "read_offset", "text_offset", "text_chars")
LLM_TO_CLIENT = ("output_ids", "finish_reason", "prompt_tokens", "completion_tokens")
POSTPROCESSING_TO_CLIENT = ("text_output",)
LLM_STOP_INPUT = "stop"  # BOOL [1]: stop the llm request with this request id

CANCEL_POLL_S = 0.05
DETOKENIZE_CHOICES = ("pipeline", "postprocessing")


def detokenize_setting(parameters: dict[str, str]) -> str:
    """The `medgemma` config's `detokenize` parameter, checked ("pipeline" when unset)."""
    where = parameters.get("detokenize", "") or "pipeline"
    if where not in DETOKENIZE_CHOICES:
        raise ValueError(f"medgemma/config.pbtxt parameter detokenize={where!r}; expected one of {DETOKENIZE_CHOICES}")
    return where


def detokenize_here(parameters: dict[str, str]) -> bool:
    """True to render text in this model (detokenize=pipeline), which needs the checkpoint's tokenizer."""
    where = detokenize_setting(parameters)
    if where == "pipeline" and not parameters.get("checkpoint"):
        raise ValueError(
            "medgemma/config.pbtxt has no `checkpoint` parameter, which detokenize=pipeline needs: "
            "build the repository with `medgemma-triton build`"
        )
    return where == "pipeline"


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

    def __init__(self, pb, max_concurrent_requests: int = 64, tokenizer=None):
        """tokenizer: render text here (serving.text.render); None: call the postprocessing model."""
        self.pb = pb
        self.tokenizer = tokenizer
        self._workers = ThreadPoolExecutor(max_concurrent_requests, thread_name_prefix="medgemma-request")

    def submit(self, request) -> None:
        # Triton releases the request when execute() returns: copy its inputs out now.
        sender = ClientSender(self.pb, request.get_response_sender())
        tensors = {}
        for name in _ENSEMBLE_INPUT_NAMES:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                tensors[name] = self.pb.Tensor(name, tensor.as_numpy().copy())
        self._workers.submit(self._run_guarded, sender, tensors)

    def shutdown(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

    def _run_guarded(self, sender, tensors) -> None:
        try:
            self._run(sender, tensors)
        except Exception as exc:  # noqa: BLE001 - report, keep serving the others
            log.exception("medgemma pipeline failed")
            self._fail(sender, f"the medgemma pipeline failed: {type(exc).__name__}: {exc}", self.pb.TritonError.INTERNAL)

    def _fail(self, sender, message: str, code) -> None:
        pb = self.pb
        if code == pb.TritonError.INVALID_ARG and not message.startswith(contract.INVALID_ARGUMENT_PREFIX):
            message = contract.INVALID_ARGUMENT_PREFIX + message
        sender.send(pb.InferenceResponse(error=pb.TritonError(message, code)), final=True)

    def _forward_error(self, sender, response) -> None:
        error = response.error()
        self._fail(sender, error.message(), error.code())

    def _run(self, sender, tensors) -> None:
        pb = self.pb
        pre = pb.InferenceRequest(
            model_name=contract.PREPROCESSING_MODEL,
            inputs=[tensors[n] for n in PREPROCESSING_INPUTS if n in tensors],
            requested_output_names=list(PREPROCESSING_TO_LLM),
        ).exec()
        if pre.has_error():
            self._forward_error(sender, pre)
            return
        if sender.is_cancelled():
            sender.send(final=True)
            return

        request_id = uuid.uuid4().hex
        llm_inputs = [pb.get_output_tensor_by_name(pre, n) for n in PREPROCESSING_TO_LLM]
        llm_inputs += [tensors[n] for n in LLM_REQUEST_INPUTS if n in tensors]
        # exec(decoupled=True) returns only once the llm's first response has arrived - with
        # stream=false that is the whole generation - so the watcher must be running before it.
        # A stop that reaches the llm before the request does is kept there until the request comes.
        done = threading.Event()
        watcher = threading.Thread(
            target=self._watch_cancellation, args=(sender, request_id, done), name="medgemma-cancel", daemon=True
        )
        watcher.start()
        try:
            responses = pb.InferenceRequest(
                model_name=contract.LLM_MODEL,
                inputs=llm_inputs,
                requested_output_names=list(LLM_TO_POSTPROCESSING + LLM_TO_CLIENT),
                request_id=request_id,
            ).exec(decoupled=True)
            for response in responses:
                if response.has_error():
                    self._forward_error(sender, response)
                    return
                if not response.output_tensors():  # the llm's empty final response
                    break
                text = self._postprocess(response)
                if text is None:
                    return
                outputs = [text] + [pb.get_output_tensor_by_name(response, n) for n in LLM_TO_CLIENT]
                finish_reason = pb.get_output_tensor_by_name(response, "finish_reason").as_numpy().reshape(-1)[0]
                final = bool(finish_reason)
                # Asked per response, not only by the watcher: without this round trip between sends,
                # concurrent streams crashed Triton 2.51's Python stub for this model (glibc "malloc():
                # unaligned tcache chunk detected": in 2 of 2 runs of at most 150 requests at concurrency
                # 4; with it, none in 320). A process-wide lock around every send did not prevent it.
                if not sender.is_cancelled():
                    sender.send(pb.InferenceResponse(output_tensors=outputs), final=final)
                if final:
                    return
            sender.send(final=True)  # stopped without a finish reason
        finally:
            done.set()

    def _postprocess(self, llm_response):
        pb = self.pb
        if self.tokenizer is not None:
            window = text_window(lambda name: pb.get_output_tensor_by_name(llm_response, name).as_numpy())
            return string_tensor(pb, "text_output", render(self.tokenizer, window))
        response = pb.InferenceRequest(
            model_name=contract.POSTPROCESSING_MODEL,
            inputs=[pb.get_output_tensor_by_name(llm_response, n) for n in LLM_TO_POSTPROCESSING],
            requested_output_names=list(POSTPROCESSING_TO_CLIENT),
        ).exec()
        if response.has_error():
            raise RuntimeError(f"postprocessing: {response.error().message()}")
        return pb.get_output_tensor_by_name(response, "text_output")

    def _watch_cancellation(self, sender, request_id: str, done: threading.Event) -> None:
        while not done.wait(CANCEL_POLL_S):
            if sender.is_cancelled():
                self._stop_llm(request_id)
                return

    def _stop_llm(self, request_id: str) -> None:
        pb = self.pb
        stop = pb.InferenceRequest(
            model_name=contract.LLM_MODEL,
            inputs=[pb.Tensor(LLM_STOP_INPUT, np.array([True]))],
            requested_output_names=[],
            request_id=request_id,
        )
        for response in stop.exec(decoupled=True):
            if response.has_error():
                log.warning("stopping a cancelled llm request failed: %s", response.error().message())


_ENSEMBLE_INPUT_NAMES = tuple(t.name for t in contract.ENSEMBLE_INPUTS)
