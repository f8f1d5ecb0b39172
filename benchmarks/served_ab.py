#!/usr/bin/env python
"""Served latency of two deployments (before and after a change), in alternating rounds.

Both are served at once on this machine, each by its own Triton server running its own code (for
example one from a `git worktree` of the old commit, in its own environment). Each round runs
benchmarks/throughput.py against "before", then "after", for every image count, so drift on a shared
host hits both sides alike. Prints a Markdown table of medians over rounds and writes every run's
throughput.json plus summary.json under --output.

    python benchmarks/served_ab.py --before-url 127.0.0.1:8301 --after-url 127.0.0.1:8401 \
        --output docs/results/dataflow-ab
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from medgemma_triton.bench.metadata import host_info

METRICS = {  # summary column -> throughput.json metric, p50 unless a scalar
    "TTFT p50 ms": ("ttft_ms", "p50"),
    "ITL p50 ms": ("itl_ms", "p50"),
    "E2E p50 ms": ("e2e_ms", "p50"),
    "output tok/s": ("output_token_throughput", None),
}


def _throughput(url: str, output: Path, args, images: int) -> Path:
    command = [
        sys.executable, str(Path(__file__).with_name("throughput.py")), "--url", url,
        "--concurrency", args.concurrency, "--num-requests", str(args.num_requests),
        "--input-tokens", str(args.input_tokens), "--output-tokens", str(args.output_tokens),
        "--images", str(images), "--output-dir", str(output), "--no-plots", "--quiet",
    ]
    subprocess.run(command, check=True)
    return output / "throughput.json"


def _points(path: Path) -> dict[float, dict[str, float]]:
    """concurrency -> summary metrics of one throughput.py run."""
    out = {}
    for point in json.loads(path.read_text())["points"]:
        if point["source"] == "baseline":
            continue
        metrics = point["metrics"]
        out[point["value"]] = {
            column: metrics[name][stat] if stat else metrics[name] for column, (name, stat) in METRICS.items()
        }
    return out


def summarise(runs: dict[str, dict[int, list[Path]]]) -> list[dict]:
    """Medians over rounds, per side, image count and concurrency."""
    rows = []
    for side, by_images in runs.items():
        for images, paths in sorted(by_images.items()):
            per_round = [_points(path) for path in paths]
            for concurrency in sorted(per_round[0]):
                row = {"side": side, "images": images, "concurrency": concurrency, "rounds": len(per_round)}
                for column in METRICS:
                    row[column] = statistics.median(r[concurrency][column] for r in per_round)
                rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    keyed = {(r["images"], r["concurrency"], r["side"]): r for r in rows}
    lines = ["| images | concurrency | " + " | ".join(f"{c} before / after" for c in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for images, concurrency in sorted({(r["images"], r["concurrency"]) for r in rows}):
        before, after = keyed[(images, concurrency, "before")], keyed[(images, concurrency, "after")]
        cells = [f"{before[c]:.1f} / {after[c]:.1f}" for c in METRICS]
        lines.append(f"| {images} | {concurrency:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before-url", required=True, help="Triton gRPC HOST:PORT serving the code before the change")
    parser.add_argument("--after-url", required=True, help="Triton gRPC HOST:PORT serving the code after it")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", default="0,1", help="image counts per request, e.g. 0,1")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--input-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    args = parser.parse_args()

    urls = {"before": args.before_url, "after": args.after_url}
    images = [int(n) for n in args.images.split(",")]
    runs: dict[str, dict[int, list[Path]]] = {side: {n: [] for n in images} for side in urls}
    for round_index in range(args.rounds):
        for side, url in urls.items():
            for n in images:
                out = args.output / f"round-{round_index + 1}" / side / f"images-{n}"
                print(f"round {round_index + 1}: {side}, {n} image(s) per request", flush=True)
                runs[side][n].append(_throughput(url, out, args, n))

    rows = summarise(runs)
    summary = {"host": host_info(), "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
