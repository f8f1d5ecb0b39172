"""Stop requests by request id, shared by the cpu engine (serving/engine.py) and the gpu engine
(gpu/llm_engine.py).

`medgemma` stops an llm request by sending a `stop` request with the same request id (its client
cancelled, or a stop word matched). That stop can reach the llm before the request it names does
(the request may still be encoding its images), so a stop is kept until its request ends, or for
`max_age_s` when the request never comes.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Callable

STOP_MAX_AGE_S = 600.0  # how long a stop waits for its request


def request_id_or_new(request_id: str | None) -> str:
    """The request's id, or a new unique one for a request that came without (never "": ids must not collide)."""
    return request_id or f"unnamed-{uuid.uuid4().hex}"


class StopRegistry:
    """request id -> stop reason, safe to use from any thread."""

    def __init__(self, max_age_s: float = STOP_MAX_AGE_S, clock: Callable[[], float] = time.monotonic):
        self.max_age_s = float(max_age_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._stops: dict[str, tuple[float, str]] = {}  # request id -> (when stop() was called, reason)

    def stop(self, request_id: str, reason: str) -> None:
        """Record a stop; "" names no request (a request without an id cannot be stopped by id)."""
        if request_id:
            with self._lock:
                self._stops[request_id] = (self._clock(), reason)

    def reason(self, request_id: str) -> str | None:
        """The reason the request was stopped with, or None if it was not."""
        if not request_id:
            return None
        with self._lock:
            entry = self._stops.get(request_id)
        return None if entry is None else entry[1]

    def forget(self, request_id: str) -> None:
        """The request ended: its stop (if any) is done with."""
        with self._lock:
            self._stops.pop(request_id, None)

    def forget_old(self) -> None:
        """Drop stops older than max_age_s (their requests finished without them, or never came)."""
        now = self._clock()
        with self._lock:
            for request_id, (when, _) in list(self._stops.items()):
                if now - when > self.max_age_s:
                    del self._stops[request_id]

    def __len__(self) -> int:
        with self._lock:
            return len(self._stops)
