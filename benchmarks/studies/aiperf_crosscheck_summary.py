"""Summarise an aiperf_crosscheck.sh run: AIPerf against `throughput.py --endpoint openai`.

For every concurrency and round it reads each tool's own report (AIPerf's profile_export_aiperf.json,
throughput.py's throughput.json) and each tool's per-request records (AIPerf's profile_export.jsonl,
the records in throughput.json), and recomputes both tools' metrics from those records under one
definition, so that what is left of a difference is what the tools saw, not how they count:

- TTFT: first non-empty content chunk - request start;
- ITL: (last content chunk - first content chunk) / (output tokens - 1), per request;
- output tokens/s: all output tokens / (last content chunk of any request - first request start);
- percentiles by medgemma_triton.bench.metrics.distribution, the project's one percentile helper.

Prints a markdown table (medians over rounds) and, with --json, writes the same as JSON: the
summary, not the raw records (those stay in --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

from medgemma_triton.bench.metrics import distribution

METRICS = ("ttft_p50_ms", "ttft_mean_ms", "itl_p50_ms", "itl_mean_ms", "request_latency_p50_ms", "output_tokens_per_s")
AIPERF_PROFILING_PHASE = "profiling"  # AIPerf tags warm-up records "warmup"; only these are measured


def aligned(requests: list[dict], concurrency: int) -> dict:
    """The metrics under one definition from records of {start_ms, ttft_ms, last_ms, output_tokens}, and
    the TTFT p50 of each wave of `concurrency` requests in start order (how much it moves within a run)."""
    ttft = distribution(r["ttft_ms"] for r in requests)
    itl = distribution((r["last_ms"] - r["ttft_ms"]) / (r["output_tokens"] - 1)
                       for r in requests if r["output_tokens"] > 1)
    latency = distribution(r["last_ms"] for r in requests)
    in_order = sorted(requests, key=lambda r: r["start_ms"])
    waves = [in_order[i:i + concurrency] for i in range(0, len(in_order), concurrency)]
    first = min(r["start_ms"] for r in requests)
    last = max(r["start_ms"] + r["last_ms"] for r in requests)
    return {
        "ttft_p50_ms": ttft.p50, "ttft_mean_ms": ttft.mean, "itl_p50_ms": itl.p50, "itl_mean_ms": itl.mean,
        "request_latency_p50_ms": latency.p50,
        "output_tokens_per_s": sum(r["output_tokens"] for r in requests) / ((last - first) / 1e3),
        "requests": len(requests),
        "output_tokens_per_request": sorted({r["output_tokens"] for r in requests}),
        "ttft_p50_ms_by_wave": [distribution(r["ttft_ms"] for r in wave).p50 for wave in waves],
    }


def aiperf_round(directory: Path, concurrency: int) -> dict:
    report = json.loads((directory / "profile_export_aiperf.json").read_text())
    reported = {
        "ttft_p50_ms": report["time_to_first_token"]["p50"], "ttft_mean_ms": report["time_to_first_token"]["avg"],
        "itl_p50_ms": report["inter_token_latency"]["p50"], "itl_mean_ms": report["inter_token_latency"]["avg"],
        "request_latency_p50_ms": report["request_latency"]["p50"],
        "output_tokens_per_s": report["output_token_throughput"]["avg"],
    }
    requests = []
    for line in (directory / "profile_export.jsonl").read_text().splitlines():
        record = json.loads(line)
        metadata, metrics = record["metadata"], record.get("metrics") or {}
        if metadata.get("benchmark_phase") != AIPERF_PROFILING_PHASE or record.get("error"):
            continue
        requests.append({
            "start_ms": metadata["request_start_ns"] / 1e6,
            "ttft_ms": metrics["time_to_first_token"]["value"],
            "last_ms": metrics["request_latency"]["value"],  # AIPerf: the last content response
            "output_tokens": int(metrics["output_sequence_length"]["value"]),
        })
    return {"reported": reported, "aligned": aligned(requests, concurrency)}


def throughput_round(directory: Path, concurrency: int) -> dict:
    (point,) = json.loads((directory / "throughput.json").read_text())["points"]
    metrics = point["metrics"]
    reported = {
        "ttft_p50_ms": metrics["ttft_ms"]["p50"], "ttft_mean_ms": metrics["ttft_ms"]["mean"],
        "itl_p50_ms": metrics["itl_ms"]["p50"], "itl_mean_ms": metrics["itl_ms"]["mean"],
        "request_latency_p50_ms": metrics["e2e_ms"]["p50"],
        "output_tokens_per_s": metrics["output_token_throughput"],
    }
    requests = [{"start_ms": r["start_ms"], "ttft_ms": r["ttft_ms"], "last_ms": r["e2e_ms"],
                 "output_tokens": r["output_tokens"]} for r in point["records"] if r["ok"]]
    return {"reported": reported, "aligned": aligned(requests, concurrency)}


def difference_pct(aiperf: dict, throughput: dict) -> dict:
    return {m: 100.0 * (throughput[m] / aiperf[m] - 1.0) for m in METRICS}


def medians(rounds: list[dict], tool: str, kind: str) -> dict:
    return {m: statistics.median(r[tool][kind][m] for r in rounds) for m in METRICS}


def cpu() -> dict:
    """The CPU's model name and widest vector ISA, from /proc/cpuinfo (the VM may not name its generation)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    model = fields.get("model name") or platform.processor() or "unknown"
    return {"cpu": model, "vector_isa": isa, "logical_cpus": os.cpu_count()}


