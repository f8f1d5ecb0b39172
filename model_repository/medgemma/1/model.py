"""Triton adapter for medgemma_triton.serving.pipeline: the `medgemma` contract over BLS."""

import triton_python_backend_utils as pb_utils

from medgemma_triton.runtime.tokenizer import load_tokenizer
from medgemma_triton.serving.pipeline import Pipeline, detokenize_here
from medgemma_triton.serving.triton_io import int_parameter, model_parameters


class TritonPythonModel:
    def initialize(self, args):
        parameters = model_parameters(args)
        tokenizer = load_tokenizer(parameters["checkpoint"]) if detokenize_here(parameters) else None
        self.pipeline = Pipeline(pb_utils, int_parameter(parameters, "max_concurrent_requests", 64), tokenizer)

    def execute(self, requests):
        for request in requests:
            self.pipeline.submit(request)
        return None

    def finalize(self):
        self.pipeline.shutdown()
