"""The `medgemma` orchestration (serving/pipeline.py) without Triton: its BLS calls go to scripted
`preprocessing` and `llm` models through an in-process stand-in for the Python backend's API.

What runs is the pipeline's own code: relaying the llm's answers (the first, then polls) to a client
that streams or not, stop words across answers, the stop request and drain after one, errors,
preprocessing's timeout answer and a client's cancellation. The served pipeline, with the real
models, is tested in tests/test_serving.py.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from medgemma_triton import contract
from medgemma_triton.runtime.tokenizer import load_tokenizer
from medgemma_triton.serving import pipeline as pipeline_module
from medgemma_triton.serving.pipeline import Pipeline

FINAL = 1


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array

    def is_cpu(self):
        return True


class TritonError:
    INTERNAL, INVALID_ARG, UNAVAILABLE = 13, 3, 14

    def __init__(self, message, code=INTERNAL):
        self._message, self._code = message, code

    def message(self):
        return self._message

    def code(self):
        return self._code


class InferenceResponse:
    def __init__(self, output_tensors=(), error=None):
        self._outputs, self._error = list(output_tensors), error

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error

    def output_tensors(self):
        return self._outputs


def _named(tensors, name):
    return next((t for t in tensors if t.name() == name), None)


class Backend:
    """The parts of triton_python_backend_utils the pipeline uses; BLS requests go to `models`."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    Tensor, TritonError, InferenceResponse = Tensor, TritonError, InferenceResponse

    def __init__(self, models):
        backend = self

        class InferenceRequest:
            def __init__(self, model_name, inputs, requested_output_names, request_id="", **_):
                self.model_name, self.inputs, self.request_id = model_name, list(inputs), request_id

            def exec(self, decoupled=False):
                return backend.models[self.model_name](
                    {t.name(): t.as_numpy() for t in self.inputs}, self.request_id)

        self.InferenceRequest = InferenceRequest
        self.models = models

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return _named(request.inputs, name)

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return _named(response.output_tensors(), name)


class Sender:
    """A client's response sender: records what it is sent."""

    def __init__(self):
        self.sent: list[tuple] = []
        self.cancelled = False
        self.finished = threading.Event()

    def send(self, response=None, flags=0):
        self.sent.append((response, flags))
        if flags & FINAL:
            self.finished.set()

    def is_cancelled(self):
        return self.cancelled


class ClientRequest:
    def __init__(self, **inputs):
        self.inputs = [Tensor(name, value) for name, value in inputs.items()]
        self.sender = Sender()

    def get_response_sender(self):
        return self.sender


def _text(value: str):
    return np.array([value.encode("utf-8")], dtype=np.object_)


def preprocessing(input_ids, finish_reason=""):
    def answer(inputs, _request_id):
        return [InferenceResponse([Tensor("input_ids", np.asarray(input_ids, np.int64)),
                                   Tensor("finish_reason", _text(finish_reason))])]
    return answer


class ScriptedLlm:
    """An llm that answers a generation with its first scripted answer and each poll with the next;
    a stop request ends the request (its next answer carries the stop's reason and no tokens)."""

    def __init__(self, answers, prompt_tokens=3):
        self.answers = list(answers)  # (token ids, finish reason) or an InferenceResponse (an error)
        self.prompt_tokens = prompt_tokens
        self.calls: list[str] = []  # generation | poll | stop:<reason>
        self.stopped = threading.Event()
        self._stop_reason = ""

    def __call__(self, inputs, request_id):
        if "stop" in inputs:
            self._stop_reason = inputs["stop_reason"].reshape(-1)[0].decode()
            self.calls.append(f"stop:{self._stop_reason}")
            self.stopped.set()
            return []
        self.calls.append("poll" if "poll" in inputs else "generation")
        if self._stop_reason:
            return [self._answer([], self._stop_reason)]
        entry = self.answers.pop(0)
        if entry == "wait for a stop":
            assert self.stopped.wait(10), "the pipeline never stopped the llm request"
            return [self._answer([], self._stop_reason)]
        return [entry] if isinstance(entry, InferenceResponse) else [self._answer(*entry)]

    def _answer(self, ids, reason):
        return InferenceResponse([
            Tensor("output_ids", np.asarray(ids, np.int64)),
            Tensor("finish_reason", _text(reason)),
            Tensor("prompt_tokens", np.array([self.prompt_tokens], np.int32)),
            Tensor("completion_tokens", np.array([len(ids)], np.int32)),
        ])


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


