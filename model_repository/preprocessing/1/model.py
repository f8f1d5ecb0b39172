"""Triton adapter for medgemma_triton.serving.preprocess: request tensors -> input_ids, pixel_values."""

import triton_python_backend_utils as pb_utils

from medgemma_triton.runtime.limits import InvalidRequest
from medgemma_triton.serving.preprocess import Preprocessor
from medgemma_triton.serving.triton_io import error_response, input_getter, model_parameters, required_path


class TritonPythonModel:
    def initialize(self, args):
        checkpoint = required_path(args, model_parameters(args), "checkpoint", "preprocessing")
        self.preprocessor = Preprocessor(checkpoint)
        self.logger = pb_utils.Logger

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                prepared = self.preprocessor(input_getter(pb_utils, request))
            except InvalidRequest as exc:
                responses.append(error_response(pb_utils, str(exc), invalid_request=True))
                continue
            except Exception as exc:  # noqa: BLE001 - one bad request must not take the model down
                self.logger.log_error(f"preprocessing failed: {type(exc).__name__}")
                responses.append(error_response(pb_utils, f"preprocessing failed: {type(exc).__name__}", False))
                continue
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("input_ids", prepared.input_ids),
                        pb_utils.Tensor("pixel_values", prepared.pixel_values),
                    ]
                )
            )
        return responses
