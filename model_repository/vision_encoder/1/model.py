"""Triton adapter for medgemma_triton.runtime.vision.OnnxVisionEncoder (dynamically batched)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from medgemma_triton.contract import VISION_INPUT, VISION_OUTPUT
from medgemma_triton.processes import exit_when_parent_exits
from medgemma_triton.runtime.vision import OnnxVisionEncoder
from medgemma_triton.serving.parameters import int_parameter
from medgemma_triton.serving.triton_io import (
    error_response,
    model_parameters,
    required_path,
)
from medgemma_triton.spec import ModelSpec


class TritonPythonModel:
    def initialize(self, args):
        exit_when_parent_exits()  # never outlive tritonserver (a killed server leaves no model process)
        parameters = model_parameters(args)
        spec = ModelSpec.for_serving(required_path(args, parameters, "checkpoint", "vision_encoder"))
        threads = int_parameter(parameters, "intra_op_threads", 0) or None
        self.encoder = OnnxVisionEncoder(
            required_path(args, parameters, "onnx_model", "vision_encoder"), spec, intra_op_threads=threads
        )

    def execute(self, requests):
        # One encoder call for every image the dynamic batcher gathered, then split per request.
        batches = [pb_utils.get_input_tensor_by_name(r, VISION_INPUT).as_numpy() for r in requests]
        try:
            embeddings = self.encoder.encode(np.concatenate(batches))
        except Exception as exc:  # noqa: BLE001
            return [error_response(pb_utils, f"vision encoder failed: {exc}", False) for _ in requests]
        bounds = np.cumsum([len(b) for b in batches])[:-1]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(VISION_OUTPUT, part)])
            for part in np.split(embeddings, bounds)
        ]
