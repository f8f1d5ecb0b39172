"""Triton adapter for medgemma_triton.serving.text.render: one llm response's window -> its text."""

import triton_python_backend_utils as pb_utils

from medgemma_triton.runtime.tokenizer import load_tokenizer
from medgemma_triton.serving.text import render
from medgemma_triton.serving.triton_io import (
    input_getter,
    model_parameters,
    required_parameter,
    string_tensor,
    text_window,
)


class TritonPythonModel:
    def initialize(self, args):
        self.tokenizer = load_tokenizer(required_parameter(model_parameters(args), "checkpoint", "postprocessing"))

    def execute(self, requests):
        responses = []
        for request in requests:
            text = render(self.tokenizer, text_window(input_getter(pb_utils, request)))
            responses.append(pb_utils.InferenceResponse(output_tensors=[string_tensor(pb_utils, "text_output", text)]))
        return responses
