#!/usr/bin/env python
"""Two runs of benchmarks/readme_table.sh side by side: a Markdown table and a bar chart.

Reads `<run>/<precision>/throughput.json` (fp32, int4, int8; those present) of each run (the
transformers baseline is in the fp32 run) and prints, per row, output tokens/s and TTFT/ITL p50 before and after,
with each run's ratio to its own baseline.

    python benchmarks/before_after.py results/readme-before results/readme --plot docs/img/cpu-before-after.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


PRECISIONS = ("fp32", "int4", "int8")


def rows(run: Path) -> dict[str, dict]:
    """label -> p50 metrics of one readme_table.sh run."""
    out = {}
    for precision in PRECISIONS:
        path = run / precision / "throughput.json"
        if not path.is_file():
            continue
        document = json.loads(path.read_text())
        for point in document["points"]:
            m = point["metrics"]
            if point["source"] == "baseline":
                label = "transformers generate, fp32, concurrency 1"
            else:
                label = f"Triton cpu {precision}, concurrency {point['value']:g}"
            out[label] = {
                "tok_s": m["output_token_throughput"],
                "ttft_ms": m["ttft_ms"]["p50"],
                "itl_ms": m["itl_ms"]["p50"],
                "e2e_s": m["e2e_ms"]["p50"] / 1e3,
            }
    return out


def table(before: dict, after: dict) -> str:
    base_b = before.get("transformers generate, fp32, concurrency 1", {}).get("tok_s")
    base_a = after.get("transformers generate, fp32, concurrency 1", {}).get("tok_s")
    lines = [
        "| | out tok/s before → after | vs baseline before → after | TTFT p50 before → after | ITL p50 before → after |",
        "|---|---|---|---|---|",
    ]
    baseline_first = sorted(after, key=lambda label: not label.startswith("transformers"))
    for label in baseline_first:
        b, a = before.get(label), after[label]

        def pair(key, fmt):
            return f"{fmt(b[key]) if b else '-'} → {fmt(a[key])}"

        ratio_b = f"{b['tok_s'] / base_b:.2f}×" if b and base_b else "-"
        ratio_a = f"{a['tok_s'] / base_a:.2f}×" if base_a else "-"
        lines.append(
            f"| {label} | {pair('tok_s', lambda v: f'{v:.1f}')} | {ratio_b} → {ratio_a} | "
            f"{pair('ttft_ms', lambda v: f'{v:.0f} ms')} | {pair('itl_ms', lambda v: f'{v:.0f} ms')} |"
        )
    return "\n".join(lines)


def plot(before: dict, after: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = sorted(after, key=lambda label: not label.startswith("transformers"))
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(x - 0.2, [before.get(label, {}).get("tok_s", 0) for label in labels], 0.4, label="before")
    ax.bar(x + 0.2, [after[label]["tok_s"] for label in labels], 0.4, label="after")
    ax.set_xticks(x, [label.replace(", concurrency ", "\nc") for label in labels], fontsize=8)
    ax.set_ylabel("output tokens/s")
    ax.set_title("dev checkpoint, cpu profile, 2 vCPU: before vs after (one run each)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--plot", type=Path, help="write a bar chart of output tokens/s here")
    args = parser.parse_args(argv)
    before, after = rows(args.before), rows(args.after)
    if not after:
        parser.error(f"no throughput.json under {args.after}/{{{','.join(PRECISIONS)}}}")
    print(table(before, after))
    if args.plot:
        plot(before, after, args.plot)
        print(f"\nwrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
