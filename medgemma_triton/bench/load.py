"""Load generation for one load point: closed loop (fixed concurrency) or open loop (Poisson).

Closed loop: `concurrency` workers each send their next request as soon as the last one ends
(perf_analyzer's and genai-perf's --concurrency). Open loop: requests start at Poisson arrival
times of `request_rate` per second whatever the server's state (vLLM's --request-rate), optionally
capped at `max_concurrency` in flight. Warm-up requests run first at the same load and are not
measured. A point ends when `num_requests` have been sent or `max_duration_s` has passed since the
first measured request, whichever comes first; requests already in flight are allowed to finish.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np

from .metrics import RequestRecord
from .workload import BenchRequest

Send = Callable[[BenchRequest, int], Awaitable[RequestRecord]]


@dataclass(frozen=True)
class LoadSpec:
    mode: str  # "concurrency" or "request_rate"
    value: float
    num_requests: int
    max_duration_s: float
    warmup_requests: int = 0
    max_concurrency: int | None = None  # open loop only
    seed: int = 0

    def __post_init__(self):
        if self.mode not in ("concurrency", "request_rate"):
            raise ValueError(f"unknown load mode {self.mode!r}")
        if self.value <= 0:
            raise ValueError(f"{self.mode} must be positive (got {self.value:g})")
        if self.num_requests < 1:
            raise ValueError("--num-requests must be at least 1")


def _cycle(requests: list[BenchRequest], start: int):
    """(index, request) forever, starting at `start`; indices keep counting past the workload."""
    for index in itertools.count(start):
        yield index, requests[index % len(requests)]


async def _closed_loop(send: Send, source, concurrency: int, count: int, deadline: float | None, on_done):
    records: list[RequestRecord] = []
    issued = 0

    async def worker():
        nonlocal issued
        while issued < count and (deadline is None or time.perf_counter() < deadline):
            issued += 1
            index, request = next(source)
            record = await send(request, index)
            records.append(record)
            on_done(record)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


async def _open_loop(
    send: Send, source, rate: float, count: int, deadline: float, max_concurrency, rng, on_done
):
    records: list[RequestRecord] = []
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    tasks = []

    async def one(index, request):
        if limit is None:
            record = await send(request, index)
        else:
            async with limit:
                record = await send(request, index)
        records.append(record)
        on_done(record)

    next_arrival = time.perf_counter()
    for _ in range(count):
        delay = next_arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.perf_counter() >= deadline:
            break
        index, request = next(source)
        tasks.append(asyncio.create_task(one(index, request)))
        next_arrival += rng.exponential(1.0 / rate)
    await asyncio.gather(*tasks)
    return records


async def run_load_point(
    send: Send,
    requests: list[BenchRequest],
    spec: LoadSpec,
    on_done=lambda record: None,
    before_measuring: Callable[[], Awaitable[None]] | None = None,
) -> list[RequestRecord]:
    """The measured records of one load point (warm-up records are dropped). `before_measuring`
    runs between warm-up and measurement (a server statistics snapshot, for instance)."""
    if not requests:
        raise ValueError("the workload has no requests")
    rng = np.random.default_rng(spec.seed)
    # Warm-up takes the workload's last requests; the measured ones start from its first.
    warmup_source = _cycle(requests, start=max(0, len(requests) - spec.warmup_requests))
    if spec.warmup_requests:
        parallel = int(spec.value) if spec.mode == "concurrency" else min(spec.warmup_requests, spec.max_concurrency or spec.warmup_requests)
        await _closed_loop(send, warmup_source, max(1, parallel), spec.warmup_requests, None, lambda r: None)
    if before_measuring is not None:
        await before_measuring()
    source = _cycle(requests, start=0)
    deadline = time.perf_counter() + spec.max_duration_s
    if spec.mode == "concurrency":
        records = await _closed_loop(send, source, int(spec.value), spec.num_requests, deadline, on_done)
    else:
        records = await _open_loop(
            send, source, spec.value, spec.num_requests, deadline, spec.max_concurrency, rng, on_done
        )
    return sorted(records, key=lambda r: r.start_s)
