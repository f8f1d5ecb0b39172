"""Triton adapter for medgemma_triton.serving.text.render: one llm response's window -> its text."""

import triton_python_backend_utils as pb_utils

from medgemma_triton.runtime.tokenizer import load_tokenizer
from medgemma_triton.serving.text import TextWindow, render
from medgemma_triton.serving.triton_io import model_parameters, required_parameter, string_tensor


class TritonPythonModel:
    def initialize(self, args):
        self.tokenizer = load_tokenizer(required_parameter(model_parameters(args), "checkpoint", "postprocessing"))

    def execute(self, requests):
        responses = []
        for request in requests:
            def scalar(name):
                return int(pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)[0])

            window = TextWindow(
                window_ids=pb_utils.get_input_tensor_by_name(request, "window_ids").as_numpy().reshape(-1).tolist(),
                read_offset=scalar("read_offset"),
                text_offset=scalar("text_offset"),
                text_chars=scalar("text_chars"),
            )
            text = render(self.tokenizer, window)
            responses.append(pb_utils.InferenceResponse(output_tensors=[string_tensor(pb_utils, "text_output", text)]))
        return responses
