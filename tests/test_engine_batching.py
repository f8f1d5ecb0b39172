"""The llm engine's continuous batching, without a server: Engine over the real tiny decoders (ONNX
Runtime, and llama.cpp on the F32 GGUF, whose prompt chunks and decode steps share decode_mixed calls).

Four concurrent requests (different prompt lengths, token limits, streaming and not, one cancelled
mid-way) must reach the decoder in step_batch calls of more than one sequence, never more than
decode_max_batch_size, and each request's tokens must equal those of the same request served alone.
The response stream is the only stand-in: a list in place of Triton's response sender.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from medgemma_triton.contract import FINISH_CANCELLED, FINISH_STOP
from medgemma_triton.runtime.sampling import SamplingParams
from medgemma_triton.serving.engine import Chunk, Engine, GenerationRequest
from medgemma_triton.serving.options import GenerationOptions
from serving_fixtures import stream_interval_sizes

TIMEOUT_S = 60.0
PROMPTS = (
    ("What are the signs of pneumonia on a chest X-ray?", 24, True),
    ("Is a widened mediastinum an emergency? Answer briefly and list the causes to rule out.", 17, False),
    ("Summarise: no acute cardiopulmonary process.", 30, True),
    ("Hi", 9, False),
)


@dataclass
class ListStream:
    """A ResponseStream that keeps what the engine sends (stands in for Triton's response sender)."""

    cancel_after_chunks: int | None = None  # report the client as gone after this many responses
    chunks: list[Chunk] = field(default_factory=list)
    error: str | None = None
    closed: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    cancel_checks: int = 0  # is_cancelled() calls: each is a round trip to the server in Triton

    def send(self, chunk: Chunk, final: bool) -> None:
        self.chunks.append(chunk)
        if final:
            self.done.set()

    def fail(self, message: str, invalid_request: bool) -> None:
        self.error = message
        self.done.set()

    def close(self) -> None:
        self.closed = True
        self.done.set()

    def is_cancelled(self) -> bool:
        self.cancel_checks += 1
        return self.cancel_after_chunks is not None and len(self.chunks) >= self.cancel_after_chunks

    @property
    def ids(self) -> list[int]:
        return [token for chunk in self.chunks for token in chunk.output_ids]


class RecordingDecoder:
    """The real OnnxDecoder, recording how many sequences each decode call carries.

    `hold_first_prefill` runs before the first prefill, so a test can let every request be admitted
    before the scheduler starts decoding (otherwise the first request might finish alone).
    """

    def __init__(self, decoder, hold_first_prefill=None):
        self.decoder = decoder
        self.hold_first_prefill = hold_first_prefill
        self.decode_batch_sizes: list[int] = []
        self.prefill_chunks: list[int] = []  # tokens per prefill_chunk call
        self.events: list[str] = []  # "prefill" (one chunk) and "step" (one decode call), in order
        self.mixed_calls: list[tuple[int, int]] = []  # (prompt chunks, decode steps) per decode_mixed call

    def new_sequence(self, prompt_ids, image_embeddings=None):
        return self.decoder.new_sequence(prompt_ids, image_embeddings)

    def chunk_ends(self, prompt_ids, chunk_tokens):
        return self.decoder.chunk_ends(prompt_ids, chunk_tokens)

    def prefill_chunk(self, state, end):
        if self.hold_first_prefill is not None:
            hold, self.hold_first_prefill = self.hold_first_prefill, None
            hold()
        self.prefill_chunks.append(end - state.position)
        self.events.append("prefill")
        return self.decoder.prefill_chunk(state, end)

    def step(self, state, token_id):
        self.decode_batch_sizes.append(1)
        self.events.append("step")
        return self.decoder.step(state, token_id)

    def step_batch(self, states, token_ids):
        self.decode_batch_sizes.append(len(states))
        self.events.append("step")
        return self.decoder.step_batch(states, token_ids)

    @property
    def mixes_prefill_and_decode(self) -> bool:
        return getattr(self.decoder, "mixes_prefill_and_decode", False)

    def text_only(self, state, start, end):
        return self.decoder.text_only(state, start, end)

    @property
    def n_batch(self) -> int:
        return self.decoder.n_batch

    def decode_mixed(self, prefills, states, token_ids):
        if self.hold_first_prefill is not None and prefills:
            hold, self.hold_first_prefill = self.hold_first_prefill, None
            hold()
        self.prefill_chunks += [end - state.position for state, end in prefills]
        self.events += ["prefill"] * len(prefills) + ["step"] * bool(states)
        if states:
            self.decode_batch_sizes.append(len(states))
        self.mixed_calls.append((len(prefills), len(states)))
        return self.decoder.decode_mixed(prefills, states, token_ids)

    def release_batch(self):
        self.decoder.release_batch()

    def release(self, state):
        self.decoder.release(state)


@pytest.fixture(scope="module", params=["onnxruntime", "llama.cpp"])
def tiny(request, tiny_checkpoint):
    from medgemma_triton.runtime.tokenizer import load_tokenizer
    from medgemma_triton.spec import ModelSpec

    spec = ModelSpec.from_checkpoint(tiny_checkpoint)
    if request.param == "llama.cpp":
        from medgemma_triton.export.gguf import DECODER_GGUF
        from medgemma_triton.runtime.llamacpp import LlamaDecoder

        gguf = request.getfixturevalue("tiny_gguf_f32") / DECODER_GGUF
        decoder = LlamaDecoder(gguf, spec, threads=1, max_sequences=8, context_tokens=2048, exact=True)
        request.addfinalizer(decoder.close)
    else:
        from medgemma_triton.runtime.decoder import OnnxDecoder

        decoder = OnnxDecoder(request.getfixturevalue("tiny_onnx") / "decoder.onnx", spec, intra_op_threads=1)
    return spec, decoder, load_tokenizer(str(tiny_checkpoint))


def _requests(tokenizer, streams) -> list[GenerationRequest]:
    requests = []
    for (prompt, max_tokens, streaming), stream in zip(PROMPTS, streams):
        input_ids = np.array(tokenizer.encode(prompt).ids, dtype=np.int64)
        options = GenerationOptions(SamplingParams(max_tokens=max_tokens, temperature=0.0), stream=streaming)
        requests.append(GenerationRequest(input_ids, None, options, stream))
    return requests


def _engine(spec, decoder, tokenizer, probe=None, stream_interval=1, **kwargs) -> Engine:
    """An engine over `decoder` that streams every token unless told otherwise; `probe`: the tokenizer
    it may use to see when a stream's text shows."""
    return Engine(
        decoder,
        tokenizer=probe,
        eos_ids=spec.tokens.eos,
        max_positions=spec.text.max_position_embeddings,
        stream_interval=stream_interval,
        **kwargs,
    )


def _wait(streams) -> None:
    for stream in streams:
        assert stream.done.wait(TIMEOUT_S), "a request never finished"
        assert stream.error is None, stream.error


@pytest.fixture(scope="module")
def alone(tiny) -> list[list[int]]:
    """Each request served by itself (one request in the engine at a time)."""
    spec, decoder, tokenizer = tiny
    recording = RecordingDecoder(decoder)
    engine = _engine(spec, recording, tokenizer)
    try:
        results = []
        for request in _requests(tokenizer, [ListStream() for _ in PROMPTS]):
            engine.submit(request)
            _wait([request.stream])
            results.append(request.stream.ids)
    finally:
        engine.shutdown()
    assert set(recording.decode_batch_sizes) == {1}
    assert all(len(ids) > 3 for ids in results), "every request must need several decode steps"
    return results


def _together(spec, decoder, tokenizer, streams, **engine_options) -> RecordingDecoder:
    """Every request submitted at once; the decoder starts only when all of them are admitted."""
    engine_box: list[Engine] = []

    def until_all_admitted():
        # Runs on the scheduler thread, in the first request's prefill: wait until the others are
        # queued (admitted, or already taken by the scheduler to wait for, or start, their prefill).
        engine = engine_box[0]
        deadline = time.monotonic() + TIMEOUT_S
        while engine._admitted.qsize() + len(engine._waiting) + len(engine._prefilling) < len(streams):
            assert time.monotonic() < deadline, "requests were never admitted"
            time.sleep(0.01)

    recording = RecordingDecoder(decoder, hold_first_prefill=until_all_admitted)
    engine = _engine(spec, recording, tokenizer, **engine_options)
    engine_box.append(engine)
    try:
        for request in _requests(tokenizer, streams):
            engine.submit(request)
        for stream in streams:
            assert stream.done.wait(TIMEOUT_S), "a request never finished"
    finally:
        engine.shutdown()
    return recording


@pytest.mark.parametrize("decode_max_batch_size", [8, 2])
def test_concurrent_requests_decode_in_batches_token_identical(tiny, alone, decode_max_batch_size):
    spec, decoder, tokenizer = tiny
    streams = [ListStream() for _ in PROMPTS]
    recording = _together(spec, decoder, tokenizer, streams, decode_max_batch_size=decode_max_batch_size)
    for stream in streams:
        assert stream.error is None, stream.error

    sizes = recording.decode_batch_sizes
    print(f"\ndecode_max_batch_size={decode_max_batch_size}: batch sizes per decode call {sizes}")
    assert max(sizes) == min(len(PROMPTS), decode_max_batch_size), "concurrent requests must share decode calls"
    assert [s.ids for s in streams] == alone
    if recording.mixes_prefill_and_decode:  # llama.cpp: several prompts in one call
        assert max(chunks for chunks, _ in recording.mixed_calls) >= 2, recording.mixed_calls
    for stream, (_, max_tokens, streaming) in zip(streams, PROMPTS):
        assert stream.chunks[-1].finish_reason in ("stop", "length")
        assert stream.chunks[-1].completion_tokens == len(stream.ids) <= max_tokens
        assert len(stream.chunks) == (len(stream.ids) if streaming else 1)


def test_a_cancelled_request_leaves_the_batch(tiny, alone):
    """One request's client goes away mid-way; the others' tokens stay those of decoding alone."""
    spec, decoder, tokenizer = tiny
    streams = [ListStream() for _ in PROMPTS]
    streams[0].cancel_after_chunks = 3  # a streaming request: three tokens, then its client is gone
    recording = _together(spec, decoder, tokenizer, streams, cancel_check_s=0.0)  # asked every step

    assert streams[0].closed and streams[0].error is None
    assert streams[0].ids == alone[0][:3]
    assert [s.ids for s in streams[1:]] == alone[1:]
    assert max(recording.decode_batch_sizes) == len(PROMPTS)
    assert FINISH_CANCELLED not in [s.chunks[-1].finish_reason for s in streams[1:]]


def test_clients_are_asked_about_cancellation_at_most_every_cancel_check_s(tiny, alone):
    """is_cancelled() is rationed per request (a server round trip each); a cancellation still lands."""
    spec, decoder, tokenizer = tiny
    streams = [ListStream() for _ in PROMPTS]
    streams[0].cancel_after_chunks = 3
    started = time.monotonic()
    _together(spec, decoder, tokenizer, streams, cancel_check_s=0.05)
    elapsed = time.monotonic() - started

    assert streams[0].closed and streams[0].error is None
    assert len(streams[0].ids) >= 3 and streams[0].ids == alone[0][: len(streams[0].ids)]
    assert [s.ids for s in streams[1:]] == alone[1:]
    for stream in streams:
        # one at admission, then one per 0.05 s at most, whatever the number of steps
        assert stream.cancel_checks <= 2 + elapsed / 0.05, (stream.cancel_checks, elapsed)


def _first_text_at(tokenizer, ids: list[int]) -> int:
    """How many tokens it takes for the text to show: decoded, non-empty, not ending inside a character."""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        if text and not text.endswith("\ufffd"):
            return n
    return len(ids)


@pytest.mark.parametrize("stream_interval", [1, 4])
@pytest.mark.parametrize("probe", [True, False], ids=["tokenizer", "no-tokenizer"])
def test_a_stream_interval_groups_tokens_after_the_first_text(tiny, alone, stream_interval, probe):
    """Streaming requests get each token at once until their text shows (with a tokenizer; without
    one, the first token counts as text), then `stream_interval` tokens per response; the tokens are
    those of every-token streaming."""
    spec, decoder, tokenizer = tiny
    streams = [ListStream() for _ in PROMPTS]
    _together(spec, decoder, tokenizer, streams, stream_interval=stream_interval, probe=tokenizer if probe else None)
    assert [s.ids for s in streams] == alone
    for stream, (_, _, streaming) in zip(streams, PROMPTS):
        tokens = len(stream.ids)
        sizes = [len(chunk.output_ids) for chunk in stream.chunks]
        first_text_at = _first_text_at(tokenizer, stream.ids) if probe else 1
        assert sizes == (stream_interval_sizes(tokens, first_text_at, stream_interval) if streaming else [tokens])
        assert [c.completion_tokens for c in stream.chunks] == list(np.cumsum(sizes))


def test_a_stream_interval_below_one_is_refused(tiny):
    spec, decoder, tokenizer = tiny
    with pytest.raises(ValueError, match="stream_interval"):
        _engine(spec, decoder, tokenizer, stream_interval=0)


class CountingCounters:
    """engine.Counters that keep what the llm would report as Triton metrics."""

    def __init__(self):
        self.cancelled_requests = 0
        self.refused_requests = 0
        self.finished_reasons: list[str] = []

    def generated_tokens(self, n: int) -> None:
        pass

    def cancelled(self) -> None:
        self.cancelled_requests += 1

    def refused(self) -> None:
        self.refused_requests += 1

    def finished(self, reason: str) -> None:
        self.finished_reasons.append(reason)

    def active(self, n: int) -> None:
        pass

    def queued(self, n: int) -> None:
        pass


@pytest.mark.parametrize("reason", [FINISH_CANCELLED, FINISH_STOP])
def test_stop_by_request_id_ends_the_request_and_counts_its_reason(tiny, reason):
    """`medgemma` stops an llm request by id when its client cancels (cancelled) or a stop word matched
    (stop): the request ends without more tokens, and only a cancellation counts as cancelled. A stop
    that arrives before its request (sent while the request was still on its way) is kept for it."""
    spec, decoder, tokenizer = tiny
    counters = CountingCounters()
    engine = _engine(spec, decoder, tokenizer, counters=counters)
    try:
        early = ListStream()
        options = GenerationOptions(SamplingParams(max_tokens=30, temperature=0.0), stream=True)
        ids = np.array(tokenizer.encode(PROMPTS[0][0]).ids, dtype=np.int64)
        engine.stop("early", reason)
        engine.submit(GenerationRequest(ids, None, options, early, request_id="early"))
        assert early.done.wait(TIMEOUT_S)
        assert early.closed and early.ids == []

        late = ListStream()
        engine.submit(GenerationRequest(ids, None, options, late, request_id="late"))
        deadline = time.monotonic() + TIMEOUT_S
        while not late.chunks:  # the first token is out: the request is decoding
            assert time.monotonic() < deadline
            time.sleep(0.005)
        engine.stop("late", reason)
        assert late.done.wait(TIMEOUT_S)
        assert late.closed and len(late.ids) < 30
    finally:
        engine.shutdown()
    assert counters.finished_reasons == [reason, reason]
    assert counters.cancelled_requests == (2 if reason == FINISH_CANCELLED else 0)


class SlowDecoder(RecordingDecoder):
    """Each decode step takes at least `step_s` (a stand-in for a big model), so deadlines land mid-way."""

    def __init__(self, decoder, step_s: float, hold_first_prefill=None):
        super().__init__(decoder, hold_first_prefill)
        self.step_s = step_s

    def step(self, state, token_id):
        time.sleep(self.step_s)
        return super().step(state, token_id)

    def step_batch(self, states, token_ids):
        time.sleep(self.step_s)
        return super().step_batch(states, token_ids)


def test_beyond_active_and_queued_a_request_is_refused_at_once(tiny, alone):
    """max_active_requests 1 + max_queued 1: a third concurrent request is refused as busy, naming the
    limit, and counted; the admitted two finish with the tokens of decoding alone."""
    from medgemma_triton.contract import SERVER_BUSY_PREFIX

    spec, decoder, tokenizer = tiny
    counters = CountingCounters()
    release = threading.Event()
    engine = _engine(spec, RecordingDecoder(decoder, hold_first_prefill=lambda: release.wait(TIMEOUT_S)),
                     tokenizer, max_active_requests=1, max_queued=1, counters=counters)
    try:
        streams = [ListStream() for _ in range(3)]
        requests = _requests(tokenizer, streams)
        for request in requests:
            engine.submit(request)
        assert streams[2].done.is_set() and streams[2].error.startswith(SERVER_BUSY_PREFIX)
        assert "1 max_active_requests + 1 queued, MEDGEMMA_MAX_QUEUED" in streams[2].error
        release.set()
        _wait(streams[:2])
        assert [s.ids for s in streams[:2]] == alone[:2]
        late = ListStream()  # the slots are free again
        engine.submit(_requests(tokenizer, [ListStream(), ListStream(), ListStream(), late])[3])
        _wait([late])
        assert late.ids == alone[3]
    finally:
        engine.shutdown()
    assert counters.refused_requests == 1


def test_a_deadline_stops_generation_with_what_was_generated(tiny, alone):
    """A request whose deadline passes mid-way ends with finish_reason `timeout` and the tokens it had
    (a prefix of decoding alone); one whose deadline passed before it started generates nothing."""
    from medgemma_triton.contract import FINISH_TIMEOUT

    spec, decoder, tokenizer = tiny
    counters = CountingCounters()
    engine = _engine(spec, SlowDecoder(decoder, step_s=0.02), tokenizer, counters=counters)
    try:
        mid, expired = ListStream(), ListStream()
        first = _requests(tokenizer, [mid, ListStream(), ListStream(), ListStream()])[0]  # 24 tokens: >= 0.46 s
        first.deadline = time.monotonic() + 0.2
        engine.submit(first)
        _wait([mid])
        second = _requests(tokenizer, [expired, ListStream(), ListStream(), ListStream()])[0]
        second.deadline = time.monotonic() - 1.0
        engine.submit(second)
        _wait([expired])
    finally:
        engine.shutdown()
    assert mid.chunks[-1].finish_reason == FINISH_TIMEOUT
    assert len(mid.ids) < PROMPTS[0][1] and mid.ids == alone[0][: len(mid.ids)]
    assert mid.chunks[-1].completion_tokens == len(mid.ids)
    assert expired.ids == [] and expired.chunks[-1].finish_reason == FINISH_TIMEOUT
    assert counters.finished_reasons == [FINISH_TIMEOUT, FINISH_TIMEOUT] and counters.cancelled_requests == 0


def test_a_long_prompt_is_prefilled_in_chunks_between_the_others_decode_steps(tiny):
    """prefill_chunk_tokens 16: a request that is decoding keeps getting tokens while a long prompt
    prefills a chunk per pass, and both answer with the tokens of an engine that prefills in one call."""
    spec, decoder, tokenizer = tiny
    long_prompt = "Summarise this report: " + "no acute cardiopulmonary process, lungs clear. " * 20
    prompts = [("What are the signs of pneumonia on a chest X-ray?", 120, True), (long_prompt, 8, False)]

    def run(chunk_tokens: int) -> tuple[list[list[int]], RecordingDecoder]:
        recording = RecordingDecoder(decoder)
        engine = _engine(spec, recording, tokenizer, prefill_chunk_tokens=chunk_tokens)
        streams = [ListStream(), ListStream()]
        try:
            for (prompt, max_tokens, streaming), stream in zip(prompts, streams):
                ids = np.array(tokenizer.encode(prompt).ids, dtype=np.int64)
                options = GenerationOptions(SamplingParams(max_tokens=max_tokens, temperature=0.0), stream=streaming)
                engine.submit(GenerationRequest(ids, None, options, stream))
                if stream is streams[0]:  # the first is decoding before the long one arrives
                    deadline = time.monotonic() + TIMEOUT_S
                    while not stream.chunks:
                        assert time.monotonic() < deadline
                        time.sleep(0.001)
            _wait(streams)
        finally:
            engine.shutdown()
        return [stream.ids for stream in streams], recording

    whole, whole_recording = run(0)
    chunked, recording = run(16)
    assert chunked == whole
    assert len(chunked[0]) == 120  # still decoding through the long prompt's prefill
    assert max(whole_recording.prefill_chunks) > 100  # the long prompt in one call
    long_chunks = recording.prefill_chunks[1:]  # [0] is the first request's prompt
    assert len(long_chunks) >= 6 and max(long_chunks) <= 16, recording.prefill_chunks
    first, last = recording.events.index("prefill", 1), len(recording.events) - 1 - recording.events[::-1].index("prefill")
    between = recording.events[first:last]
    assert between.count("step") >= len(long_chunks) - 1, between  # a decode step after every chunk
    if recording.mixes_prefill_and_decode:  # llama.cpp: each chunk in the same call as the other's step
        assert sum(1 for chunks, steps in recording.mixed_calls if chunks and steps) >= len(long_chunks) - 1


class FailingMixedDecoder(RecordingDecoder):
    """decode_mixed fails on its first `failures` calls (as a full KV cache would), changing nothing."""

    def __init__(self, decoder, failures: int, hold_first_prefill=None):
        super().__init__(decoder, hold_first_prefill)
        self.failures = failures

    def decode_mixed(self, prefills, states, token_ids):
        if self.failures:
            self.failures -= 1
            raise RuntimeError("llama.cpp's KV cache is full")
        return super().decode_mixed(prefills, states, token_ids)


def test_a_failed_mixed_call_runs_its_chunks_and_steps_apart(tiny, alone):
    """When one call of prompt chunks and decode steps fails, the engine prefills and steps them in calls
    of their own: every request still gets the tokens of decoding alone."""
    spec, decoder, tokenizer = tiny
    if not getattr(decoder, "mixes_prefill_and_decode", False):
        pytest.skip("ONNX Runtime's decoder has no mixed calls")
    recording = FailingMixedDecoder(decoder, failures=1)
    engine = _engine(spec, recording, tokenizer)
    streams = [ListStream() for _ in PROMPTS]
    try:
        for request in _requests(tokenizer, streams):
            engine.submit(request)
        _wait(streams)
    finally:
        engine.shutdown()
    assert recording.failures == 0 and "prefill" in recording.events
    assert [s.ids for s in streams] == alone
