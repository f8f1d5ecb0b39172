"""Triton Python model `llm` (gpu profile): adapts Triton requests to medgemma_triton.gpu.llm_engine.

Same tensors and responses as the cpu profile's llm (serving/options.py parses the request,
serving/triton_io.py writes the responses): token ids and image embeddings (from the `vision_encoder`
TensorRT plan, through `medgemma`) in, token ids out; the tokens come from TensorRT-LLM instead of
ONNX Runtime. Decoupled: the request loop (llm_engine.RequestLoop) serves each request on its own
asyncio thread, and a `stop` request (the client cancelled, or `medgemma` found a stop word) stops
the request with that id, even one that has not arrived yet. Each request is answered once: a
stream's next tokens go to the `poll` request that asks for them (serving/polled.py). The loop also keeps the
`medgemma_queued_requests` and `medgemma_active_requests` gauges (the autoscaler's signal, as in the
cpu profile) from TensorRT-LLM's iteration statistics.
"""

import time

import triton_python_backend_utils as pb_utils

from medgemma_triton.contract import INPUT_IDS, TIMEOUT_INPUT, VISION_OUTPUT
from medgemma_triton.gpu.llm_engine import EngineSettings, GemmaLLM, GenerationRequest, RequestLoop
from medgemma_triton.processes import exit_when_parent_exits
from medgemma_triton.runtime.limits import InvalidRequest
from medgemma_triton.serving.options import generation_options, poll_request, stop_request
from medgemma_triton.serving.polled import Mailboxes
from medgemma_triton.serving.triton_io import (
    TritonCounters,
    TritonResponseStream,
    collect_garbage,
    input_getter,
    mailbox_delivery,
    model_parameters,
    required_path,
)


class TritonPythonModel:
    def initialize(self, args):
        exit_when_parent_exits()  # never outlive tritonserver (a killed server leaves no model process)
        parameters = model_parameters(args)
        checkpoint = required_path(args, parameters, "checkpoint", "llm")
        settings = EngineSettings.from_json(parameters.get("engine_settings") or "{}")
        self.counters = TritonCounters(pb_utils, args["model_name"])
        self.requests = RequestLoop(GemmaLLM.load(checkpoint, settings), counters=self.counters)
        self.spec, self.limits = self.requests.engine.spec, self.requests.engine.limits
        self.mailboxes = Mailboxes(mailbox_delivery(pb_utils))

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            stream = TritonResponseStream(pb_utils, sender)
            get = input_getter(pb_utils, request)
            try:
                if poll_request(get):
                    self.mailboxes.poll(request.request_id(), sender)
                    continue
                stop_reason = stop_request(get)
            except InvalidRequest as exc:
                stream.fail(str(exc), invalid_request=True)
                continue
            if stop_reason is not None:
                self.requests.stop(request.request_id(), stop_reason)
                stream.close()
                continue
            self.requests.submit(request.request_id(), lambda get=get: self._generation(get),
                                 self.mailboxes.open(request.request_id(), sender))
        return None

    def _generation(self, get) -> GenerationRequest:
        options = generation_options(get, self.limits, self.spec)
        input_ids = get(INPUT_IDS)
        if input_ids is None:
            raise InvalidRequest("input_ids is required (unless stop is true)")
        timeout_ms = get(TIMEOUT_INPUT)
        embeddings = get(VISION_OUTPUT)  # numpy in host memory (the Python backend's default)
        return GenerationRequest(
            deadline=None if timeout_ms is None else time.monotonic() + int(timeout_ms.reshape(-1)[0]) / 1e3,
            input_ids=[int(t) for t in input_ids.reshape(-1)],
            sampling=options.sampling,
            image_embeddings=embeddings if embeddings is not None and embeddings.shape[0] else None,
            stream=options.stream,
        )

    def finalize(self):
        self.requests.shutdown()
        self.counters.close()
        collect_garbage()
