"""Per-request records and the one dataclass of benchmark metrics, defined as AIPerf/genai-perf do.

Definitions (AIPerf's metrics reference; genai-perf uses the same formulas):
- content response: a streamed response that carries at least one output token.
- time to first token (TTFT) = first content response - request start.
- time to second token (TTST) = second content response - first content response.
- request latency (e2e) = last content response - request start.
- inter-token latency (ITL) = (e2e - TTFT) / (output tokens - 1), per request; absent for requests
  with fewer than 2 output tokens. vLLM and GKE call this same quantity time per output token
  (TPOT), so it is reported once, as ITL (= TPOT).
- inter-chunk latency (ICL): the gaps between consecutive content responses, pooled over requests
  (what a user sees between text deltas; equals ITL when every response carries one token).
- output token throughput per user = 1 / ITL.
- benchmark duration = last response of any measured request - first request start.
- request throughput = successful requests / duration; output token throughput = output tokens of
  successful requests / duration; goodput = successful requests meeting every SLO / duration.
Latency statistics cover successful requests only; failed requests are counted in `errors`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass
class RequestRecord:
    """One measured request: its timeline (perf_counter seconds) and its token counts."""

    index: int  # position in the workload
    start_s: float
    content_times_s: list[float] = field(default_factory=list)  # one per content response
    content_tokens: list[int] = field(default_factory=list)  # output tokens in each of them
    end_s: float | None = None  # the final response (or the error), content or not
    first_token_s: float | None = None  # the first response carrying a token, text or not (gRPC only)
    input_tokens: int | None = None  # prompt tokens as the server counted them (images included)
    output_tokens: int = 0
    num_images: int = 0
    finish_reason: str = ""
    error: str | None = None
    refused: bool = False  # the server refused it as busy (an error too, counted apart)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.content_times_s)

    @property
    def ttft_s(self) -> float | None:
        return self.content_times_s[0] - self.start_s if self.content_times_s else None

    @property
    def first_token_latency_s(self) -> float | None:
        """Until the first token arrived: the prompt's prefill and the hops, without the decode steps
        a stream waits through when its first tokens are no text yet (ttft_s counts to the first text)."""
        return self.first_token_s - self.start_s if self.first_token_s is not None else None

    @property
    def ttst_s(self) -> float | None:
        times = self.content_times_s
        return times[1] - times[0] if len(times) > 1 else None

    @property
    def e2e_s(self) -> float | None:
        return self.content_times_s[-1] - self.start_s if self.content_times_s else None

    @property
    def itl_s(self) -> float | None:
        if not self.content_times_s or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def chunk_gaps_s(self) -> list[float]:
        times = self.content_times_s
        return [b - a for a, b in zip(times, times[1:])]

    @property
    def last_s(self) -> float:
        """The last moment this request occupied the server (for the benchmark duration)."""
        candidates = [t for t in (self.end_s, *self.content_times_s[-1:]) if t is not None]
        return max(candidates) if candidates else self.start_s

    def summary_row(self, origin_s: float = 0.0) -> dict:
        """Flat per-request values (ms, relative to `origin_s`) for CSV and JSON."""

        def ms(value):
            return None if value is None else round(value * 1e3, 4)

        return {
            "index": self.index,
            "start_ms": ms(self.start_s - origin_s),
            "ok": self.ok,
            "ttft_ms": ms(self.ttft_s),
            "first_token_ms": ms(self.first_token_latency_s),
            "ttst_ms": ms(self.ttst_s),
            "e2e_ms": ms(self.e2e_s),
            "itl_ms": ms(self.itl_s),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "num_images": self.num_images,
            "finish_reason": self.finish_reason,
            "error": self.error or "",
            "refused": self.refused,
            "content_times_ms": [ms(t - origin_s) for t in self.content_times_s],
            "content_tokens": list(self.content_tokens),
        }


@dataclass(frozen=True)
class Distribution:
    """mean / std / min / max and percentiles of one metric; computed only by `distribution`."""

    count: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None


def distribution(values) -> Distribution:
    """The one place percentiles are computed (numpy's linear interpolation, as genai-perf uses)."""
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if data.size == 0:
        return Distribution(0, *([None] * 8))
    p50, p90, p95, p99 = (float(v) for v in np.percentile(data, PERCENTILES))
    return Distribution(
        count=int(data.size),
        mean=float(data.mean()),
        std=float(data.std()),
        min=float(data.min()),
        max=float(data.max()),
        p50=p50,
        p90=p90,
        p95=p95,
        p99=p99,
    )


@dataclass(frozen=True)
class Slo:
    """Per-request service-level objectives; `None` means no objective on that metric."""

    ttft_ms: float | None = None
    itl_ms: float | None = None
    e2e_ms: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> "Slo | None":
        """`ttft_ms=500,itl_ms=50[,e2e_ms=10000]` -> Slo; empty -> None."""
        if not text:
            return None
        known = {f.name for f in fields(cls)}
        values = {}
        for item in text.split(","):
            name, sep, value = item.strip().partition("=")
            if not sep or name not in known:
                raise ValueError(
                    f"--slo item {item.strip()!r} is not NAME=MILLISECONDS with NAME one of "
                    f"{', '.join(sorted(known))} (example: ttft_ms=500,itl_ms=50)"
                )
            try:
                values[name] = float(value)
            except ValueError:
                raise ValueError(f"--slo {name}={value!r}: the value must be a number of milliseconds") from None
            if values[name] <= 0:
                raise ValueError(f"--slo {name}={value}: the value must be positive")
        return cls(**values)

    def met_by(self, record: RequestRecord) -> bool:
        """A successful request whose every objective holds. A request with one output token has
        no ITL and so cannot violate an ITL objective."""
        if not record.ok:
            return False
        checks = ((self.ttft_ms, record.ttft_s), (self.itl_ms, record.itl_s), (self.e2e_ms, record.e2e_s))
        return all(limit is None or value is None or value * 1e3 <= limit for limit, value in checks)

    def __str__(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in asdict(self).items() if v is not None)


@dataclass(frozen=True)
class BenchmarkMetrics:
    """Everything reported for one load point (latencies in ms, throughputs per second)."""

    requests: int  # measured requests (successful and failed)
    completed: int
    errors: int  # failed requests, refusals not included
    refused: int  # refused at once as busy (the server's queue limit): retry-able, not failures
    duration_s: float
    request_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    total_input_tokens: int
    total_output_tokens: int
    good_requests: int | None  # None without an SLO
    goodput: float | None
    slo_attainment: float | None  # good / measured requests
    ttft_ms: Distribution
    ttst_ms: Distribution
    itl_ms: Distribution
    inter_chunk_ms: Distribution
    e2e_ms: Distribution
    output_tokens_per_user: Distribution  # 1 / ITL, tokens per second
    input_tokens: Distribution
    output_tokens: Distribution

    def to_dict(self) -> dict:
        return asdict(self)


def compute_metrics(records: list[RequestRecord], slo: Slo | None = None) -> BenchmarkMetrics:
    if not records:
        raise ValueError("no measured requests: nothing to compute (raise --num-requests or --max-duration)")
    ok = [r for r in records if r.ok]
    start = min(r.start_s for r in records)
    end = max(r.last_s for r in records)
    duration = end - start
    rate = (lambda n: n / duration) if duration > 0 else (lambda n: math.nan)
    input_tokens = sum(r.input_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    good = sum(slo.met_by(r) for r in records) if slo else None

    def ms(values):
        return distribution(v * 1e3 for v in values if v is not None)

    return BenchmarkMetrics(
        requests=len(records),
        completed=len(ok),
        errors=sum(1 for r in records if not r.ok and not r.refused),
        refused=sum(1 for r in records if r.refused),
        duration_s=duration,
        request_throughput=rate(len(ok)),
        output_token_throughput=rate(output_tokens),
        total_token_throughput=rate(input_tokens + output_tokens),
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        good_requests=good,
        goodput=rate(good) if slo else None,
        slo_attainment=good / len(records) if slo else None,
        ttft_ms=ms(r.ttft_s for r in ok),
        ttst_ms=ms(r.ttst_s for r in ok),
        itl_ms=ms(r.itl_s for r in ok),
        inter_chunk_ms=ms(gap for r in ok for gap in r.chunk_gaps_s),
        e2e_ms=ms(r.e2e_s for r in ok),
        output_tokens_per_user=distribution(1.0 / r.itl_s for r in ok if r.itl_s),
        input_tokens=distribution(r.input_tokens for r in ok),
        output_tokens=distribution(r.output_tokens for r in ok),
    )
