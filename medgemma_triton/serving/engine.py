"""The `llm` model's generation engine: a scheduler thread that serves many requests at once.

Token ids (and image embeddings) in, token ids out: the `medgemma` model encodes images (through
`vision_encoder`) before the request reaches the llm, and decodes the text and applies stop words
after it (serving/text.py), stopping the request by id when a stop word matched.

Assumptions this rests on (asserted where they can be):
- One engine per model instance owns the decoder session and every active sequence; only the
  scheduler thread touches them.
- Decoding is continuously batched: each scheduler pass gives every active request one decode step,
  in OnnxDecoder.step_batch calls of at most `decode_max_batch_size` sequences (usually one call), so
  concurrent streams advance together. Requests join after their prefill and leave when finished or
  cancelled, between steps; each keeps its own Sampler, stop words and limits. step_batch's rows are
  token-identical to step() (tests/test_batched_decode.py, tests/test_engine_batching.py).
- A prompt is prefilled in chunks of about `prefill_chunk_tokens` (0: in one call), and each scheduler
  pass prefills about that many prompt tokens (whole chunks, oldest request first) before the other
  requests' decode step: a long prompt (a CT volume: ~22,000 tokens at 4B) holds their next token
  for a chunk, not for its whole prefill, and its attention scores are one chunk's rows; short
  prompts still start together. A chunk never ends inside an image (the decoder's chunk_ends: the
  same-image bidirectional mask needs the whole image in one call). A prefilling request holds a slot.
- A decoder that can mix them (`mixes_prefill_and_decode`: llama.cpp) gets the pass's text chunks and
  the first decode batch in one call (decode_mixed): the weights are read once for both, and several
  short prompts fill one batch as llama-batched-bench prefills them. Image chunks still run alone.
- A streaming request gets every token at once until its text shows (a first token may decode to
  nothing yet: part of a multi-byte character), then a response every `stream_interval` tokens (and
  its last): each response is several round trips between processes (llm -> medgemma -> client),
  which a small CPU host pays for in decode speed. 1 streams every token; built repositories default
  to 4 (CpuSettings in repository/cpu.py). Given a tokenizer, the engine decodes a request's
  first tokens only to see when its text shows (`first_text_pending`); without one, the first token
  counts as text.
- A client's cancellation is noticed within `cancel_check_s` (is_cancelled() is a server round trip);
  stop() requests and a request's deadline are noticed at the next step. A request still waiting for
  a decode slot when its deadline passes ends then, with finish_reason "timeout" and no tokens, even
  while the scheduler is inside a long prefill or decode step: a watcher thread (`_WaitDeadlines`)
  takes it out of the queue, and the scheduler skips it.
- At most `max_active_requests` decode and `max_queued` wait; a request beyond that is refused at
  once as busy (contract.SERVER_BUSY_PREFIX), so overload never turns into an unbounded queue.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping, Protocol

import numpy as np

from medgemma_triton.contract import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_TIMEOUT,
    SERVER_BUSY_PREFIX,
    SERVER_STOPPING_PREFIX,
)
from medgemma_triton.runtime.detokenize import IncrementalDetokenizer
from medgemma_triton.runtime.limits import InvalidRequest
from medgemma_triton.runtime.sampling import Sampler
from medgemma_triton.serving.options import GenerationOptions
from medgemma_triton.serving.parameters import LlmParameters
from medgemma_triton.serving.stops import StopRegistry

log = logging.getLogger(__name__)

CANCEL_CHECK_S = 0.05  # how often an active request's client is asked whether it cancelled


@dataclass(frozen=True)
class Chunk:
    """One response of a request: what the llm model turns into output tensors."""

    output_ids: list[int]
    finish_reason: str  # "" until the last response
    prompt_tokens: int
    completion_tokens: int


class ResponseStream(Protocol):
    """One request's way back to its client (Triton's response sender, or a test's list)."""

    def send(self, chunk: Chunk, final: bool) -> None: ...

    def fail(self, message: str, invalid_request: bool) -> None: ...  # a final error response

    def close(self) -> None: ...  # final, no data (the client has gone)

    def is_cancelled(self) -> bool: ...


