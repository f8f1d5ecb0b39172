"""Triton adapter for medgemma_triton.serving.engine: decoupled, streaming generation.

execute() only validates and queues; the engine's scheduler thread decodes every active request
and sends their responses. Images are encoded by the `vision_encoder` model through BLS, only for
requests that have them.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from medgemma_triton.contract import VISION_ENCODER_MODEL
from medgemma_triton.runtime.decoder import OnnxDecoder
from medgemma_triton.runtime.limits import InvalidRequest, Limits
from medgemma_triton.runtime.tokenizer import load_tokenizer
from medgemma_triton.serving.engine import Engine, GenerationRequest
from medgemma_triton.serving.options import generation_options
from medgemma_triton.serving.triton_io import (
    SendQueue,
    TritonCounters,
    TritonResponseStream,
    input_getter,
    int_parameter,
    model_parameters,
    required_parameter,
)
from medgemma_triton.spec import ModelSpec


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args)
        checkpoint = required_parameter(parameters, "checkpoint", "llm")
        self.spec = ModelSpec.from_checkpoint(checkpoint)
        self.limits = Limits.from_env()
        self.vision_batch = max(1, int_parameter(parameters, "vision_max_batch_size", 1))
        threads = int_parameter(parameters, "intra_op_threads", 0) or None
        self.responses = SendQueue()
        decoder = OnnxDecoder(required_parameter(parameters, "onnx_model", "llm"), self.spec, intra_op_threads=threads)
        self.engine = Engine(
            decoder,
            load_tokenizer(checkpoint),
            eos_ids=self.spec.tokens.eos,
            max_positions=self.spec.text.max_position_embeddings,
            encode_images=self._encode_images if self.spec.multimodal else None,
            max_active_requests=int_parameter(parameters, "max_active_requests", 16),
            decode_max_batch_size=int_parameter(parameters, "decode_max_batch_size", 8),
            stream_interval=int_parameter(parameters, "stream_interval", 1),
            counters=TritonCounters(pb_utils, args["model_name"]),
        )

    def execute(self, requests):
        for request in requests:
            stream = TritonResponseStream(pb_utils, request.get_response_sender(), self.responses)
            get = input_getter(pb_utils, request)
            stop = get("stop")
            if stop is not None and bool(stop.reshape(-1)[0]):
                self.engine.stop(request.request_id())
                stream.close()
                continue
            try:
                input_ids = get("input_ids")
                if input_ids is None:
                    raise InvalidRequest("input_ids is required (unless stop is true)")
                options = generation_options(get, self.limits, self.spec)
            except InvalidRequest as exc:
                stream.fail(str(exc), invalid_request=True)
                continue
            input_ids = input_ids.reshape(-1).astype(np.int64)
            self.engine.submit(
                GenerationRequest(input_ids, get("pixel_values"), options, stream, request.request_id())
            )
        return None

    def _encode_images(self, pixel_values):
        """[N, 3, S, S] -> [N, mm_tokens, hidden] through the vision_encoder model (BLS)."""
        parts = []
        for start in range(0, len(pixel_values), self.vision_batch):
            request = pb_utils.InferenceRequest(
                model_name=VISION_ENCODER_MODEL,
                requested_output_names=["image_embeddings"],
                inputs=[pb_utils.Tensor("pixel_values", pixel_values[start : start + self.vision_batch])],
            )
            response = request.exec()
            if response.has_error():
                raise RuntimeError(f"vision_encoder: {response.error().message()}")
            parts.append(pb_utils.get_output_tensor_by_name(response, "image_embeddings").as_numpy())
        return np.concatenate(parts)

    def finalize(self):
        self.engine.shutdown()
        self.responses.close()
