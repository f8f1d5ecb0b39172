"""Triton Python model `llm` (gpu profile): adapts Triton requests to medgemma_triton.gpu.llm_engine.

Same tensors and responses as the cpu profile's llm (serving/options.py parses the request,
serving/triton_io.py writes the responses); the tokens come from TensorRT-LLM instead of ONNX Runtime.
Decoupled: execute() hands each request to an asyncio loop on its own thread and returns at once, so
TensorRT-LLM's executor batches requests in flight. Images go through the `vision_encoder` model
(the TensorRT plan) by BLS; a cancelled request aborts its TensorRT-LLM request.
"""

import asyncio
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from medgemma_triton.contract import VISION_ENCODER_MODEL
from medgemma_triton.gpu.llm_engine import EngineSettings, GemmaLLM, GenerationRequest, respond
from medgemma_triton.runtime.limits import InvalidRequest
from medgemma_triton.runtime.tokenizer import load_tokenizer
from medgemma_triton.serving.options import generation_options
from medgemma_triton.serving.triton_io import TritonResponseStream, input_getter, model_parameters, required_parameter


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args)
        checkpoint = Path(args["model_repository"]) / args["model_version"] / required_parameter(parameters, "checkpoint", "llm")
        self.engine = GemmaLLM(checkpoint, EngineSettings.from_json(parameters.get("engine_settings") or "{}"))
        self.spec, self.limits = self.engine.spec, self.engine.limits
        self.tokenizer = load_tokenizer(checkpoint)
        self.aborts = {}  # request id -> abort of its TensorRT-LLM request (the BLS pipeline's stop protocol)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="llm-asyncio", daemon=True)
        self.thread.start()

    def execute(self, requests):
        for request in requests:
            stop = pb_utils.get_input_tensor_by_name(request, "stop")
            if stop is not None and bool(stop.as_numpy().reshape(-1)[0]):
                # medgemma's pipeline saw its client cancel: abort the request with this id.
                abort = self.aborts.get(request.request_id())
                if abort is not None:
                    self.loop.call_soon_threadsafe(abort)
                TritonResponseStream(pb_utils, request.get_response_sender()).close()
                continue
            asyncio.run_coroutine_threadsafe(self._serve(request), self.loop)
        return None

    async def _image_embeddings(self, pixel_values):
        """[N, 3, S, S] -> torch [N, mm_tokens, hidden] from the TensorRT vision engine (BLS, dynamic batching)."""
        import torch

        request = pb_utils.InferenceRequest(
            model_name=VISION_ENCODER_MODEL,
            requested_output_names=["image_embeddings"],
            inputs=[pb_utils.Tensor("pixel_values", np.ascontiguousarray(pixel_values, dtype=np.float32))],
        )
        response = await request.async_exec()
        if response.has_error():
            raise RuntimeError(f"vision_encoder: {response.error().message()}")
        embeddings = pb_utils.get_output_tensor_by_name(response, "image_embeddings")
        return torch.from_dlpack(embeddings.to_dlpack())

    async def _serve(self, request):
        stream = TritonResponseStream(pb_utils, request.get_response_sender())
        try:
            get = input_getter(pb_utils, request)
            options = generation_options(get, self.limits, self.spec)
            pixel_values = get("pixel_values")
            embeddings = None
            if pixel_values is not None and len(pixel_values):
                embeddings = await self._image_embeddings(pixel_values)
            generation = GenerationRequest(
                input_ids=[int(t) for t in get("input_ids").reshape(-1)],
                sampling=options.sampling,
                image_embeddings=embeddings,
                stream=options.stream,
            )
            steps, abort = self.engine.start(generation)
            self.aborts[request.request_id()] = abort
            try:
                await respond(steps, generation, stream, self.tokenizer, self.spec.tokens.eos, abort)
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