class Counters(Protocol):
    def generated_tokens(self, n: int) -> None: ...

    def cancelled(self) -> None: ...

    def refused(self) -> None: ...  # refused as busy

    def finished(self, reason: str) -> None: ...

    def active(self, n: int) -> None: ...

    def queued(self, n: int) -> None: ...  # waiting for a decode slot


class NoCounters:
    def generated_tokens(self, n: int) -> None:
        pass

    def cancelled(self) -> None:
        pass

    def refused(self) -> None:
        pass

    def finished(self, reason: str) -> None:
        pass

    def active(self, n: int) -> None:
        pass

    def queued(self, n: int) -> None:
        pass


@dataclass
class GenerationRequest:
    input_ids: np.ndarray  # int64 [T]
    image_embeddings: np.ndarray | None  # float32 [N, mm_tokens, hidden]; None or N == 0 without images
    options: GenerationOptions
    stream: ResponseStream
    request_id: str = ""  # what stop() names; "" cannot be stopped that way
    deadline: float | None = None  # time.monotonic() after which generation stops (FINISH_TIMEOUT)


@dataclass(eq=False)  # compared by identity
class _Sequence:
    request: GenerationRequest
    image_embeddings: np.ndarray | None  # [N * mm_tokens, hidden] until the prefill
    sampler: Sampler
    state: object = None
    generated: int = 0
    pending_ids: list[int] = field(default_factory=list)  # generated, not yet sent (non-streaming, stream_interval)
    next_token: int | None = None
    prefill_ends: list[int] = field(default_factory=list)  # where its remaining prefill chunks end
    prefilled: int = 0  # prompt tokens in its KV cache
    cancel_checked_at: float = 0.0  # time.monotonic() of the last stream.is_cancelled()
    first_text_pending: IncrementalDetokenizer | None = None  # until the text shows; then None
    dropped: bool = False  # finished, failed or cancelled: no longer counted against the limits
    waiting: bool = True  # until the scheduler starts its prefill, or its deadline passes while waiting

    @property
    def prompt_tokens(self) -> int:
        return int(self.request.input_ids.shape[0])


class _WaitDeadlines:
    """Requests with a deadline that wait for a decode slot; a watcher thread calls `on_expired(sequence)`
    at each one's deadline unless the scheduler has taken the request first (`leave`). Either one
    clears `sequence.waiting`, under this object's lock, so exactly one of them owns the request."""

    def __init__(self, on_expired):
        self._on_expired = on_expired
        self._heap: list[tuple[float, int, _Sequence]] = []
        self._order = itertools.count()  # ties in deadline: never compare sequences
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llm-wait-deadlines", daemon=True)
        self._thread.start()

    def add(self, sequence: _Sequence) -> None:
        if sequence.request.deadline is None:
            return
        with self._changed:
            heapq.heappush(self._heap, (sequence.request.deadline, next(self._order), sequence))
            self._changed.notify()

    def leave(self, sequence: _Sequence) -> bool:
        """The scheduler takes `sequence` out of the queue; False if its deadline has ended it already."""
        with self._changed:
            if not sequence.waiting:
                return False
            sequence.waiting = False
            if sequence.request.deadline is not None:  # at most max_active_requests + max_queued entries
                self._heap = [entry for entry in self._heap if entry[2] is not sequence]
                heapq.heapify(self._heap)
            return True

    def close(self, timeout_s: float = 5.0) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._changed.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                _, _, sequence = heapq.heappop(self._heap)
                if not sequence.waiting:
                    continue
                sequence.waiting = False
            try:
                self._on_expired(sequence)
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
                log.exception("ending a request whose deadline passed while it waited failed")


