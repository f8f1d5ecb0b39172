"""Triton adapter for medgemma_triton.serving.pipeline: the `medgemma` contract over BLS."""

import triton_python_backend_utils as pb_utils

from medgemma_triton.processes import exit_when_parent_exits
from medgemma_triton.contract import drain_timeout_s
from medgemma_triton.runtime.tokenizer import load_tokenizer
from medgemma_triton.serving.pipeline import Pipeline
from medgemma_triton.serving.parameters import MedgemmaParameters
from medgemma_triton.serving.triton_io import (
    InFlightGauge,
    collect_garbage,
    model_parameters,
    required_path,
)


class TritonPythonModel:
    def initialize(self, args):
        exit_when_parent_exits()  # never outlive tritonserver (a killed server leaves no model process)
        parameters = model_parameters(args)
        self.in_flight_gauge = InFlightGauge(pb_utils, args["model_name"])
        self.pipeline = Pipeline(
            pb_utils,
            load_tokenizer(required_path(args, parameters, "checkpoint", "medgemma")),
            MedgemmaParameters.from_config(parameters),
            in_flight_gauge=self.in_flight_gauge,
        )

    def execute(self, requests):
        for request in requests:
            self.pipeline.submit(request)
        return None

    def finalize(self):
        self.pipeline.shutdown(drain_timeout_s())
        self.in_flight_gauge.close()
        collect_garbage()
