"""The `llm` answers each request once: the `medgemma` model polls for a stream's next tokens.

Why not a decoupled stream from the llm: Triton's Python backend stub (python_backend r24.10, the
Triton 2.51 we serve with; unchanged at f9088ff) deadlocks a process that waits for a decoupled BLS
stream's next response while its other threads make decoupled BLS calls. Three locks form a cycle:
- `ResponseIterator::Next` (src/pb_response_iterator.cc) wakes from its wait holding the iterator's
  mutex and then takes the GIL;
- `Stub::GetResponseIterator` (src/pb_stub.cc), called with the GIL by every `exec(decoupled=True)`,
  takes the stub's `response_iterator_map_mu_`;
- `Stub::ProcessBLSResponseDecoupled`, on the thread that receives every BLS response, holds
  `response_iterator_map_mu_` while it takes the iterator's mutex to enqueue the next response.
Seen under a soak (benchmarks/soak.py, 16 clients): every `medgemma` request in flight hung until its
client's deadline, and the model never recovered (thread dumps in docs/performance.md).

So every BLS call `medgemma` makes is answered by exactly one response, sent with the final flag,
and no iterator ever waits. A generation request (request id R) is answered with its first tokens
(all of them, for a client that does not stream); a `poll` request with id R is answered with every
token generated since the previous answer, merged into one response, as soon as there is one. An
answer with a finish reason, an error, or no tensors (the request was stopped) is the last; a poll
after it is refused. A request whose next answer nobody asks for within `abandoned_s` is reported
cancelled to the engine (its `medgemma` request is gone), and its mailbox is dropped.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from medgemma_triton.serving.engine import Chunk

ABANDONED_S = 60.0  # no poll for this long: the medgemma request that polled is gone
SWEEP_EVERY_S = 1.0

# deliver(sender, chunk, error): send one final response to `sender`: the chunk's tokens, or
# error=(message, invalid_request), or, with neither, an empty response (the request was stopped).
Deliver = Callable[[object, "Chunk | None", "tuple[str, bool] | None"], None]


def merge(first: Chunk | None, then: Chunk) -> Chunk:
    if first is None:
        return then
    return Chunk(first.output_ids + then.output_ids, then.finish_reason, then.prompt_tokens, then.completion_tokens)


@dataclass
class _Mailbox:
    waiting: object | None  # the sender of the request (generation or poll) to answer next
    chunk: Chunk | None = None  # tokens not yet answered, merged
    error: tuple[str, bool] | None = None
    ended: bool = False  # the engine has sent its last chunk, error or close
    answered_at: float = field(default_factory=time.monotonic)  # when `waiting` was last answered

    def answer(self) -> tuple[Chunk | None, tuple[str, bool] | None, bool] | None:
        """(chunk, error, last) to send to `waiting` now, or None while there is nothing to send."""
        if self.waiting is None or (self.chunk is None and self.error is None and not self.ended):
            return None
        chunk, error = (None, self.error) if self.error is not None else (self.chunk, None)
        last = self.ended and (error is not None or chunk is None or bool(chunk.finish_reason))
        self.chunk = None
        return chunk, error, last


class Mailboxes:
    """Every generation's undelivered tokens, by request id; thread-safe."""

    def __init__(self, deliver: Deliver, abandoned_s: float = ABANDONED_S, clock=time.monotonic):
        self._deliver = deliver
        self.abandoned_s = abandoned_s
        self._clock = clock
        self._boxes: dict[object, _Mailbox] = {}
        self._lock = threading.Lock()
        self._anonymous = itertools.count()
        self._swept_at = clock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._boxes)

    def open(self, request_id: str, sender) -> "MailboxStream":
        """The engine's ResponseStream for a new generation; `sender` gets its first answer. A request
        without an id gets its first answer only (nothing can poll for it)."""
        key: object = request_id or ("", next(self._anonymous))
        with self._lock:
            self._sweep()
            self._boxes[key] = _Mailbox(waiting=sender, answered_at=self._clock())
        return MailboxStream(self, key)

    def poll(self, request_id: str, sender) -> None:
        """Answer `sender` with the tokens of generation `request_id` since its last answer."""
        with self._lock:
            box = self._boxes.get(request_id) if request_id else None
            if box is None:
                problem = "no generation with this request id is in progress (it has finished, or never started)"
            elif box.waiting is not None:
                problem = "this request id already has a poll waiting for its next tokens"
            else:
                problem = None
                box.waiting = sender
                reply = self._take(request_id, box)
        if problem is not None:
            self._deliver(sender, None, (f"poll: {problem}", True))
        elif reply is not None:
            self._deliver(*reply)

    def put(self, key, chunk: Chunk | None = None, error: tuple[str, bool] | None = None, end: bool = False) -> None:
        with self._lock:
            box = self._boxes.get(key)
            if box is None or box.ended:
                return
            if error is not None:
                box.error, box.chunk = error, None
            elif chunk is not None:
                box.chunk = merge(box.chunk, chunk)
            box.ended = end or error is not None
            reply = self._take(key, box)
        if reply is not None:
            self._deliver(*reply)

    def abandoned(self, key) -> bool:
        """True when nobody has asked for this generation's tokens for abandoned_s."""
        with self._lock:
            box = self._boxes.get(key)
            if box is None:
                return True
            return box.waiting is None and self._clock() - box.answered_at > self.abandoned_s

    def _take(self, key, box: _Mailbox):
        """Called holding the lock: (sender, chunk, error) to deliver now, or None."""
        answer = box.answer()
        if answer is None:
            return None
        chunk, error, last = answer
        sender, box.waiting, box.answered_at = box.waiting, None, self._clock()
        if last:
            del self._boxes[key]
        return sender, chunk, error

    def _sweep(self) -> None:
        """Called holding the lock: drop ended mailboxes that nobody polled for abandoned_s."""
        now = self._clock()
        if now - self._swept_at < SWEEP_EVERY_S:
            return
        self._swept_at = now
        for key in [k for k, b in self._boxes.items()
                    if b.ended and b.waiting is None and now - b.answered_at > self.abandoned_s]:
            del self._boxes[key]


class MailboxStream:
    """engine.ResponseStream for one generation: its chunks go to its mailbox."""

    def __init__(self, boxes: Mailboxes, key):
        self._boxes, self._key = boxes, key

    def send(self, chunk: Chunk, final: bool) -> None:
        self._boxes.put(self._key, chunk=chunk, end=final)

    def fail(self, message: str, invalid_request: bool) -> None:
        self._boxes.put(self._key, error=(message, invalid_request))

    def close(self) -> None:
        self._boxes.put(self._key, end=True)

    def is_cancelled(self) -> bool:
        # Only abandonment: the medgemma model cancels a generation with a `stop` request.
        return self._boxes.abandoned(self._key)