def llm_engine(parameters: Mapping[str, str], spec, path, *, tokenizer=None, counters: Counters | None = None,
               max_queued: int | None = None) -> "Engine":
    """The llm model's engine from its config.pbtxt parameters (LlmParameters, each with its one default):
    the served llm and the in-process pipeline (bench/overhead.py) both build theirs here. The decoder is
    a GGUF in llama.cpp when `gguf_model` is set (int4/int8), else decoder.onnx in ONNX Runtime; path(key)
    resolves a file parameter. llama.cpp's requests share one KV cache of kv_cache_tokens, which bounds
    the longest request."""
    settings = LlmParameters.from_config(parameters)
    max_positions = spec.text.max_position_embeddings
    if parameters.get("gguf_model"):
        from medgemma_triton.runtime.llamacpp import LlamaDecoder

        decoder = LlamaDecoder(path("gguf_model"), spec, threads=settings.threads,
                               max_sequences=settings.max_active_requests, context_tokens=settings.kv_cache_tokens)
        max_positions = min(max_positions, decoder.context_tokens)
    else:
        from medgemma_triton.runtime.decoder import OnnxDecoder

        decoder = OnnxDecoder(path("onnx_model"), spec, intra_op_threads=settings.threads)
    return Engine(decoder, eos_ids=spec.tokens.eos, max_positions=max_positions, multimodal=spec.multimodal,
                  tokenizer=tokenizer, max_active_requests=settings.max_active_requests,
                  decode_max_batch_size=settings.decode_max_batch_size, stream_interval=settings.stream_interval,
                  prefill_chunk_tokens=settings.prefill_chunk_tokens, counters=counters,
                  **({} if max_queued is None else {"max_queued": max_queued}))


