"""Triton adapter for medgemma_triton.serving.preprocess_lanes: request tensors -> input_ids, pixel_values.

Decoupled: execute() hands each request to a lane and returns; its one response is sent when it
is prepared (through one sending thread, as the llm sends its responses).
"""

import json
import time

import triton_python_backend_utils as pb_utils

from medgemma_triton.contract import INPUT_IDS, TIMEOUT_INPUT, VISION_INPUT
from medgemma_triton.processes import exit_when_parent_exits
from medgemma_triton.runtime.limits import InvalidRequest
from medgemma_triton.serving.preprocess import Preprocessor
from medgemma_triton.serving.preprocess_lanes import (
    DECODE_BUDGET_PARAMETER,
    PreprocessingLanes,
    map_large_allocations,
)
from medgemma_triton.serving.parameters import int_parameter
from medgemma_triton.serving.triton_io import (
    SendQueue,
    collect_garbage,
    error_response,
    model_parameters,
    required_path,
    string_tensor,
)


class TritonPythonModel:
    def initialize(self, args):
        exit_when_parent_exits()  # never outlive tritonserver (a killed server leaves no model process)
        map_large_allocations()  # this process decodes images: their memory goes back to the OS once freed
        parameters = model_parameters(args)
        preprocessor = Preprocessor(required_path(args, parameters, "checkpoint", "preprocessing"))
        self.lanes = PreprocessingLanes(preprocessor, int_parameter(parameters, DECODE_BUDGET_PARAMETER, 0))
        self.input_names = [t["name"] for t in json.loads(args["model_config"])["input"]]
        self.responses = SendQueue()
        self.logger = pb_utils.Logger

    def execute(self, requests):
        for request in requests:
            # Triton releases the request when execute() returns: copy its inputs out now.
            inputs = {}
            for name in self.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy().copy()
            timeout_ms = inputs.pop(TIMEOUT_INPUT, None)
            deadline = None if timeout_ms is None else time.monotonic() + int(timeout_ms.reshape(-1)[0]) / 1e3
            sender = request.get_response_sender()
            future = self.lanes.submit(inputs.get, deadline)
            future.add_done_callback(lambda done, sender=sender: self.responses.put(lambda: self._respond(sender, done)))
        return None

    def _respond(self, sender, done):
        # exception(), not result(): a re-raised exception would take this frame into its traceback, a
        # cycle (future -> exception -> frame -> future) that holds the response until a garbage
        # collection, possibly the interpreter's last one, after the stub has unmapped its shared memory.
        error = done.exception()
        if isinstance(error, InvalidRequest):
            response = error_response(pb_utils, str(error), invalid_request=True)
        elif error is not None:  # one bad request must not take the model down
            self.logger.log_error(f"preprocessing failed: {type(error).__name__}")  # the type only: no request data
            response = error_response(pb_utils, "preprocessing failed on the server (an internal error, in its log)", False)
        else:
            prepared = done.result()
            response = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(INPUT_IDS, prepared.input_ids),
                    pb_utils.Tensor(VISION_INPUT, prepared.pixel_values),
                    string_tensor(pb_utils, "finish_reason", prepared.finish_reason),
                ]
            )
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        self.lanes.shutdown()
        self.responses.close()
        collect_garbage()
