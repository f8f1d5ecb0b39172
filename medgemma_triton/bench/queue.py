"""The scaling signal: how many requests wait for one of the llm's decode slots while a load point runs.

The `llm` model exports the gauge `medgemma_queued_requests{model="llm"}` on Triton's metrics
endpoint (serving/triton_io.py); deploy/kubernetes scales pods on it. `QueueSampler` reads it every
`interval_s` during a load point, so the capacity plan can say what the gauge reads at the load one
instance sustains, and so what target an autoscaler should hold it under.
"""

from __future__ import annotations

import asyncio
import urllib.request
from dataclasses import asdict, dataclass

from prometheus_client.parser import text_string_to_metric_families

from .metrics import distribution

QUEUE_METRIC = "medgemma_queued_requests"
QUEUE_MODEL = "llm"
DEFAULT_METRICS_PORT = 8002  # Triton's default --metrics-port


def metrics_url_for(grpc_url: str, port: int = DEFAULT_METRICS_PORT) -> str:
    """Triton's metrics endpoint on the gRPC address's host."""
    host = grpc_url.rsplit(":", 1)[0] if ":" in grpc_url else grpc_url
    return f"http://{host}:{port}/metrics"


def gauge_value(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of `name` whose labels include `labels` (Prometheus text format); None if absent."""
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())
    ]
    return sum(values) if values else None


@dataclass(frozen=True)
class QueueDepth:
    mean: float
    p90: float
    max: float
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(values: list[float]) -> QueueDepth | None:
    if not values:
        return None
    spread = distribution(values)
    return QueueDepth(round(spread.mean, 3), spread.p90, spread.max, spread.count)


class QueueSampler:
    """Samples the llm's queue gauge in the background: `start()`, then `await stop()` for a QueueDepth.

    A scrape that fails or finds no gauge (a deployment without our `llm`, a metrics port that is
    not reachable) records nothing; `stop()` then returns None and `error` says why.
    """

    def __init__(self, metrics_url: str, interval_s: float = 0.5, timeout_s: float = 2.0):
        self.metrics_url, self.interval_s, self.timeout_s = metrics_url, interval_s, timeout_s
        self.values: list[float] = []
        self.error: str | None = None
        self._task: asyncio.Task | None = None

    def _scrape(self) -> float | None:
        with urllib.request.urlopen(self.metrics_url, timeout=self.timeout_s) as response:
            return gauge_value(response.read().decode(), QUEUE_METRIC, model=QUEUE_MODEL)

    async def _run(self) -> None:
        while True:
            try:
                value = await asyncio.to_thread(self._scrape)
            except OSError as exc:
                self.error = f"{self.metrics_url}: {exc}"
            else:
                if value is None:
                    self.error = f"{self.metrics_url} has no {QUEUE_METRIC}{{model=\"{QUEUE_MODEL}\"}}"
                else:
                    self.values.append(value)
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> QueueDepth | None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        return summarize(self.values)