class Engine:
    def __init__(
        self,
        decoder,
        eos_ids: tuple[int, ...],
        max_positions: int,
        multimodal: bool = True,
        tokenizer=None,
        max_active_requests: int = LlmParameters.max_active_requests,
        decode_max_batch_size: int = LlmParameters.decode_max_batch_size,
        max_queued: int = 32,
        counters: Counters | None = None,
        cancel_check_s: float = CANCEL_CHECK_S,
        stream_interval: int = LlmParameters.stream_interval,
        prefill_chunk_tokens: int = LlmParameters.prefill_chunk_tokens,
    ):
        self.decoder = decoder
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.max_positions = int(max_positions)
        self.multimodal = bool(multimodal)
        self.tokenizer = tokenizer  # only to see when a stream's first text shows
        # LlmParameters checks them, as it checks the parameters of a repository being built
        checked = LlmParameters(max_active_requests=int(max_active_requests),
                                decode_max_batch_size=int(decode_max_batch_size),
                                stream_interval=int(stream_interval), prefill_chunk_tokens=int(prefill_chunk_tokens))
        self.max_active_requests = checked.max_active_requests
        self.decode_max_batch_size = checked.decode_max_batch_size
        self.stream_interval = checked.stream_interval
        self.prefill_chunk_tokens = checked.prefill_chunk_tokens
        self.max_queued = int(max_queued)
        if self.max_queued < 0:
            raise ValueError(f"max_queued ({max_queued}) must be >= 0 (MEDGEMMA_MAX_QUEUED)")
        self._count_lock = threading.Lock()
        self._in_engine = 0  # submitted and not yet dropped: active + waiting + admitted
        self.counters = counters or NoCounters()
        self.cancel_check_s = float(cancel_check_s)
        self._admitted: queue.Queue[_Sequence | None] = queue.Queue()
        self._active: list[_Sequence] = []  # decoding
        self._prefilling: list[_Sequence] = []  # oldest first; one chunk of the first per pass
        self._waiting: list[_Sequence] = []
        self._stopping = threading.Event()
        self._draining = threading.Event()  # shutdown() has begun: no new requests
        self._stops = StopRegistry()  # stop() calls by request id, kept until their request ends
        self._wait_deadlines = _WaitDeadlines(self._expire_waiting)
        self._thread = threading.Thread(target=self._run, name="llm-scheduler", daemon=True)
        self._thread.start()

    # --- called from Triton's execute() thread ---

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request for the scheduler (checked here, so a bad one fails before it waits)."""
        if self._stopping.is_set() or self._draining.is_set():
            request.stream.fail(f"{SERVER_STOPPING_PREFIX}the llm model is shutting down", invalid_request=False)
            return
        embeddings = request.image_embeddings
        if embeddings is not None and embeddings.shape[0] > 0:
            if not self.multimodal:
                request.stream.fail("this deployment has no vision encoder; send text only", invalid_request=True)
                return
            embeddings = embeddings.reshape(-1, embeddings.shape[-1])  # [N*mm_tokens, hidden]
        else:
            embeddings = None
        with self._count_lock:
            busy = self._in_engine >= self.max_active_requests + self.max_queued
            if not busy:
                self._in_engine += 1
            in_engine = self._in_engine
        if busy:
            self.counters.refused()
            active = min(in_engine, self.max_active_requests)
            request.stream.fail(
                f"{SERVER_BUSY_PREFIX}{active} requests decoding and {in_engine - active} queued, the limit "
                f"({self.max_active_requests} max_active_requests + {self.max_queued} queued, MEDGEMMA_MAX_QUEUED); "
                "retry later",
                invalid_request=False,
            )
            return
        probe = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None and request.options.stream else None
        sequence = _Sequence(request=request, image_embeddings=embeddings,
                             sampler=Sampler(request.options.sampling), first_text_pending=probe)
        self._wait_deadlines.add(sequence)
        self._admitted.put(sequence)

    def stop(self, request_id: str, reason: str = FINISH_CANCELLED) -> None:
        """Stop the request with this id (from any thread): FINISH_CANCELLED as if its client had
        cancelled it, FINISH_STOP when `medgemma` found a stop word in its text. A stop that comes
        before its request is kept until the request arrives (serving/stops.py)."""
        self._stops.stop(request_id, reason)

    def shutdown(self, timeout_s: float = 10.0, drain_timeout_s: float = 0.0) -> None:
        """Refuse new requests, let those already here finish for up to `drain_timeout_s`, then stop the
        scheduler; a request still here then fails as shutting down."""
        # A metric update is a round trip to the server, which stops answering as this model unloads:
        # the scheduler must never wait on one then (the process could not exit).
        self.counters = NoCounters()
        self._draining.set()
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and self._thread.is_alive():
            with self._count_lock:
                if not self._in_engine:
                    break
            time.sleep(0.05)
        self._stopping.set()
        self._admitted.put(None)
        self._thread.join(timeout_s)
        self._wait_deadlines.close()

    # --- the scheduler thread ---

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._pass()
            except Exception:  # noqa: BLE001 - the scheduler must outlive any one failure
                log.exception("llm scheduler pass failed")
        for sequence in self._active + self._prefilling + [s for s in self._waiting if self._wait_deadlines.leave(s)]:
            sequence.request.stream.fail("the llm model is shutting down", invalid_request=False)

    def _pass(self) -> None:
        """Admit what fits, prefill up to prefill_chunk_tokens of prompts (oldest first, whole chunks),
        then give every active request one decode step, batched."""
        self._take_admitted(block=not self._active and not self._waiting and not self._prefilling)
        self._waiting = [s for s in self._waiting if s.waiting]  # without those whose deadline ended them
        while self._waiting and len(self._active) + len(self._prefilling) < self.max_active_requests:
            sequence = self._waiting.pop(0)
            if self._wait_deadlines.leave(sequence):
                self._guarded(sequence, self._start_prefill)
        plan = self._prefill_plan()
        mixed = self._mixed_chunks(plan)
        for sequence, end in plan:  # the chunks that run in calls of their own, oldest first
            if sequence in self._prefilling and end <= mixed.get(sequence, (end, end))[0]:
                self._guarded(sequence, self._prefill_chunk, ask_client=self._time_to_ask(sequence))
        mixed = {s: span for s, span in mixed.items() if not self._cancel_if_asked(s)}
        self.counters.active(len(self._active) + len(self._prefilling))
        self.counters.queued(len(self._waiting) + self._admitted.qsize())
        if not self._active:
            self.decoder.release_batch()
        stepping = [s for s in list(self._active) if not self._cancel_if_asked(s)]
        batches = [stepping[start : start + self.decode_max_batch_size]
                   for start in range(0, len(stepping), self.decode_max_batch_size)]
        if mixed:
            self._decode_mixed(mixed, batches.pop(0) if batches else [])
        for batch in batches:
            self._step_batch(batch)
        self._stops.forget_old()

    def _prefill_plan(self) -> list[tuple[_Sequence, int]]:
        """The prompt chunks this pass prefills, as (sequence, chunk end): about prefill_chunk_tokens of
        prompt tokens, whole chunks, oldest request first (the first chunk always runs: it may hold a
        whole image)."""
        budget = self.prefill_chunk_tokens or float("inf")
        plan = []
        for sequence in self._prefilling:
            start = sequence.prefilled
            for end in sequence.prefill_ends:
                if plan and end - start > budget:
                    return plan
                budget -= end - start
                plan.append((sequence, end))
                start = end
        return plan

    def _mixed_chunks(self, plan: list[tuple[_Sequence, int]]) -> dict[_Sequence, tuple[int, int]]:
        """The planned chunks that join the decode step's decoder call, where the decoder can mix them
        (llama.cpp: one llama_decode reads the weights once for prompts and steps alike): per sequence,
        (start, end) of its last planned chunks that hold text only, as many as fit the decoder's rows
        beside one row per decoding request. Its earlier chunks (an image) run in calls of their own."""
        if not getattr(self.decoder, "mixes_prefill_and_decode", False):
            return {}
        ends: dict[_Sequence, list[int]] = {}
        for sequence, end in plan:
            ends.setdefault(sequence, []).append(end)
        rows = min(len(self._active) + len(ends), self.decode_max_batch_size)
        mixed = {}
        for sequence, chunk_ends in ends.items():
            starts = [sequence.prefilled, *chunk_ends[:-1]]
            first = len(chunk_ends)
            while first and self.decoder.text_only(sequence.state, starts[first - 1], chunk_ends[first - 1]):
                first -= 1
            if first == len(chunk_ends) or rows + chunk_ends[-1] - starts[first] > self.decoder.n_batch:
                continue
            rows += chunk_ends[-1] - starts[first]
            mixed[sequence] = (starts[first], chunk_ends[-1])
        return mixed

    def _decode_mixed(self, mixed: dict[_Sequence, tuple[int, int]], batch: list[_Sequence]) -> None:
        """One decoder call prefills each mixed sequence's text chunks and steps `batch`."""
        chunks = [(sequence, end) for sequence, (_, end) in mixed.items()]
        try:
            prompt_logits, step_logits = self.decoder.decode_mixed(
                [(s.state, end) for s, end in chunks], [s.state for s in batch], [s.next_token for s in batch])
        except Exception:  # noqa: BLE001 - decode_mixed changes no state when it fails
            log.exception("a decoder call of %d prompt chunks and %d decode steps failed; running them apart",
                          len(chunks), len(batch))
            for sequence, end in chunks:
                while sequence in self._prefilling and sequence.prefill_ends[0] <= end:
                    self._guarded(sequence, self._prefill_chunk, check_cancelled=False)
            if batch:
                self._step_batch(batch)
            return
        for (sequence, end), logits in zip(chunks, prompt_logits):
            sequence.prefill_ends = [e for e in sequence.prefill_ends if e > end]
            self._guarded(sequence, lambda s, end=end, logits=logits: self._prefilled(s, end, logits),
                          check_cancelled=False)
        for sequence, row in zip(batch, step_logits):
            self._guarded(sequence, lambda s, row=row: self._accept(s, s.sampler.sample(row)), check_cancelled=False)

    def _take_admitted(self, block: bool) -> None:
        try:
            item = self._admitted.get(timeout=0.5) if block else self._admitted.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            self._waiting.append(item)
            try:
                item = self._admitted.get_nowait()
            except queue.Empty:
                return

    def _cancel_if_asked(self, sequence: _Sequence) -> bool:
        """Cancel the request if stop() named it or its client went away; True if it was.

        stop() is checked every step. is_cancelled() is a round trip to the server in Triton's Python
        backend, so it is asked at most every `cancel_check_s` per request, not every step.
        """
        self._guarded(sequence, lambda sequence: None, ask_client=self._time_to_ask(sequence))
        return sequence not in self._active and sequence not in self._prefilling

    def _time_to_ask(self, sequence: _Sequence) -> bool:
        """True (and the time noted) when `cancel_check_s` has passed since the request's client was last asked."""
        now = time.monotonic()
        if now - sequence.cancel_checked_at < self.cancel_check_s:
            return False
        sequence.cancel_checked_at = now
        return True

    def _guarded(self, sequence: _Sequence, work, check_cancelled: bool = True, ask_client: bool = True) -> None:
        """Run work(sequence) unless the request was stopped or (ask_client) its client cancelled it;
        a failure fails this request only."""
        try:
            deadline = sequence.request.deadline
            if deadline is not None and time.monotonic() >= deadline:
                self._expire(sequence)
                return
            if check_cancelled:
                reason = self._stops.reason(sequence.request.request_id)
                if reason is None and ask_client and sequence.request.stream.is_cancelled():
                    reason = FINISH_CANCELLED
                if reason is not None:
                    self._cancel(sequence, reason)
                    return
            work(sequence)
        except InvalidRequest as exc:
            self._drop(sequence)
            sequence.request.stream.fail(str(exc), invalid_request=True)
        except Exception as exc:  # noqa: BLE001
            log.exception("generation failed")
            self._drop(sequence)
            try:
                sequence.request.stream.fail(f"generation failed: {type(exc).__name__}: {exc}", invalid_request=False)
            except Exception:  # noqa: BLE001 - the client may be gone
                log.exception("could not report a failed request")

    def _start_prefill(self, sequence: _Sequence) -> None:
        request = sequence.request
        sequence.cancel_checked_at = time.monotonic()  # _guarded asked the client just before this
        if sequence.prompt_tokens >= self.max_positions:
            raise InvalidRequest(
                f"the prompt is {sequence.prompt_tokens} tokens; the model's context is {self.max_positions}"
            )
        sequence.state = self.decoder.new_sequence(request.input_ids, sequence.image_embeddings)
        sequence.image_embeddings = None
        sequence.prefill_ends = self.decoder.chunk_ends(request.input_ids, self.prefill_chunk_tokens)
        self._prefilling.append(sequence)

    def _prefill_chunk(self, sequence: _Sequence) -> None:
        end = sequence.prefill_ends.pop(0)
        self._prefilled(sequence, end, self.decoder.prefill_chunk(sequence.state, end))

    def _prefilled(self, sequence: _Sequence, end: int, logits) -> None:
        """Its prompt is in the cache up to `end`; with the last chunk's logits, it starts decoding."""
        sequence.prefilled = end
        if logits is None:
            return
        self._prefilling.remove(sequence)
        self._active.append(sequence)
        self._accept(sequence, sequence.sampler.sample(logits))

    def _step(self, sequence: _Sequence) -> None:
        logits = self.decoder.step(sequence.state, sequence.next_token)
        self._accept(sequence, sequence.sampler.sample(logits))

    def _step_batch(self, batch: list[_Sequence]) -> None:
        """One decoder call appends each sequence's last token; each samples its own next token."""
        if len(batch) == 1:  # step() feeds the cache as is; step_batch would copy it into a batch
            self._guarded(batch[0], self._step, check_cancelled=False)
            return
        try:
            logits = self.decoder.step_batch([s.state for s in batch], [s.next_token for s in batch])
        except Exception:  # noqa: BLE001 - step_batch changes no state when it fails
            log.exception("a batched decode step of %d requests failed; stepping them one at a time", len(batch))
            for sequence in batch:
                self._guarded(sequence, self._step, check_cancelled=False)
            return
        assert logits.shape[0] == len(batch), "step_batch returns one row of logits per sequence"
        for sequence, row in zip(batch, logits):
            self._guarded(sequence, lambda s, row=row: self._accept(s, s.sampler.sample(row)), check_cancelled=False)

    def _accept(self, sequence: _Sequence, token: int) -> None:
        """Record a sampled token, decide whether the request is done, and respond."""
        self.counters.generated_tokens(1)
        sequence.generated += 1
        generated = sequence.generated
        reason = ""
        if token in self.eos_ids:
            reason = FINISH_STOP
        elif generated >= sequence.request.options.sampling.max_tokens:
            reason = FINISH_LENGTH
        elif sequence.prompt_tokens + generated >= self.max_positions:
            reason = FINISH_LENGTH
        sequence.pending_ids.append(token)
        sequence.next_token = token
        if reason:
            self._drop(sequence)
            self.counters.finished(reason)
        text_shown = self._first_text_shown(sequence, token)
        if reason or (
            sequence.request.options.stream and (text_shown or len(sequence.pending_ids) >= self.stream_interval)
        ):
            chunk = Chunk(
                output_ids=sequence.pending_ids,
                finish_reason=reason,
                prompt_tokens=sequence.prompt_tokens,
                completion_tokens=generated,
            )
            sequence.pending_ids = []
            sequence.request.stream.send(chunk, final=bool(reason))

    @staticmethod
    def _first_text_shown(sequence: _Sequence, token: int) -> bool:
        """True for every token up to and including the one with which the stream's text shows."""
        probe = sequence.first_text_pending
        if probe is None:
            return sequence.generated == 1  # without a tokenizer the first token counts as text
        if probe.add([token]):
            sequence.first_text_pending = None
        return True

    def _cancel(self, sequence: _Sequence, reason: str = FINISH_CANCELLED) -> None:
        """End a request that its client cancelled, or that stop() named (no further response data)."""
        self._drop(sequence)
        if reason == FINISH_CANCELLED:
            self.counters.cancelled()
        self.counters.finished(reason)
        sequence.request.stream.close()

    def _expire(self, sequence: _Sequence) -> None:
        """The request's deadline passed: end it with what it has generated (FINISH_TIMEOUT)."""
        self._drop(sequence)
        self.counters.finished(FINISH_TIMEOUT)
        chunk = Chunk(sequence.pending_ids, FINISH_TIMEOUT, sequence.prompt_tokens, sequence.generated)
        sequence.pending_ids = []
        sequence.request.stream.send(chunk, final=True)

    def _expire_waiting(self, sequence: _Sequence) -> None:
        """On the deadline watcher's thread: the deadline passed while the request waited for a decode
        slot (it generated nothing). The scheduler no longer touches it (`waiting` is cleared)."""
        self._release(sequence)
        self.counters.finished(FINISH_TIMEOUT)
        sequence.request.stream.send(Chunk([], FINISH_TIMEOUT, sequence.prompt_tokens, 0), final=True)

    def _drop(self, sequence: _Sequence) -> None:
        if sequence in self._active:
            self._active.remove(sequence)
        if sequence in self._prefilling:
            self._prefilling.remove(sequence)
        if sequence in self._waiting:
            self._waiting.remove(sequence)
        self._release(sequence)

    def _release(self, sequence: _Sequence) -> None:
        """Free what the request holds and its place in the limits (once, from any thread)."""
        self._stops.forget(sequence.request.request_id)
        state, sequence.state = sequence.state, None  # free the KV cache now
        if state is not None:
            self.decoder.release(state)
        with self._count_lock:
            if sequence.dropped:
                return
            sequence.dropped = True
            self._in_engine -= 1