def _run(tokenizer, llm, request, preprocess=None):
    backend = Backend({contract.PREPROCESSING_MODEL: preprocess or preprocessing([2, 10, 11]),
                       contract.LLM_MODEL: llm})
    pipeline = Pipeline(backend, tokenizer)
    try:
        pipeline.submit(request)
        assert request.sender.finished.wait(30), "the client never got its final response"
    finally:
        pipeline.shutdown(drain_timeout_s=5)
    return request.sender.sent


def _outputs(response):
    def value(name):
        return Backend.get_output_tensor_by_name(response, name).as_numpy().reshape(-1)
    return {
        "text": value("text_output")[0].decode(),
        "ids": value("output_ids").tolist(),
        "finish_reason": value("finish_reason")[0].decode(),
        "completion_tokens": int(value("completion_tokens")[0]),
    }


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False).ids


def test_a_client_that_does_not_stream_gets_one_response_with_every_answer(tokenizer):
    ids = _ids(tokenizer, "The heart size is normal and the lungs are clear.")
    llm = ScriptedLlm([(ids[:3], ""), (ids[3:7], ""), (ids[7:], "length")])
    sent = _run(tokenizer, llm, ClientRequest(text_input=_text("x")))
    assert llm.calls == ["generation", "poll", "poll"]
    assert len(sent) == 1 and sent[0][1] == FINAL
    out = _outputs(sent[0][0])
    assert out == {"text": tokenizer.decode(ids), "ids": ids, "finish_reason": "length", "completion_tokens": len(ids)}


def test_a_streaming_client_gets_each_answer_as_it_comes(tokenizer):
    ids = _ids(tokenizer, "No pleural effusion. No pneumothorax.")
    llm = ScriptedLlm([(ids[:2], ""), (ids[2:5], ""), (ids[5:], contract.FINISH_STOP)])
    sent = _run(tokenizer, llm, ClientRequest(text_input=_text("x"), stream=np.array([True])))
    assert [flags for _, flags in sent] == [0, 0, FINAL]
    outs = [_outputs(response) for response, _ in sent]
    assert [o["ids"] for o in outs] == [ids[:2], ids[2:5], ids[5:]]
    assert "".join(o["text"] for o in outs) == tokenizer.decode(ids)
    assert outs[-1]["finish_reason"] == contract.FINISH_STOP


def test_a_stop_word_across_two_answers_ends_the_text_and_stops_the_llm(tokenizer):
    before, stop_word = "Impression: mild cardiomegaly.", " Findings are"
    ids = _ids(tokenizer, before + stop_word + " described below.")
    assert len(_ids(tokenizer, stop_word)) >= 2
    cut = len(_ids(tokenizer, before)) + 1  # the first answer ends inside the stop word
    llm = ScriptedLlm([(ids[:cut], ""), (ids[cut:], ""), "wait for a stop"])
    sent = _run(tokenizer, llm, ClientRequest(text_input=_text("x"), stop_words=_text(stop_word)))
    assert llm.calls[:2] == ["generation", "poll"] and f"stop:{contract.FINISH_STOP}" in llm.calls
    assert llm.calls[-1] == "poll"  # drained to its last answer, so the llm forgets the request
    assert len(sent) == 1  # the client did not stream: one response
    out = _outputs(sent[0][0])
    assert out["finish_reason"] == contract.FINISH_STOP
    assert out["text"] == before and stop_word.strip() not in out["text"]


