"""Per-stage server time from Triton's statistics extension (before/after deltas per model).

Triton counts, per model, successful requests and their cumulative time split into queue,
compute_input, compute_infer and compute_output (nanoseconds); decoupled models also report
`response_stats` per response index (index 0 is the first response: prefill) when their backend
reports them. The `medgemma` model's own counters give the server-side total per request.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .. import contract


def _count(stat: dict | None) -> int:
    return int((stat or {}).get("count", 0))


def _ns(stat: dict | None) -> int:
    return int((stat or {}).get("ns", 0))


@dataclass(frozen=True)
class ModelTiming:
    """One model's counters over the benchmark window (ms are per call of that model)."""

    model: str
    calls: int  # successful requests to this model
    executions: int  # batched executions
    failures: int
    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float
    total_ms: float  # success ns / calls: queue + compute + anything Triton adds between
    first_response_ms: float | None  # decoupled: response index 0 compute (prefill)
    later_response_ms: float | None  # decoupled: mean compute of responses 1.. (per decode step)

    @property
    def compute_ms(self) -> float:
        return self.compute_input_ms + self.compute_infer_ms + self.compute_output_ms


def _delta(after: dict, before: dict | None, *path) -> dict:
    def get(entry):
        for key in path:
            entry = (entry or {}).get(key, {})
        return entry or {}

    now, then = get(after), get(before)
    return {"count": _count(now) - _count(then), "ns": _ns(now) - _ns(then)}


def model_timing(name: str, after: dict, before: dict | None) -> ModelTiming:
    stats = {
        key: _delta(after, before, "inference_stats", key)
        for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
    }
    calls = stats["success"]["count"]

    def per_call(key):
        return stats[key]["ns"] / calls / 1e6 if calls else 0.0

    first = later = None
    responses = (after.get("response_stats") or {})
    previous = (before or {}).get("response_stats") or {}
    if responses:
        def response_ms(index_keys):
            ns = count = 0
            for key in index_keys:
                d = _delta(responses.get(key, {}), previous.get(key, {}), "compute_infer")
                ns, count = ns + d["ns"], count + d["count"]
            return ns / count / 1e6 if count else None

        first = response_ms(["0"])
        later = response_ms([k for k in responses if k != "0"])
    executions = int(after.get("execution_count", 0)) - int((before or {}).get("execution_count", 0))
    return ModelTiming(
        model=name,
        calls=calls,
        executions=executions,
        failures=stats["fail"]["count"],
        queue_ms=per_call("queue"),
        compute_input_ms=per_call("compute_input"),
        compute_infer_ms=per_call("compute_infer"),
        compute_output_ms=per_call("compute_output"),
        total_ms=per_call("success"),
        first_response_ms=first,
        later_response_ms=later,
    )


@dataclass(frozen=True)
class StageBreakdown:
    """Milliseconds per benchmark request, by stage.

    A decoupled model's execute() returns at once and its work runs on its own thread, so Triton's
    counters for it hold only the hand-off. The llm is decoupled in every profile, and the
    `medgemma` model too when it is a Python BLS pipeline rather than an ensemble; their time is
    therefore derived (`*_source` says how): the server total minus the other stages when the
    `medgemma` model's counters are real, else the client's E2E minus the other stages. Prefill and
    per-token decode come from the llm's per-response statistics when its backend reports them and
    each llm request is a benchmark request's generation, else from the client's TTFT and ITL means
    (with polls for a stream's tokens, the llm serves more requests than were sent, and its
    statistics mix the two kinds).
    """

    requests: int
    preprocessing_ms: float  # queue + compute, as every per-model *_ms here
    vision_encoder_ms: float
    queue_ms: float  # waiting in the counted models' queues, summed (batching delays show here)
    server_total_ms: float | None  # the `medgemma` model's own time; None when `medgemma` is decoupled
    llm_ms: float | None  # generation, what the other stages leave
    llm_source: str
    prefill_ms: float | None
    prefill_source: str
    decode_step_ms: float | None
    decode_source: str
    client_overhead_ms: float | None  # client E2E mean - server total: network, gRPC, client
    models: tuple[ModelTiming, ...]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["models"] = [asdict(m) for m in self.models]
        return out


def stage_breakdown(
    before: dict,
    after: dict,
    requests: int,
    decoupled: frozenset[str] | set[str] = frozenset({contract.LLM_MODEL}),
    ttft_mean_ms: float | None = None,
    itl_mean_ms: float | None = None,
    e2e_mean_ms: float | None = None,
) -> StageBreakdown:
    """`before`/`after` are `{model name: model_stats}` snapshots around `requests` requests;
    `decoupled` names the models whose counters hold only the hand-off; the client means (ms)
    fill in what the server does not count."""
    if requests < 1:
        raise ValueError("no requests between the two statistics snapshots")
    timings = {name: model_timing(name, stats, before.get(name)) for name, stats in after.items()}

    def per_request(name, attribute="total_ms"):
        t = timings.get(name)
        return getattr(t, attribute) * t.calls / requests if t and t.calls else 0.0

    preprocessing = per_request(contract.PREPROCESSING_MODEL)
    vision = per_request(contract.VISION_ENCODER_MODEL)
    other_stages = preprocessing + vision

    total = None if contract.TOP_MODEL in decoupled else per_request(contract.TOP_MODEL)
    if total is not None:
        llm, llm_source = max(0.0, total - other_stages), "server total - other stages"
    elif e2e_mean_ms is not None:
        llm, llm_source = max(0.0, e2e_mean_ms - other_stages), "client E2E - other stages (with network, orchestration)"
    else:
        llm, llm_source = None, ""

    llm_timing = timings.get(contract.LLM_MODEL)
    if llm_timing and llm_timing.calls > requests:
        # medgemma polls the llm for a stream's tokens (serving/polled.py): the llm's response
        # statistics then mix generation requests' answers with polls' and time neither stage.
        llm_timing = None
    if llm_timing and llm_timing.first_response_ms is not None:
        prefill, prefill_source = llm_timing.first_response_ms, "llm response statistics"
    elif ttft_mean_ms is not None:
        prefill, prefill_source = ttft_mean_ms - preprocessing - vision, "client TTFT - earlier stages"
    else:
        prefill, prefill_source = None, ""
    if llm_timing and llm_timing.later_response_ms is not None:
        decode, decode_source = llm_timing.later_response_ms, "llm response statistics"
    else:
        decode, decode_source = itl_mean_ms, "client ITL" if itl_mean_ms is not None else ""

    counted = [n for n in timings if n not in decoupled and n != contract.TOP_MODEL]
    return StageBreakdown(
        requests=requests,
        preprocessing_ms=preprocessing,
        vision_encoder_ms=vision,
        queue_ms=sum(per_request(name, "queue_ms") for name in counted),
        server_total_ms=total,
        llm_ms=llm,
        llm_source=llm_source,
        prefill_ms=prefill,
        prefill_source=prefill_source,
        decode_step_ms=decode,
        decode_source=decode_source,
        client_overhead_ms=None if e2e_mean_ms is None or total is None else e2e_mean_ms - total,
        models=tuple(timings[name] for name in sorted(timings) if timings[name].calls),
    )
