#!/usr/bin/env python
"""One volume request: a served model given one request of --slices JPEG slices (MedGemma 1.5's CT
recipe: 85) reports the peak RSS of each model process (the kernel's VmHWM, reset just before the
request), the peak of the Python backend's shared memory (the /dev/shm regions of this server's model
processes, pages in use, sampled every 20 ms) and the request's latency; and, from a text stream
that decodes beside it (started first, streaming every response), the gaps between that stream's
responses while the volume is served: what a long prefill costs the others.

    python benchmarks/volume_memory.py --repository REPO --output docs/results/volume-memory/after.json

The slices are random 512x512 greyscale-looking JPEGs (a CT slice's usual size); their pixels cost what
the checkpoint's image size says, not what the JPEG holds. A server started here inherits this
environment: set MEDGEMMA_MAX_IMAGES and MEDGEMMA_MAX_INPUT_TOKENS to measure a release whose default
limits refuse a volume.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import time
from pathlib import Path

from medgemma_triton.bench.metadata import git_revision, host_info
from medgemma_triton.client import MedGemmaClient
from medgemma_triton.server.launcher import TritonServer, model_processes

SAMPLE_S = 0.02


def slice_jpeg(seed: int, side: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    grey = rng.integers(0, 255, (side, side), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(buffer, format="JPEG")
    return buffer.getvalue()


def volume_messages(slices: list[bytes], question: str) -> list[dict]:
    content = []
    for k, data in enumerate(slices, start=1):
        content += [{"type": "image", "image": data}, {"type": "text", "text": f"SLICE {k}"}]
    return [{"role": "user", "content": content + [{"type": "text", "text": question}]}]


def shm_regions(server_pid: int) -> list[Path]:
    """The /dev/shm region of each of this server's model processes (argv[2] of a 2.51 Python-backend stub)."""
    regions = []
    for pid in model_processes(server_pid):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        regions.append(Path("/dev/shm") / argv[2].decode())
    return regions


class Sampler(threading.Thread):
    def __init__(self, regions: list[Path]):
        super().__init__(daemon=True)
        self.regions = regions
        self.peak_mib = 0.0
        self.stopped = threading.Event()

    def used_mib(self) -> float:
        total = 0
        for region in self.regions:
            try:
                total += region.stat().st_blocks * 512  # pages in use, not the region's reserved size
            except OSError:
                pass
        return total / 2**20

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_S):
            self.peak_mib = max(self.peak_mib, self.used_mib())


class TextStream(threading.Thread):
    """A streamed text request, recording when each response arrives."""

    def __init__(self, url: str, max_tokens: int):
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.arrivals: list[float] = []
        self.started = threading.Event()

    def run(self) -> None:
        with MedGemmaClient(self.url) as client:
            with client.stream_chat("Write a long, detailed report of a normal chest X-ray.",
                                    max_tokens=self.max_tokens, timeout=1800) as stream:
                for _ in stream:
                    self.arrivals.append(time.monotonic())
                    self.started.set()
        self.started.set()

    def gaps_ms(self, start: float, end: float) -> list[float]:
        """Gaps between responses that arrived in [start, end] (with the one before start)."""
        times = [t for t in self.arrivals if t <= end]
        first = max(0, next((i for i, t in enumerate(times) if t >= start), len(times)) - 1)
        return [1e3 * (b - a) for a, b in zip(times[first:], times[first + 1 :])]


def peak_rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()[0]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=85)
    parser.add_argument("--side", type=int, default=512, help="slice width and height in pixels (default 512)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--stream-tokens", type=int, default=0,
                        help="run a text stream of this many tokens beside the volume (0: none)")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    slices = [slice_jpeg(i, args.side) for i in range(args.slices)]
    messages = volume_messages(slices, "Are there any findings in this CT volume?")
    with TritonServer(args.repository, ready_timeout_s=300) as server:
        processes = model_processes(server.process.pid)
        with MedGemmaClient(server.url) as client:
            client.chat("hello", max_tokens=2)  # every model warm
            sampler = Sampler(shm_regions(server.process.pid))
            baseline_shm = sampler.used_mib()
            for pid in processes:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
            idle = {name: peak_rss_mib(pid) for pid, name in processes.items()}
            text = TextStream(server.url, args.stream_tokens) if args.stream_tokens else None
            if text is not None:
                text.start()
                text.started.wait(120)
                time.sleep(1.0)  # the stream's own pace before the volume arrives
            sampler.start()
            started = time.monotonic()
            result = client.chat(messages, max_tokens=args.max_tokens, timeout=1800)
            finished = time.monotonic()
            seconds = finished - started
            sampler.stopped.set()
            sampler.join()
            if text is not None:
                text.join(1800)
            peaks = {name: peak_rss_mib(pid) for pid, name in processes.items()}
    report = {
        "slices": args.slices,
        "slice_side": args.side,
        "encoded_mib": sum(len(s) for s in slices) / 2**20,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "seconds": seconds,
        "shm_idle_mib": baseline_shm,
        "shm_peak_mib": sampler.peak_mib,
        "rss_idle_mib": idle,
        "rss_peak_mib": peaks,
        "limits_env": {k: v for k, v in os.environ.items() if k.startswith("MEDGEMMA_MAX_")},
        "prefill_chunk_tokens": _llm_parameter(args.repository, "prefill_chunk_tokens"),
        "revision": git_revision(),
    }
    print(f"{args.slices} slices ({report['encoded_mib']:.1f} MiB of JPEG), {result.prompt_tokens} prompt tokens: "
          f"{seconds:.1f} s")
    print(f"  /dev/shm in use: {baseline_shm:.0f} MiB idle, {sampler.peak_mib:.0f} MiB peak")
    for name in sorted(peaks):
        print(f"  {name}: RSS {idle[name]:.0f} MiB before, peak {peaks[name]:.0f} MiB")
    if text is not None:
        before = text.gaps_ms(started - 1.0, started)
        during = text.gaps_ms(started, finished)
        report["stream_gaps_ms"] = {"before": before, "during": during}
        print(f"  text stream: {len(before)} responses in the second before, largest gap {max(before, default=0):.0f} ms; "
              f"{len(during)} during the volume, largest gap {max(during, default=0):.0f} ms")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"host": host_info(), "report": report}, indent=2))
    return 0


def _llm_parameter(repository: Path, key: str) -> str | None:
    from medgemma_triton.repository.config import read_config

    parameters = read_config(repository / "llm" / "config.pbtxt").parameters
    return parameters[key].string_value if key in parameters else None


if __name__ == "__main__":
    sys.exit(main())
