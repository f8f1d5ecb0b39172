"""Reports: a console table people read, JSON and CSV files programs read, PNG plots.

Every number comes from `BenchmarkMetrics`; nothing here computes a statistic.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .capacity import CapacityPlan, LoadPoint
from .metrics import BenchmarkMetrics, RequestRecord, Slo

LATENCY_METRICS = (  # (BenchmarkMetrics field, label)
    ("ttft_ms", "TTFT (ms)"),
    ("itl_ms", "ITL = TPOT (ms)"),
    ("inter_chunk_ms", "inter-chunk (ms)"),
    ("e2e_ms", "E2E latency (ms)"),
    ("output_tokens_per_user", "tok/s per user"),
)
STATISTICS = ("mean", "p50", "p90", "p99")


@dataclass
class MeasuredPoint:
    """A load point with its raw records: what the report and files are written from."""

    source: str  # "deployment" or "baseline"
    point: LoadPoint
    records: list[RequestRecord]
    origin_s: float = 0.0  # perf_counter of the point's first request
    stages: dict | None = None  # StageBreakdown.to_dict() when collected


@dataclass
class BenchmarkReport:
    metadata: dict
    workload: dict
    slo: Slo | None
    points: list[MeasuredPoint]
    plans: list[CapacityPlan] = field(default_factory=list)
    comparison: list[dict] = field(default_factory=list)

    def deployment(self) -> list[MeasuredPoint]:
        return [p for p in self.points if p.source == "deployment"]

    def baseline(self) -> list[MeasuredPoint]:
        return [p for p in self.points if p.source == "baseline"]


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _row_label(p: MeasuredPoint) -> str:
    return p.point.label if p.source == "deployment" else f"baseline ({p.point.label})"


def summary_table(points: list[MeasuredPoint], slo: Slo | None) -> str:
    header = ["load", "ok", "err", "busy", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "E2E p50", "E2E p99"]
    if slo:
        header += ["goodput", "SLO met"]
    header.append("client CPU")  # the load generator's event loop busy share; "limited" when it was the limit
    rows = []
    for p in points:
        m = p.point.metrics
        client = p.point.client
        row = [
            _row_label(p), m.completed, m.errors, m.refused, _fmt(m.request_throughput, 3), _fmt(m.output_token_throughput),
            _fmt(m.ttft_ms.p50), _fmt(m.ttft_ms.p99), _fmt(m.itl_ms.p50, 2), _fmt(m.itl_ms.p99, 2),
            _fmt(m.e2e_ms.p50), _fmt(m.e2e_ms.p99),
        ]
        if slo:
            row += [_fmt(m.goodput, 3), "-" if m.slo_attainment is None else f"{m.slo_attainment:.0%}"]
        row.append("-" if client is None else f"{client.loop_busy:.0%}{' LIMITED' if client.limited else ''}")
        rows.append(row)
    return _table(header, rows)


def detail_table(points: list[MeasuredPoint]) -> str:
    header = ["metric", "statistic", *(_row_label(p) for p in points)]
    rows = []
    for name, label in LATENCY_METRICS:
        for stat in STATISTICS:
            rows.append([label, stat, *(_fmt(getattr(getattr(p.point.metrics, name), stat), 2) for p in points)])
    return _table(header, rows)


def comparison_rows(deployment: list[MeasuredPoint], baseline: MeasuredPoint) -> list[dict]:
    """Deployment / baseline ratios per load point: >1 is better for throughput, <1 for latency."""
    b = baseline.point.metrics

    def ratio(x, y):
        return None if x is None or not y else x / y

    rows = []
    for p in deployment:
        m = p.point.metrics
        rows.append({
            "load": p.point.label,
            "request_throughput_x": ratio(m.request_throughput, b.request_throughput),
            "output_token_throughput_x": ratio(m.output_token_throughput, b.output_token_throughput),
            "ttft_p50_x": ratio(m.ttft_ms.p50, b.ttft_ms.p50),
            "itl_p50_x": ratio(m.itl_ms.p50, b.itl_ms.p50),
            "e2e_p50_x": ratio(m.e2e_ms.p50, b.e2e_ms.p50),
        })
    return rows


def comparison_table(rows: list[dict]) -> str:
    header = ["load", "req/s (x)", "out tok/s (x)", "TTFT p50 (x)", "ITL p50 (x)", "E2E p50 (x)"]
    keys = ["request_throughput_x", "output_token_throughput_x", "ttft_p50_x", "itl_p50_x", "e2e_p50_x"]
    return _table(header, [[r["load"], *(_fmt(r[k], 2) for k in keys)] for r in rows])


def stage_table(stages: dict) -> str:
    rows = [
        ["preprocessing", _fmt(stages["preprocessing_ms"], 2), "Triton statistics"],
        ["vision_encoder", _fmt(stages["vision_encoder_ms"], 2), "Triton statistics"],
        ["llm: prefill + decode", _fmt(stages["llm_ms"], 2), stages["llm_source"]],
        ["  prefill (first token)", _fmt(stages["prefill_ms"], 2), stages["prefill_source"]],
        ["  decode, per token", _fmt(stages["decode_step_ms"], 2), stages["decode_source"]],
        ["queueing (in the stages above)", _fmt(stages["queue_ms"], 2), "Triton statistics"],
        ["server total (medgemma)", _fmt(stages["server_total_ms"], 2),
         "Triton statistics" if stages["server_total_ms"] is not None else "not counted: medgemma is decoupled"],
        ["client + network", _fmt(stages["client_overhead_ms"], 2), "client E2E mean - server total"],
    ]
    return _table(["stage", "ms per request", "from"], rows)


def console_report(report: BenchmarkReport) -> str:
    meta = report.metadata
    deployment = meta.get("deployment") or {}
    server = deployment.get("server") or {}
    lines = [
        "",
        "=" * 28 + " medgemma benchmark " + "=" * 28,
        f"deployment: {deployment.get('url', '-')}  Triton {server.get('version', '-')}  "
        f"profile {meta.get('profile', '-')}  precision {meta.get('precision') or '-'}",
        f"workload: {report.workload.get('description', '')}",
        f"host: {meta['host']['hostname']} ({meta['host']['cpu']}, {meta['host']['cpu_count']} CPUs)  "
        f"git {meta.get('git_revision') or '-'}",
        "",
        summary_table(report.points, report.slo),
        "",
        detail_table(report.points),
    ]
    for p in report.points:
        if p.stages:
            lines += ["", f"Time by stage, {_row_label(p)}:", stage_table(p.stages)]
    if report.comparison:
        lines += ["", "Deployment / transformers baseline (x):", comparison_table(report.comparison)]
    for plan in report.plans:
        lines += ["", *plan.lines()]
    return "\n".join(lines)


def _point_json(p: MeasuredPoint) -> dict:
    return {
        "source": p.source,
        "mode": p.point.mode,
        "value": p.point.value,
        "label": p.point.label,
        "metrics": p.point.metrics.to_dict(),
        "queued": p.point.queued.to_dict() if p.point.queued else None,
        "client_cpu": p.point.client.to_dict() if p.point.client else None,
        "stages": p.stages,
        "records": [r.summary_row(p.origin_s) for r in p.records],
    }


def write_json(report: BenchmarkReport, path: Path) -> None:
    document = {
        "metadata": report.metadata,
        "workload": report.workload,
        "slo": str(report.slo) if report.slo else None,
        "points": [_point_json(p) for p in report.points],
        "capacity_plans": [plan.to_dict() for plan in report.plans],
        "baseline_comparison": report.comparison,
    }
    path.write_text(json.dumps(_finite(document), indent=2, allow_nan=False) + "\n")


def _finite(value):
    """NaN/inf (a rate over a zero-length window) become null: strict JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _flat_metrics(m: BenchmarkMetrics) -> dict:
    out = {}
    for key, value in m.to_dict().items():
        if isinstance(value, dict):
            out.update({f"{key}_{stat}": v for stat, v in value.items()})
        else:
            out[key] = value
    return out


