"""The load generator's own CPU during a load point, and whether it, not the server, was the limit.

A Python client does its per-response work (gRPC callbacks, decoding, bookkeeping) on one asyncio
thread; when that thread is busy nearly all the time, or the process uses nearly all the cores it
may run on, requests wait for the client and the point measures the client. Such a point is flagged
(`limited`) in the console table and the JSON, and the capacity plan leaves it out unless the user
allows it (`--allow-client-limited`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

LOOP_BUSY_LIMIT = 0.85  # share of wall time the event-loop thread spent on the CPU
PROCESS_BUSY_LIMIT = 0.85  # share of the usable cores the whole client process used


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ClientCpu:
    wall_s: float
    process_cpu_s: float  # all the client's threads (gRPC's included)
    loop_cpu_s: float  # the asyncio thread alone
    usable_cores: int
    loop_busy: float  # loop_cpu_s / wall_s
    process_busy: float  # process_cpu_s / (wall_s * usable_cores)
    limited: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def reason(self) -> str:
        return (f"the load generator was the limit (its event loop busy {self.loop_busy:.0%} of the time, "
                f"the process {self.process_busy:.0%} of {self.usable_cores} core(s))")


class ClientCpuMeter:
    """start() and stop() on the event-loop thread, around the measured part of a point."""

    def __init__(self):
        self._start = None

    def start(self) -> None:
        self._start = (time.perf_counter(), time.process_time(), time.thread_time())

    def stop(self) -> ClientCpu | None:
        if self._start is None:
            return None
        wall0, process0, thread0 = self._start
        wall = time.perf_counter() - wall0
        process, loop = time.process_time() - process0, time.thread_time() - thread0
        cores = usable_cores()
        loop_busy = loop / wall if wall > 0 else 0.0
        process_busy = process / (wall * cores) if wall > 0 else 0.0
        return ClientCpu(round(wall, 4), round(process, 4), round(loop, 4), cores, round(loop_busy, 3),
                         round(process_busy, 3), loop_busy >= LOOP_BUSY_LIMIT or process_busy >= PROCESS_BUSY_LIMIT)
