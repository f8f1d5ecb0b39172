"""Triton adapter for medgemma_triton.serving.engine: decoupled generation, answered by polls.

execute() only validates and queues; the engine's scheduler thread decodes every active request
and puts their tokens in mailboxes (serving/polled.py): a request is answered once, and a stream's
next tokens go to the `poll` request that asks for them. Token ids and image embeddings in, token ids out.
"""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from medgemma_triton.contract import INPUT_IDS, TIMEOUT_INPUT, VISION_OUTPUT, drain_timeout_s
from medgemma_triton.processes import exit_when_parent_exits
from medgemma_triton.runtime.limits import InvalidRequest, Limits
from medgemma_triton.runtime.tokenizer import load_tokenizer
from medgemma_triton.serving.engine import GenerationRequest, llm_engine
from medgemma_triton.serving.options import generation_options, poll_request, stop_request
from medgemma_triton.serving.polled import Mailboxes
from medgemma_triton.serving.triton_io import (
    SendQueue,
    TritonCounters,
    TritonResponseStream,
    collect_garbage,
    input_getter,
    mailbox_delivery,
    model_parameters,
    required_path,
)
from medgemma_triton.spec import ModelSpec


class TritonPythonModel:
    def initialize(self, args):
        exit_when_parent_exits()  # never outlive tritonserver (a killed server leaves no model process)
        parameters = model_parameters(args)
        checkpoint = required_path(args, parameters, "checkpoint", "llm")
        self.spec = ModelSpec.for_serving(checkpoint)
        self.limits = Limits.from_env()
        self.responses = SendQueue()
        self.mailboxes = Mailboxes(mailbox_delivery(pb_utils, self.responses))
        self.counters = TritonCounters(pb_utils, args["model_name"])
        self.engine = llm_engine(
            parameters, self.spec, lambda key: required_path(args, parameters, key, "llm"),
            tokenizer=load_tokenizer(checkpoint),  # only to see when a stream's first text shows
            counters=self.counters, max_queued=self.limits.max_queued,
        )

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            stream = TritonResponseStream(pb_utils, sender, self.responses)
            get = input_getter(pb_utils, request)
            try:
                if poll_request(get):
                    self.mailboxes.poll(request.request_id(), sender)
                    continue
                stop_reason = stop_request(get)
                if stop_reason is not None:
                    self.engine.stop(request.request_id(), stop_reason)
                    stream.close()
                    continue
                input_ids = get(INPUT_IDS)
                if input_ids is None:
                    raise InvalidRequest("input_ids is required (unless stop is true)")
                options = generation_options(get, self.limits, self.spec)
            except InvalidRequest as exc:
                stream.fail(str(exc), invalid_request=True)
                continue
            input_ids = input_ids.reshape(-1).astype(np.int64)
            timeout_ms = get(TIMEOUT_INPUT)
            deadline = None if timeout_ms is None else time.monotonic() + int(timeout_ms.reshape(-1)[0]) / 1e3
            self.engine.submit(
                GenerationRequest(input_ids, get(VISION_OUTPUT), options,
                                  self.mailboxes.open(request.request_id(), sender), request.request_id(), deadline)
            )
        return None

    def finalize(self):
        self.engine.shutdown(drain_timeout_s=drain_timeout_s())
        self.engine.decoder.close()
        self.responses.close()
        self.counters.close()
        collect_garbage()