def write_csv(report: BenchmarkReport, requests_path: Path, summary_path: Path) -> None:
    with requests_path.open("w", newline="") as f:
        writer = None
        for p in report.points:
            for record in p.records:
                row = {"source": p.source, "mode": p.point.mode, "load": p.point.value, **record.summary_row(p.origin_s)}
                row["content_times_ms"] = ";".join(str(t) for t in row["content_times_ms"])
                row["content_tokens"] = ";".join(str(t) for t in row["content_tokens"])
                if writer is None:
                    writer = csv.DictWriter(f, fieldnames=list(row))
                    writer.writeheader()
                writer.writerow(row)
    with summary_path.open("w", newline="") as f:
        writer = None
        for p in report.points:
            row = {"source": p.source, "mode": p.point.mode, "load": p.point.value, **_flat_metrics(p.point.metrics)}
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)


def _nan(value):
    return math.nan if value is None else value


def write_plots(report: BenchmarkReport, directory: Path) -> list[Path]:
    """latency_vs_throughput.png and ttft_itl_vs_load.png (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    deployment = report.deployment()
    baseline = report.baseline()
    if not deployment:
        return written
    modes = sorted({p.point.mode for p in deployment})
    labels = [v for v in (report.metadata.get("profile"), report.metadata.get("precision")) if v]
    title_suffix = f" ({' '.join(labels)})" if labels else ""

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for mode in modes:
        pts = [p for p in deployment if p.point.mode == mode]
        xs = [p.point.metrics.request_throughput for p in pts]
        tok = [p.point.metrics.output_token_throughput for p in pts]
        for stat, style in (("p50", "o-"), ("p99", "s--")):
            left.plot(xs, [_nan(getattr(p.point.metrics.e2e_ms, stat)) for p in pts], style, label=f"E2E {stat}")
            right.plot(tok, [_nan(getattr(p.point.metrics.itl_ms, stat)) for p in pts], style, label=f"ITL {stat}")
        for p, x, y in zip(pts, xs, [p.point.metrics.e2e_ms.p50 for p in pts]):
            left.annotate(p.point.label.replace("concurrency ", "c="), (x, _nan(y)), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for b in baseline:
        left.plot([b.point.metrics.request_throughput], [_nan(b.point.metrics.e2e_ms.p50)], "k*", markersize=12, label="transformers baseline p50")
        right.plot([b.point.metrics.output_token_throughput], [_nan(b.point.metrics.itl_ms.p50)], "k*", markersize=12, label="transformers baseline p50")
    if report.slo and report.slo.e2e_ms:
        left.axhline(report.slo.e2e_ms, color="red", linewidth=0.8, label="E2E SLO")
    if report.slo and report.slo.itl_ms:
        right.axhline(report.slo.itl_ms, color="red", linewidth=0.8, label="ITL SLO")
    left.set(xlabel="request throughput (req/s)", ylabel="end-to-end latency (ms)", title="Latency vs throughput" + title_suffix)
    right.set(xlabel="output token throughput (tok/s)", ylabel="inter-token latency (ms)", title="ITL vs token throughput")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    path = directory / "latency_vs_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    for mode in modes:
        pts = sorted((p for p in deployment if p.point.mode == mode), key=lambda p: p.point.value)
        xs = [p.point.value for p in pts]
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
        for stat, style in (("p50", "o-"), ("p90", "^-"), ("p99", "s--")):
            left.plot(xs, [_nan(getattr(p.point.metrics.ttft_ms, stat)) for p in pts], style, label=f"TTFT {stat}")
            right.plot(xs, [_nan(getattr(p.point.metrics.itl_ms, stat)) for p in pts], style, label=f"ITL {stat}")
        if report.slo and report.slo.ttft_ms:
            left.axhline(report.slo.ttft_ms, color="red", linewidth=0.8, label="TTFT SLO")
        if report.slo and report.slo.itl_ms:
            right.axhline(report.slo.itl_ms, color="red", linewidth=0.8, label="ITL SLO")
        xlabel = "concurrency (requests in flight)" if mode == "concurrency" else "offered request rate (req/s)"
        left.set(xlabel=xlabel, ylabel="time to first token (ms)", title="TTFT percentiles" + title_suffix)
        right.set(xlabel=xlabel, ylabel="inter-token latency (ms)", title="ITL percentiles")
        for axis in (left, right):
            axis.set_xticks(xs)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        fig.tight_layout()
        path = directory / ("ttft_itl_vs_concurrency.png" if mode == "concurrency" else "ttft_itl_vs_request_rate.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_all(report: BenchmarkReport, directory: Path, prefix: str = "throughput", plots: bool = True) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{prefix}.json", directory / f"{prefix}_requests.csv", directory / f"{prefix}_summary.csv"]
    write_json(report, paths[0])
    write_csv(report, paths[1], paths[2])
    if plots:
        paths += write_plots(report, directory)
    return paths
