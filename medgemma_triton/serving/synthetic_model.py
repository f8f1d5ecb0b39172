"""Triton Python model `medgemma` of the synthetic deployment (medgemma_triton/serving/synthetic.py):
the contract's tensors, deterministic tokens at a fixed rate, no model."""

import triton_python_backend_utils as pb_utils

from medgemma_triton.processes import exit_when_parent_exits
from medgemma_triton.serving.synthetic import SyntheticServer, SyntheticSettings
from medgemma_triton.serving.triton_io import model_parameters


class TritonPythonModel:
    def initialize(self, args):
        exit_when_parent_exits()  # never outlive tritonserver (a killed server leaves no model process)
        self.server = SyntheticServer(pb_utils, SyntheticSettings.from_parameters(model_parameters(args)))

    def execute(self, requests):
        for request in requests:
            self.server.submit(request)
        return None

    def finalize(self):
        self.server.shutdown()
