"""Benchmark arithmetic on synthetic timelines with answers worked out by hand: per-request metrics
(AIPerf's definitions), percentiles, throughput, goodput, the capacity plan, stage breakdown from
Triton statistics, load scheduling, workloads and report files. No server: the real run is
tests/test_bench_run.py."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import math
import time

import numpy as np
import pytest

from medgemma_triton.bench.capacity import LoadPoint, capacity_plan, instances_needed
from medgemma_triton.bench.load import LoadSpec, run_load_point
from medgemma_triton.bench.metrics import RequestRecord, Slo, compute_metrics, distribution
from medgemma_triton.bench.report import BenchmarkReport, MeasuredPoint, comparison_rows, console_report, write_all
from medgemma_triton.bench.stages import stage_breakdown
from medgemma_triton.bench.workload import BenchRequest, LengthDistribution, load_jsonl, synthetic_requests


def record(index, start, times, tokens=None, output_tokens=None, error=None, input_tokens=10):
    tokens = tokens or [1] * len(times)
    return RequestRecord(
        index=index,
        start_s=start,
        content_times_s=list(times),
        content_tokens=list(tokens),
        end_s=(times[-1] if times else start) + 0.001,
        input_tokens=input_tokens,
        output_tokens=sum(tokens) if output_tokens is None else output_tokens,
        finish_reason="" if error else "length",
        error=error,
    )


# ---- per-request metrics ----------------------------------------------------------------------


def test_one_token_per_response_timeline():
    r = record(0, 10.0, [10.1, 10.15, 10.2, 10.25])
    assert r.ttft_s == pytest.approx(0.1)
    assert r.ttst_s == pytest.approx(0.05)
    assert r.e2e_s == pytest.approx(0.25)
    assert r.itl_s == pytest.approx((0.25 - 0.1) / 3)
    assert r.chunk_gaps_s == pytest.approx([0.05, 0.05, 0.05])


def test_itl_divides_by_tokens_not_chunks():
    # 4 tokens in 3 responses (2 + 1 + 1): ITL = (e2e - ttft) / (OSL - 1), as AIPerf defines it
    r = record(0, 0.0, [0.1, 0.2, 0.3], tokens=[2, 1, 1])
    assert r.output_tokens == 4
    assert r.itl_s == pytest.approx(0.2 / 3)
    assert r.chunk_gaps_s == pytest.approx([0.1, 0.1])


def test_single_token_request_has_no_itl():
    r = record(0, 0.0, [0.3])
    assert r.itl_s is None and r.ttst_s is None
    assert r.ttft_s == r.e2e_s == pytest.approx(0.3)
    assert Slo(itl_ms=1).met_by(r)  # nothing to violate


def test_failed_request_is_not_ok_and_has_no_latency():
    r = record(0, 0.0, [], error="boom")
    assert not r.ok and r.ttft_s is None and r.itl_s is None
    assert r.last_s == pytest.approx(0.001)


# ---- percentiles ------------------------------------------------------------------------------


def test_distribution_matches_numpy_linear_percentiles():
    d = distribution(range(1, 101))
    assert (d.count, d.mean, d.min, d.max) == (100, 50.5, 1, 100)
    assert (d.p50, d.p90, d.p95, d.p99) == pytest.approx((50.5, 90.1, 95.05, 99.01))
    d = distribution([10, 20, 30, 40])
    assert (d.p50, d.p90) == pytest.approx((25.0, 37.0))
    assert d.std == pytest.approx(np.std([10, 20, 30, 40]))


def test_distribution_ignores_missing_values_and_handles_empty():
    assert distribution([None, 5.0, None]).p99 == 5.0
    empty = distribution([])
    assert empty.count == 0 and empty.p50 is None and empty.mean is None


# ---- run-level metrics ------------------------------------------------------------------------


def three_request_run():
    return [
        record(0, 0.0, [0.1, 0.2, 0.3, 0.4]),  # ttft 100, itl 100, e2e 400
        record(1, 1.0, [1.2, 1.25, 1.3]),  # ttft 200, itl 50, e2e 300
        record(2, 2.0, [], error="INVALID_ARG: image too large"),  # failed, ends at 2.001
    ]


def test_throughputs_use_first_start_to_last_response():
    m = compute_metrics(three_request_run())
    assert (m.requests, m.completed, m.errors) == (3, 2, 1)
    assert m.duration_s == pytest.approx(2.001)  # the failed request's end is the last event
    assert m.request_throughput == pytest.approx(2 / 2.001)
    assert m.total_output_tokens == 7
    assert m.output_token_throughput == pytest.approx(7 / 2.001)
    assert m.total_token_throughput == pytest.approx((7 + 20) / 2.001)
    assert m.ttft_ms.mean == pytest.approx(150.0)
    assert (m.itl_ms.min, m.itl_ms.max) == pytest.approx((50.0, 100.0))
    assert m.e2e_ms.p50 == pytest.approx(350.0)
    assert m.inter_chunk_ms.count == 5  # 3 gaps + 2 gaps, pooled
    assert m.output_tokens_per_user.max == pytest.approx(20.0)  # 1 / 50 ms
    assert m.good_requests is None and m.goodput is None


def test_goodput_counts_requests_meeting_every_objective():
    m = compute_metrics(three_request_run(), Slo(ttft_ms=150, itl_ms=120))
    assert m.good_requests == 1  # the second misses TTFT, the third failed
    assert m.goodput == pytest.approx(1 / 2.001)
    assert m.slo_attainment == pytest.approx(1 / 3)
    assert compute_metrics(three_request_run(), Slo(ttft_ms=250, itl_ms=60)).good_requests == 1
    assert compute_metrics(three_request_run(), Slo(e2e_ms=1000)).good_requests == 2


def test_slo_parsing():
    assert Slo.parse("ttft_ms=500,itl_ms=50") == Slo(ttft_ms=500, itl_ms=50)
    assert Slo.parse("") is None
    assert str(Slo(ttft_ms=500, e2e_ms=2000)) == "ttft_ms=500,e2e_ms=2000"
    for bad in ("ttft=500", "ttft_ms", "itl_ms=fast", "e2e_ms=-1"):
        with pytest.raises(ValueError):
            Slo.parse(bad)


def test_no_records_is_an_error():
    with pytest.raises(ValueError, match="no measured requests"):
        compute_metrics([])


# ---- capacity plan ----------------------------------------------------------------------------


def point(value, good_fraction, throughput, errors=0, requests=100, mode="concurrency"):
    """A load point whose requests all take 1 s apart from `good_fraction` of them meeting TTFT."""
    good = round(requests * good_fraction)
    duration = requests / throughput
    records = []
    for k in range(requests):
        start = k * duration / requests
        if k < errors:
            records.append(record(k, start, [], error="failed"))
        else:
            ttft = 0.1 if k < good + errors else 0.9
            records.append(record(k, start, [start + ttft, start + 0.95]))
    return LoadPoint(mode, value, compute_metrics(records, Slo(ttft_ms=500)))


def test_capacity_stops_at_the_first_load_that_misses():
    points = [point(1, 1.0, 1.0), point(2, 1.0, 1.9), point(4, 0.95, 3.0), point(8, 1.0, 3.5)]
    plan = capacity_plan(points, Slo(ttft_ms=500), attainment=0.99, target_rps=10, headroom=0.2)
    assert plan.best == "concurrency 2"
    assert [v.meets_slo for v in plan.verdicts] == [True, True, False, True]
    assert "95.0% of requests met the SLO" in plan.verdicts[2].reason
    capacity = points[1].metrics.goodput
    assert plan.capacity_rps == pytest.approx(capacity)
    assert plan.instances == math.ceil(10 / (capacity * 0.8))
    assert plan.achieved_headroom == pytest.approx(plan.instances * capacity / 10 - 1)
    assert any("instance(s)" in line for line in plan.lines())


def test_capacity_point_with_errors_misses_and_no_point_means_no_plan():
    plan = capacity_plan([point(1, 1.0, 1.0, errors=1)], Slo(ttft_ms=500), target_rps=5)
    assert plan.best is None and plan.instances is None
    assert "1 of 100 requests failed" in plan.verdicts[0].reason
    assert "no load point meets" in "\n".join(plan.lines())


def test_capacity_without_slo_takes_throughput_of_error_free_points():
    points = [point(1, 0.0, 1.0), point(2, 0.0, 1.5)]
    plan = capacity_plan(points, None, target_rps=3, headroom=0.0)
    assert plan.best == "concurrency 2"
    assert plan.capacity_rps == pytest.approx(points[1].metrics.request_throughput)
    assert plan.instances == math.ceil(3 / points[1].metrics.request_throughput)


def test_instances_needed_headroom_arithmetic():
    assert instances_needed(10, 2.0, 0.2) == 7  # 10 / 1.6 = 6.25
    assert instances_needed(0.8, 1.0, 0.2) == 1  # exactly at 80%: no extra instance from rounding
    assert instances_needed(8, 1.0, 0.0) == 8
    with pytest.raises(ValueError):
        instances_needed(1, 1, 1.0)


def test_capacity_refuses_mixed_sweeps():
    with pytest.raises(ValueError, match="separately"):
        capacity_plan([point(1, 1, 1), point(1, 1, 1, mode="request_rate")], None)


# ---- load scheduling (a stand-in server: asyncio.sleep as the service time) --------------------


class SleepServer:
    """Stand-in for the deployment in scheduling tests only: each request takes `service_s`."""

    def __init__(self, service_s=0.02):
        self.service_s = service_s
        self.in_flight = self.peak = self.calls = 0

    async def send(self, request, index):
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        start = time.perf_counter()
        await asyncio.sleep(self.service_s)
        self.in_flight -= 1
        return record(index, start, [time.perf_counter()])


WORKLOAD = [BenchRequest([{"role": "user", "content": "hi"}], (), 4)] * 3


def test_closed_loop_holds_concurrency_and_excludes_warmup():
    server = SleepServer()
    spec = LoadSpec("concurrency", 3, num_requests=12, max_duration_s=30, warmup_requests=2)
    records = asyncio.run(run_load_point(server.send, WORKLOAD, spec))
    assert len(records) == 12 and server.calls == 14
    assert server.peak == 3
    assert [r.index for r in records] == sorted(r.index for r in records)
    assert sorted(r.index for r in records) == list(range(12))


def test_closed_loop_stops_at_max_duration():
    server = SleepServer(service_s=0.05)
    spec = LoadSpec("concurrency", 1, num_requests=1000, max_duration_s=0.2)
    records = asyncio.run(run_load_point(server.send, WORKLOAD, spec))
    assert 2 <= len(records) <= 6


def test_open_loop_poisson_arrivals_and_concurrency_cap():
    server = SleepServer(service_s=0.05)
    spec = LoadSpec("request_rate", 200, num_requests=40, max_duration_s=30, max_concurrency=2, seed=1)
    records = asyncio.run(run_load_point(server.send, WORKLOAD, spec))
    assert len(records) == 40 and server.peak <= 2
    server = SleepServer(service_s=0.001)
    spec = LoadSpec("request_rate", 100, num_requests=60, max_duration_s=30, seed=3)
    records = asyncio.run(run_load_point(server.send, WORKLOAD, spec))
    starts = np.array([r.start_s for r in records])
    mean_gap = np.diff(starts).mean()
    assert 0.005 < mean_gap < 0.02  # exponential gaps around 1/100 s
    assert len(records) == 60


# ---- stage breakdown from Triton statistics ---------------------------------------------------


def stats(success, queue, infer, count, responses=None, executions=None):
    ns = lambda ms: str(int(ms * 1e6))  # noqa: E731  (Triton's JSON carries int64 as strings)
    entry = {
        "execution_count": str(executions if executions is not None else count),
        "inference_stats": {
            "success": {"count": str(count), "ns": ns(success)},
            "queue": {"count": str(count), "ns": ns(queue)},
            "compute_input": {"count": str(count), "ns": "0"},
            "compute_infer": {"count": str(count), "ns": ns(infer)},
            "compute_output": {"count": str(count), "ns": "0"},
        },
    }
    if responses:
        entry["response_stats"] = {
            key: {"compute_infer": {"count": str(c), "ns": ns(ms)}} for key, (c, ms) in responses.items()
        }
    return entry


def test_stage_breakdown_from_statistics_deltas():
    before = {
        "medgemma": stats(100, 0, 0, 1),
        "preprocessing": stats(5, 1, 4, 1),
        "llm": stats(50, 0, 50, 1),
    }
    # two more requests: preprocessing 2 x 10 ms (2 ms queued each), vision 2 x 30 ms,
    # llm 2 x 200 ms
    after = {
        "medgemma": stats(100 + 500, 0, 0, 3),
        "preprocessing": stats(5 + 20, 1 + 4, 4 + 16, 3),
        "vision_encoder": stats(60, 0, 60, 2, executions=1),
        "llm": stats(50 + 400, 0, 50 + 10, 3, responses={"0": (2, 100), "1": (2, 40), "2": (2, 40)}),
    }
    s = stage_breakdown(before, after, requests=2, e2e_mean_ms=260)
    assert s.server_total_ms == pytest.approx(250)
    assert s.preprocessing_ms == pytest.approx(10)
    assert s.vision_encoder_ms == pytest.approx(30)
    assert s.llm_ms == pytest.approx(250 - 10 - 30)
    assert s.queue_ms == pytest.approx(2)
    assert (s.prefill_ms, s.prefill_source) == (pytest.approx(50), "llm response statistics")
    assert (s.decode_step_ms, s.decode_source) == (pytest.approx(20), "llm response statistics")
    assert s.client_overhead_ms == pytest.approx(10)
    vision = next(m for m in s.models if m.model == "vision_encoder")
    assert (vision.calls, vision.executions) == (2, 1)  # two images batched into one execution


def test_stage_breakdown_falls_back_to_client_timing_without_response_statistics():
    # a Python-backend decoupled llm: execute() returns at once, no per-response statistics
    after = {
        "medgemma": stats(2 * 100, 0, 0, 2),
        "preprocessing": stats(2 * 5, 0, 2 * 5, 2),
        "llm": stats(2 * 0.5, 0, 2 * 0.5, 2),
    }
    s = stage_breakdown({}, after, requests=2, ttft_mean_ms=40, itl_mean_ms=12, e2e_mean_ms=104)
    assert (s.llm_ms, s.llm_source) == (pytest.approx(100 - 5), "server total - other stages")
    assert (s.prefill_ms, s.prefill_source) == (pytest.approx(40 - 5), "client TTFT - earlier stages")
    assert (s.decode_step_ms, s.decode_source) == (12, "client ITL")
    assert s.vision_encoder_ms == 0 and s.client_overhead_ms == pytest.approx(4)
    # `medgemma` as a decoupled BLS pipeline: its counters are hand-offs, the client's E2E is the total
    s = stage_breakdown({}, after, 2, {"llm", "medgemma"}, ttft_mean_ms=40, itl_mean_ms=12, e2e_mean_ms=104)
    assert s.server_total_ms is None and s.client_overhead_ms is None
    assert s.llm_ms == pytest.approx(104 - 5) and s.llm_source.startswith("client E2E")


def test_stage_breakdown_ignores_llm_response_statistics_mixed_with_polls():
    # 2 requests, each a generation request and 3 polls to the llm: one answer per llm request
    after = {
        "medgemma": stats(2 * 100, 0, 0, 2),
        "preprocessing": stats(2 * 5, 0, 2 * 5, 2),
        "llm": stats(8 * 0.5, 0, 8 * 0.5, 8, responses={"0": (8, 8 * 20)}),
    }
    s = stage_breakdown({}, after, requests=2, ttft_mean_ms=40, itl_mean_ms=12, e2e_mean_ms=104)
    assert (s.prefill_ms, s.prefill_source) == (pytest.approx(40 - 5), "client TTFT - earlier stages")
    assert (s.decode_step_ms, s.decode_source) == (12, "client ITL")


# ---- workloads --------------------------------------------------------------------------------


def test_length_distributions():
    rng = np.random.default_rng(0)
    assert LengthDistribution.parse("64", "x").sample(rng) == 64
    uniform = LengthDistribution.parse("uniform:10,20", "x")
    assert all(10 <= uniform.sample(rng) <= 20 for _ in range(100))
    normal = [LengthDistribution.parse("normal:100,10", "x").sample(rng) for _ in range(2000)]
    assert abs(np.mean(normal) - 100) < 1.5 and abs(np.std(normal) - 10) < 1.5
    for bad in ("ten", "gamma:1,2", "uniform:5,1", "normal:5"):
        with pytest.raises(ValueError):
            LengthDistribution.parse(bad, "--input-tokens")


def test_synthetic_requests_have_exact_token_counts_and_images(tiny_checkpoint):
    from tokenizers import Tokenizer
    from PIL import Image

    requests = synthetic_requests(
        4, LengthDistribution.parse("37", "x"), LengthDistribution.parse("9", "x"),
        images_per_request=2, image_size=(40, 30), tokenizer_path=tiny_checkpoint, seed=5,
    )
    tokenizer = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    texts = [r.messages[0]["content"][0]["text"] for r in requests]
    assert len(set(texts)) == 4
    for r, text in zip(requests, texts):
        assert abs(len(tokenizer.encode(text, add_special_tokens=False).ids) - 37) <= 1
        assert r.max_tokens == 9 and len(r.images) == 2
        assert [p["type"] for p in r.messages[0]["content"]] == ["text", "image", "image"]
        assert Image.open(io.BytesIO(r.images[0])).size == (40, 30)
    card = requests[0].model_card_messages()
    assert card[0]["content"][1]["image"].size == (40, 30)
    again = synthetic_requests(
        4, LengthDistribution.parse("37", "x"), LengthDistribution.parse("9", "x"),
        images_per_request=2, image_size=(40, 30), tokenizer_path=tiny_checkpoint, seed=5,
    )
    assert again == requests  # a seed reproduces the workload


def test_jsonl_workload_reads_model_card_messages(tmp_path):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    (tmp_path / "xray.png").write_bytes(buffer.getvalue())
    data_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    lines = [
        {"messages": [
            {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
            {"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                         {"type": "image", "image": "xray.png"}]}],
         "max_tokens": 50},
        [{"role": "user", "content": [{"type": "image", "image": data_uri}, {"type": "text", "text": "And this?"}]}],
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    first, second = load_jsonl(path)
    assert first.max_tokens == 50 and second.max_tokens == 200
    assert first.images == (buffer.getvalue(),) and second.images == (buffer.getvalue(),)
    assert first.messages[1]["content"][1] == {"type": "image"}
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_jsonl(tmp_path / "bad.jsonl")


# ---- report files -----------------------------------------------------------------------------


def test_report_files_and_baseline_ratios(tmp_path):
    slo = Slo(ttft_ms=150)
    measured = []
    for concurrency, ttft in ((1, 0.1), (2, 0.12), (4, 0.2)):
        records = [record(k, k * 0.5, [k * 0.5 + ttft, k * 0.5 + ttft + 0.05, k * 0.5 + ttft + 0.1]) for k in range(6)]
        measured.append(MeasuredPoint("deployment", LoadPoint("concurrency", concurrency, compute_metrics(records, slo)), records))
    base_records = [record(k, k * 2.0, [k * 2.0 + 0.5, k * 2.0 + 0.7, k * 2.0 + 0.9]) for k in range(3)]
    baseline = MeasuredPoint("baseline", LoadPoint("concurrency", 1, compute_metrics(base_records, slo)), base_records)
    report = BenchmarkReport(
        metadata={"host": {"hostname": "h", "cpu": "c", "cpu_count": 2}, "profile": "cpu", "precision": "fp32"},
        workload={"description": "test"},
        slo=slo,
        points=measured + [baseline],
        plans=[capacity_plan([p.point for p in measured], slo, target_rps=2)],
        comparison=comparison_rows(measured, baseline),
    )
    ratio = report.comparison[0]
    assert ratio["ttft_p50_x"] == pytest.approx(100 / 500)
    assert ratio["request_throughput_x"] == pytest.approx(
        measured[0].point.metrics.request_throughput / baseline.point.metrics.request_throughput
    )
    paths = write_all(report, tmp_path / "out", prefix="throughput")
    names = sorted(p.name for p in paths)
    assert names == sorted([
        "throughput.json", "throughput_requests.csv", "throughput_summary.csv",
        "latency_vs_throughput.png", "ttft_itl_vs_concurrency.png",
    ])
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((tmp_path / "out" / "throughput.json").read_text())
    assert len(document["points"]) == 4 and len(document["points"][0]["records"]) == 6
    assert document["capacity_plans"][0]["best"] == "concurrency 2"
    assert document["points"][0]["metrics"]["ttft_ms"]["p50"] == pytest.approx(100)
    rows = list(csv.DictReader((tmp_path / "out" / "throughput_requests.csv").open()))
    assert len(rows) == 6 * 3 + 3 and rows[-1]["source"] == "baseline"
    summary = list(csv.DictReader((tmp_path / "out" / "throughput_summary.csv").open()))
    assert float(summary[0]["ttft_ms_p50"]) == pytest.approx(100)
    text = console_report(report)
    assert "concurrency 4" in text and "Capacity plan" in text and "baseline" in text


def test_refusals_are_counted_apart_from_failures_and_keep_a_point_out_of_the_plan():
    records = [record(0, 0.0, [0.1, 0.5]), record(1, 0.0, [], error="ServerBusyError: server busy: ..."),
               record(2, 0.0, [], error="ServerError: boom")]
    records[1].refused = True
    m = compute_metrics(records)
    assert (m.completed, m.errors, m.refused) == (1, 1, 1)
    refused_only = compute_metrics([records[0], records[1]])
    plan = capacity_plan([LoadPoint("concurrency", 2, refused_only)], None, target_rps=1)
    assert plan.best is None and "refused as busy" in plan.verdicts[0].reason


# ---- scaling signal ----------------------------------------------------------------------------


def test_queue_gauge_is_read_from_prometheus_text_by_model():
    from medgemma_triton.bench.queue import gauge_value, metrics_url_for, summarize

    text = "\n".join([
        "# HELP medgemma_queued_requests requests waiting for a decode slot",
        "# TYPE medgemma_queued_requests gauge",
        'medgemma_queued_requests{model="llm",version="1"} 3',
        'medgemma_queued_requests{model="medgemma",version="1"} 7',
        'medgemma_queued_requests_total{model="llm"} 99',
        'nv_inference_count{model="llm",version="1"} 12',
    ])
    assert gauge_value(text, "medgemma_queued_requests", model="llm") == 3.0
    assert gauge_value(text, "medgemma_queued_requests") == 10.0
    assert gauge_value(text, "medgemma_queued_requests", model="vision_encoder") is None
    assert metrics_url_for("10.0.0.5:8001") == "http://10.0.0.5:8002/metrics"
    depth = summarize([0, 0, 1, 2, 4, 4, 4, 5, 6, 8])
    assert (depth.mean, depth.p90, depth.max, depth.samples) == (3.4, pytest.approx(6.2), 8, 10)  # p90 interpolated
    assert summarize([]) is None


def test_capacity_plan_states_its_basis_and_a_queue_target():
    from medgemma_triton.bench.queue import QueueDepth

    def queued(p, mean):
        return LoadPoint(p.mode, p.value, p.metrics, QueueDepth(mean, mean, mean, 10))

    points = [queued(point(2, 1.0, 2.0), 0.2), queued(point(4, 1.0, 3.5), 2.5), queued(point(8, 0.5, 4.0), 9.0)]
    plan = capacity_plan(points, Slo(ttft_ms=500), target_rps=7, headroom=0.2, basis="run R against host:8001")
    assert plan.best == "concurrency 4" and plan.queued_at_best == 2.5 and plan.queue_target == 2.0
    text = "\n".join(plan.lines())
    assert "basis: run R against host:8001" in text
    assert 'medgemma_queued_requests{model="llm"} averaged 2.50' in text and "above 2.00 per instance" in text
    # nothing waited at the chosen load: no target to read from this run
    quiet = capacity_plan(points[:2][:1], Slo(ttft_ms=500), headroom=0.2)
    assert quiet.queued_at_best == 0.2 and quiet.queue_target is None
    assert "sets no queue target" in "\n".join(quiet.lines())
    # the gauge was not read at all
    unread = capacity_plan([point(2, 1.0, 2.0)], Slo(ttft_ms=500))
    assert unread.queued_at_best is None and "was not read" in "\n".join(unread.lines())


# ---- the load generator's own limit ------------------------------------------------------------


class BusyClient:
    """A send() that spends `cpu_s` of the event loop's CPU per request (the client's own per-response
    work made large) and `wait_s` waiting for the server."""

    def __init__(self, cpu_s: float, wait_s: float):
        self.cpu_s, self.wait_s = cpu_s, wait_s

    async def send(self, request, index):
        start = time.perf_counter()
        await asyncio.sleep(self.wait_s)
        end = time.thread_time() + self.cpu_s
        while time.thread_time() < end:
            pass
        return record(index, start, [time.perf_counter()])


def _measured(client, concurrency=4, requests=24):
    from medgemma_triton.bench.client_cpu import ClientCpuMeter

    meter = ClientCpuMeter()

    async def before():
        meter.start()

    async def run():
        records = await run_load_point(client.send, WORKLOAD, LoadSpec("concurrency", concurrency, requests, 60),
                                       before_measuring=before)
        return records, meter.stop()

    return asyncio.run(run())


def test_client_limited_points_are_flagged_and_kept_out_of_the_plan():
    records, busy = _measured(BusyClient(cpu_s=0.01, wait_s=0.001))
    assert busy.limited and busy.loop_busy >= 0.85 and busy.loop_cpu_s >= 24 * 0.01 * 0.9
    records_idle, idle = _measured(BusyClient(cpu_s=0.0, wait_s=0.02))
    assert not idle.limited and idle.loop_busy < 0.5
    busy_point = LoadPoint("concurrency", 4, compute_metrics(records), client=busy)
    idle_point = LoadPoint("concurrency", 2, compute_metrics(records_idle), client=idle)
    plan = capacity_plan([idle_point, busy_point], None)
    assert plan.best == "concurrency 2"
    assert "load generator was the limit" in plan.verdicts[1].reason
    allowed = capacity_plan([idle_point, busy_point], None, allow_client_limited=True)
    assert allowed.best == "concurrency 4"
