"""The capacity plan: the highest load one deployment sustains within the SLOs, and how many
deployments a target request rate needs.

A load point meets the SLOs when no request failed and at least `attainment` of its requests met
every objective (attainment 0.99 on a single objective is "p99 within the objective"). Loads are
walked from the lowest up and the walk stops at the first point that misses: a higher point that
passes again after a miss is noise, not capacity.

The plan states its basis (the run, the workload, the SLOs, one instance's throughput at the chosen
load, in images per second too when requests carry images, the headroom, the instance count) and a
scaling signal: the llm's queue gauge as it read at the chosen
load, and the per-instance target an autoscaler should hold it under, (1 - headroom) of that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .client_cpu import ClientCpu
from .metrics import BenchmarkMetrics, Slo
from .queue import QUEUE_METRIC, QUEUE_MODEL, QueueDepth

DEFAULT_ATTAINMENT = 0.99
DEFAULT_HEADROOM = 0.20


@dataclass(frozen=True)
class LoadPoint:
    mode: str  # "concurrency" (closed loop) or "request_rate" (open loop, Poisson)
    value: float  # concurrent requests, or offered requests per second
    metrics: BenchmarkMetrics
    queued: QueueDepth | None = None  # the llm's queue gauge during the point (None: not read)
    client: ClientCpu | None = None  # the load generator's CPU during the point (None: not measured)

    @property
    def label(self) -> str:
        return f"concurrency {self.value:g}" if self.mode == "concurrency" else f"{self.value:g} req/s"


@dataclass(frozen=True)
class PointVerdict:
    label: str
    meets_slo: bool
    reason: str  # why it misses ("" when it meets)


@dataclass(frozen=True)
class CapacityPlan:
    slo: str  # "" when none was given
    attainment: float
    verdicts: tuple[PointVerdict, ...]
    best: str | None  # label of the highest load point meeting the SLOs
    capacity_rps: float | None  # requests/s one instance serves there (goodput with an SLO)
    target_rps: float | None
    headroom: float  # planned: instances are loaded to at most (1 - headroom) of capacity
    instances: int | None
    achieved_headroom: float | None  # spare capacity of `instances` over the target, as a fraction
    basis: str = ""  # which run: address, checkpoint, profile and precision, requests per point
    workload: str = ""  # what one request is: text lengths, images per request and their size
    images_per_request: float = 0  # images of one request (a mean for a dataset); 0: text only
    scaling_metric: str = f'{QUEUE_METRIC}{{model="{QUEUE_MODEL}"}}'
    queued_at_best: float | None = None  # the gauge's mean at the chosen load (None: not read)
    queue_target: float | None = None  # per-instance target: (1 - headroom) of queued_at_best

    def to_dict(self) -> dict:
        return asdict(self)

    def scaling_lines(self) -> list[str]:
        if self.queued_at_best is None:
            return [f"  scaling signal: {self.scaling_metric} was not read in this run (--metrics-url)"]
        if self.queue_target is None:
            return [f"  scaling signal: {self.scaling_metric} averaged {self.queued_at_best:.2f} at the chosen load: "
                    "nothing waited, so this run sets no queue target; sweep past the llm's decode slots "
                    "(max_active_requests) to find one"]
        return [f"  scaling signal: {self.scaling_metric} averaged {self.queued_at_best:.2f} per instance at the "
                f"chosen load; scale out above {self.queue_target:.2f} per instance ((1 - headroom) of it; "
                "Kubernetes HPA: averageValue, docs/kubernetes.md)"]

    def _images(self, rps: float) -> str:
        """ "(N images/s at M per request)" for a workload with images, else nothing."""
        if not self.images_per_request:
            return ""
        return f" ({rps * self.images_per_request:.3f} images/s at {self.images_per_request:g} per request)"

    def lines(self) -> list[str]:
        """The plan in sentences, for the console and the README."""
        slo = f"SLO {self.slo} for {self.attainment:.0%} of requests, no errors" if self.slo else "no SLO given: any error-free point qualifies"
        out = [f"Capacity plan ({slo}):"]
        if self.basis:
            out.append(f"  basis: {self.basis}")
        if self.workload:
            out.append(f"  workload: {self.workload}")
        for v in self.verdicts:
            out.append(f"  {v.label:>18}: {'meets' if v.meets_slo else 'misses'}{'' if v.meets_slo else ' - ' + v.reason}")
        if self.best is None:
            out.append("  no load point meets the SLOs: even the lowest load is too slow or fails; "
                       "relax the SLO, shrink the workload, or use a faster profile")
            return out
        out.append(f"  one instance: {self.best}, {self.capacity_rps:.3f} req/s within the SLOs{self._images(self.capacity_rps)}")
        if self.target_rps is not None:
            out.append(
                f"  target {self.target_rps:g} req/s{self._images(self.target_rps)} with {self.headroom:.0%} planned "
                f"headroom (each instance at most {1 - self.headroom:.0%} of its capacity): {self.instances} "
                f"instance(s), {self.instances * self.capacity_rps:.3f} req/s in all, "
                f"{self.achieved_headroom:.0%} above the target"
            )
        return out + self.scaling_lines()


def judge(point: LoadPoint, slo: Slo | None, attainment: float, allow_client_limited: bool = False) -> PointVerdict:
    m = point.metrics
    if point.client is not None and point.client.limited and not allow_client_limited:
        return PointVerdict(point.label, False, point.client.reason())
    if m.errors:
        return PointVerdict(point.label, False, f"{m.errors} of {m.requests} requests failed")
    if m.refused:  # the server was past its queue limit at this load: it cannot carry it
        return PointVerdict(point.label, False, f"{m.refused} of {m.requests} requests refused as busy")
    if m.completed == 0:
        return PointVerdict(point.label, False, "no request completed")
    if slo is not None and m.slo_attainment < attainment:
        return PointVerdict(
            point.label, False, f"{m.slo_attainment:.1%} of requests met the SLO (needs {attainment:.0%})"
        )
    return PointVerdict(point.label, True, "")


def instances_needed(target_rps: float, capacity_rps: float, headroom: float) -> int:
    """Instances so that each carries at most (1 - headroom) of the capacity it was measured at."""
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom {headroom} must be in [0, 1) (0.2 keeps 20% of each instance spare)")
    if capacity_rps <= 0:
        raise ValueError("capacity must be positive to plan instances")
    # round() first: 1.0 / 0.8 * 0.8 is 1.0000000000000002, which must not become 2 instances
    return max(1, math.ceil(round(target_rps / (capacity_rps * (1 - headroom)), 9)))


def capacity_plan(
    points: list[LoadPoint],
    slo: Slo | None,
    attainment: float = DEFAULT_ATTAINMENT,
    target_rps: float | None = None,
    headroom: float = DEFAULT_HEADROOM,
    basis: str = "",
    allow_client_limited: bool = False,
    workload: str = "",
    images_per_request: float = 0,
) -> CapacityPlan:
    modes = {p.mode for p in points}
    if len(modes) > 1:
        raise ValueError(f"plan concurrency and request-rate sweeps separately (got {sorted(modes)})")
    ordered = sorted(points, key=lambda p: p.value)
    verdicts = tuple(judge(p, slo, attainment, allow_client_limited) for p in ordered)
    best = None
    for point, verdict in zip(ordered, verdicts):
        if not verdict.meets_slo:
            break
        best = point
    capacity = None
    if best is not None:
        capacity = best.metrics.goodput if slo is not None else best.metrics.request_throughput
    instances = achieved = None
    if best is not None and target_rps is not None and capacity:
        instances = instances_needed(target_rps, capacity, headroom)
        achieved = instances * capacity / target_rps - 1
    queued = best.queued.mean if best is not None and best.queued is not None else None
    # Below half a request waiting on average, the gauge says nothing a target could hold.
    queue_target = round(queued * (1 - headroom), 2) if queued is not None and queued >= 0.5 else None
    return CapacityPlan(
        basis=basis,
        workload=workload,
        images_per_request=images_per_request,
        queued_at_best=queued,
        queue_target=queue_target,
        slo=str(slo) if slo else "",
        attainment=attainment,
        verdicts=verdicts,
        best=best.label if best else None,
        capacity_rps=capacity,
        target_rps=target_rps,
        headroom=headroom,
        instances=instances,
        achieved_headroom=achieved,
    )