def test_an_llm_error_reaches_the_client_as_its_final_response(tokenizer):
    llm = ScriptedLlm([([5, 6], ""), InferenceResponse(error=TritonError("the llm failed: out of memory"))])
    sent = _run(tokenizer, llm, ClientRequest(text_input=_text("x"), stream=np.array([True])))
    response, flags = sent[-1]
    assert flags == FINAL and response.has_error()
    assert response.error().message() == "the llm failed: out of memory"


def test_preprocessing_timeout_ends_the_request_before_the_llm(tokenizer):
    llm = ScriptedLlm([])
    sent = _run(tokenizer, llm, ClientRequest(text_input=_text("x"), timeout_ms=np.array([50], np.uint64)),
                preprocess=preprocessing([2, 10, 11, 12], finish_reason=contract.FINISH_TIMEOUT))
    assert llm.calls == []
    assert len(sent) == 1 and sent[0][1] == FINAL
    out = _outputs(sent[0][0])
    assert (out["finish_reason"], out["text"], out["completion_tokens"]) == (contract.FINISH_TIMEOUT, "", 0)


def test_a_cancelled_client_stops_the_llm_request(tokenizer, monkeypatch):
    monkeypatch.setattr(pipeline_module, "CANCEL_POLL_S", 0.01)
    ids = _ids(tokenizer, "A long report")
    llm = ScriptedLlm([(ids, ""), "wait for a stop"])
    request = ClientRequest(text_input=_text("x"), stream=np.array([True]))
    original_send = request.sender.send

    def send_then_leave(response=None, flags=0):  # the client goes away after its first response
        original_send(response, flags)
        request.sender.cancelled = True

    request.sender.send = send_then_leave
    backend = Backend({contract.PREPROCESSING_MODEL: preprocessing([2, 10]), contract.LLM_MODEL: llm})
    pipeline = Pipeline(backend, tokenizer)
    try:
        pipeline.submit(request)
        assert llm.stopped.wait(10), "a cancelled client's llm request was never stopped"
        deadline = time.monotonic() + 10
        while pipeline._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pipeline._in_flight == 0
    finally:
        pipeline.shutdown(drain_timeout_s=5)
    assert f"stop:{contract.FINISH_CANCELLED}" in llm.calls
    assert len(request.sender.sent) == 1  # nothing is sent to a client that has gone


# (what the llm generates, the stop word, whether it stops there): the text a client gets is what comes
# before the stop word, however the llm's answers cut the text
STOP_CASES = [
    ("Impression: mild cardiomegaly. Findings are described below.", " Findings are", True),
    ("No effusion. No pneumothorax.END of report", "END", True),
    ("Findings follow; Find nothing else.", "Findings are", False),  # a held prefix that is not the stop word
    ("Normal study. Normal study.", ". Normal", True),  # the stop word's text also ends the first sentence
]


@pytest.mark.parametrize(("generated", "stop_word", "stops"), STOP_CASES)
@pytest.mark.parametrize("stream", [True, False])
def test_stop_words_hold_and_end_the_text_wherever_the_answers_are_cut(tokenizer, generated, stop_word, stops, stream):
    ids = _ids(tokenizer, generated)
    full = tokenizer.decode(ids)
    expected = full[: full.index(stop_word)] if stops else full
    for cut in range(1, len(ids)):
        llm = ScriptedLlm([(ids[:cut], ""), (ids[cut:], "" if stops else "length"), "wait for a stop"])
        sent = _run(tokenizer, llm, ClientRequest(text_input=_text("x"), stop_words=_text(stop_word),
                                                   stream=np.array([stream])))
        outs = [_outputs(response) for response, _ in sent]
        assert sent[-1][1] == FINAL and (stream or len(sent) == 1)
        assert "".join(o["text"] for o in outs) == expected, f"answers cut after {cut} tokens"
        assert outs[-1]["finish_reason"] == (contract.FINISH_STOP if stops else "length"), cut
        assert (f"stop:{contract.FINISH_STOP}" in llm.calls) == stops, (cut, llm.calls)