def source_commit() -> str | None:
    """The commit of the code that served and measured (the working tree's HEAD; "-dirty" if edited)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summarise(out: Path, rounds: int, concurrencies: list[int], settings: dict | None = None) -> dict:
    points = []
    for c in concurrencies:
        per_round = [{"round": r, "aiperf": aiperf_round(out / f"aiperf-r{r}-c{c}", c),
                      "throughput_py": throughput_round(out / f"throughput-r{r}-c{c}", c)}
                     for r in range(1, rounds + 1)]
        median = {tool: {kind: medians(per_round, tool, kind) for kind in ("reported", "aligned")}
                  for tool in ("aiperf", "throughput_py")}
        points.append({
            "concurrency": c,
            "median": median,
            "difference_pct": {kind: difference_pct(median["aiperf"][kind], median["throughput_py"][kind])
                               for kind in ("reported", "aligned")},
            "rounds": per_round,
        })
    version = out / "aiperf.version"
    return {
        "machine": cpu(),
        "aiperf_version": version.read_text().strip() if version.exists() else None,
        "commit": source_commit(),
        "settings": settings or {},
        "definitions": {
            "aligned": "TTFT = first non-empty content chunk - request start; ITL = (last content chunk - first) / "
                       "(output tokens - 1); output tokens/s = output tokens / (last content chunk of any request - "
                       "first request start); server token counts (include_usage)",
            "difference_pct": "100 * (throughput.py / AIPerf - 1)",
        },
        "points": points,
    }


def table(summary: dict) -> str:
    lines = ["| concurrency | metric | AIPerf (reported) | throughput.py (reported) | difference | "
             "AIPerf (aligned) | throughput.py (aligned) | difference |", "|---|---|---|---|---|---|---|---|"]
    for point in summary["points"]:
        m, d = point["median"], point["difference_pct"]
        for metric in METRICS:
            lines.append(
                f"| {point['concurrency']} | {metric} | {m['aiperf']['reported'][metric]:.1f} | "
                f"{m['throughput_py']['reported'][metric]:.1f} | {d['reported'][metric]:+.1f}% | "
                f"{m['aiperf']['aligned'][metric]:.1f} | {m['throughput_py']['aligned'][metric]:.1f} | "
                f"{d['aligned'][metric]:+.1f}% |")
    return "\n".join(lines)


def rounded(value, digits: int = 3):
    """Floats to `digits` decimals (milliseconds to the microsecond), for a JSON a person can read."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="aiperf_crosscheck.sh's OUT folder")
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--concurrency", required=True, help="comma-separated, as CONCURRENCY")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                        help="the run's settings, recorded in the JSON (repeatable)")
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.setting)
    summary = summarise(args.out, args.rounds, [int(c) for c in args.concurrency.split(",")], settings)
    print(table(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rounded(summary), indent=1) + "\n")


if __name__ == "__main__":
    main()
