"""Triton Python model `llm` (gpu profile): adapts Triton requests to medgemma_triton.gpu.llm_engine.

Same tensors and responses as the cpu profile's llm (serving/options.py parses the request,
serving/triton_io.py writes the responses): token ids and image embeddings (from the `vision_encoder`
TensorRT plan, through `medgemma`) in, token ids out; the tokens come from TensorRT-LLM instead of
ONNX Runtime. Decoupled: execute() hands each request to an asyncio loop on its own thread and returns
at once, so TensorRT-LLM's executor batches requests in flight. A `stop` request (the client cancelled,
or `medgemma` found a stop word) aborts the TensorRT-LLM request with that id.
"""

import asyncio
import threading
import time

import triton_python_backend_utils as pb_utils

from medgemma_triton.gpu.llm_engine import EngineSettings, GemmaLLM, GenerationRequest, respond
from medgemma_triton.runtime.limits import InvalidRequest
from medgemma_triton.serving.options import generation_options, stop_request
from medgemma_triton.serving.triton_io import TritonResponseStream, input_getter, model_parameters, required_path


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args)
        checkpoint = required_path(args, parameters, "checkpoint", "llm")
        self.engine = GemmaLLM(checkpoint, EngineSettings.from_json(parameters.get("engine_settings") or "{}"))
        self.spec, self.limits = self.engine.spec, self.engine.limits
        self.aborts = {}  # request id -> abort of its TensorRT-LLM request (the BLS pipeline's stop protocol)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="llm-asyncio", daemon=True)
        self.thread.start()

    def execute(self, requests):
        for request in requests:
            try:
                stopping = stop_request(input_getter(pb_utils, request)) is not None
            except InvalidRequest as exc:
                TritonResponseStream(pb_utils, request.get_response_sender()).fail(str(exc), invalid_request=True)
                continue
            if stopping:
                # medgemma's client cancelled, or medgemma found a stop word: abort the request with this id.
                abort = self.aborts.get(request.request_id())
                if abort is not None:
                    self.loop.call_soon_threadsafe(abort)
                TritonResponseStream(pb_utils, request.get_response_sender()).close()
                continue
            asyncio.run_coroutine_threadsafe(self._serve(request), self.loop)
        return None

    @staticmethod
    def _image_embeddings(request):
        """The request's image_embeddings as a torch tensor [N, mm_tokens, hidden] (host or device), or None."""
        tensor = pb_utils.get_input_tensor_by_name(request, "image_embeddings")
        if tensor is None:
            return None
        import torch

        embeddings = torch.from_dlpack(tensor.to_dlpack())
        return embeddings if embeddings.shape[0] else None

    async def _serve(self, request):
        stream = TritonResponseStream(pb_utils, request.get_response_sender())
        try:
            get = input_getter(pb_utils, request)
            options = generation_options(get, self.limits, self.spec)
            if get("input_ids") is None:
                raise InvalidRequest("input_ids is required (unless stop is true)")
            timeout_ms = get("timeout_ms")
            generation = GenerationRequest(
                deadline=None if timeout_ms is None else time.monotonic() + int(timeout_ms.reshape(-1)[0]) / 1e3,
                input_ids=[int(t) for t in get("input_ids").reshape(-1)],
                sampling=options.sampling,
                image_embeddings=self._image_embeddings(request),
                stream=options.stream,
            )
            steps, abort = self.engine.start(generation)
            self.aborts[request.request_id()] = abort
            try:
                await respond(steps, generation, stream, self.spec.tokens.eos, abort)
            finally:
                self.aborts.pop(request.request_id(), None)
        except InvalidRequest as exc:
            stream.fail(str(exc), invalid_request=True)
        except Exception as exc:  # noqa: BLE001 - every request gets its final response
            stream.fail(f"llm: {exc}", invalid_request=False)

    def finalize(self):
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
