#!/usr/bin/env python
"""Head-of-line blocking: text-only requests while clients send large image requests back to back.

IMAGE_CLIENTS clients each loop requests of 4 PNGs of 8192x8192 (mostly one colour: about 200 KB
each on the wire, about a second each to decode), while one client sends short text-only requests.
Reports the text requests' latency, the image requests' outcomes, the RSS of the `preprocessing`
model's process (from /proc; its peak is the kernel's VmHWM, reset when the load starts), and deadline
probes: a text and an image request sent with timeout_ms=1000 (no client-side deadline) behind the
load, their latency and finish reason.

    python benchmarks/studies/head_of_line.py --repository REPO --duration 60 --output docs/results/head-of-line-tiny-epyc-zen3/after-r3.json

To measure an older checkout: build its repository with that checkout's code, link its
`medgemma_triton` into each model's version directory (`1/`), and run this script from a directory
outside any checkout (a Python-backend stub searches the server's working directory first).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import queue
import sys
import threading
import time
from pathlib import Path

from medgemma_triton.bench.metadata import git_revision, host_info
from medgemma_triton.bench.metrics import distribution
from medgemma_triton.bench.soak import rss_mib
from medgemma_triton.contract import TOP_MODEL
from medgemma_triton.server.launcher import TritonServer, model_processes

IMAGE_CLIENTS = 4
IMAGES_PER_REQUEST = 4
IMAGE_SIDE = 8192
PROBE_TIMEOUT_MS = 1000
RSS_SAMPLE_S = 0.1
SETTLE_S = 2.0  # after the load, before the RSS that shows whether decoded images' memory went back to the OS


def large_png(side: int) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (side, side), (200, 30, 40))
    image.paste((10, 120, 250), (0, 0, side // 16, side // 16))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclasses.dataclass
class Outcome:
    seconds: float
    finish_reason: str = ""
    error: str | None = None


class Stream:
    """One gRPC stream to the `medgemma` model (tritonclient), one request at a time."""

    def __init__(self, url: str):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.results: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.results.put((result, error)))

    def request(self, messages, images=(), timeout_ms: int | None = None, max_tokens: int = 4) -> Outcome:
        from medgemma_triton.client.request import build_request

        message = {"role": "user", "content": [{"type": "image", "image": png} for png in images]
                   + [{"type": "text", "text": messages}]}
        # timeout becomes the server-side timeout_ms only: sent this way, no client deadline cancels the call
        request = build_request([message], stream=False, max_tokens=max_tokens, temperature=0.0,
                                timeout=None if timeout_ms is None else timeout_ms / 1e3)
        started = time.monotonic()
        self.client.async_stream_infer(TOP_MODEL, request.inputs, outputs=request.outputs)
        while True:
            result, error = self.results.get(timeout=600)
            if error is not None:
                return Outcome(time.monotonic() - started, error=str(error))
            reason = result.as_numpy("finish_reason")[0].decode()
            if reason:
                return Outcome(time.monotonic() - started, reason)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


class RssSampler(threading.Thread):
    """RSS of the preprocessing model's process(es), summed, every RSS_SAMPLE_S; and their exact peak
    (the kernel's VmHWM, reset when the load starts)."""

    def __init__(self, server_pid: int):
        super().__init__(daemon=True)
        self.pids = [pid for pid, name in model_processes(server_pid).items() if name.startswith("preprocessing")]
        self.samples: list[float] = []
        self.stopped = threading.Event()

    def sample(self) -> float:
        return sum(rss_mib(pid) or 0.0 for pid in self.pids)

    def reset_peak(self) -> None:
        for pid in self.pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)

    def peak(self) -> float:
        total = 0.0
        for pid in self.pids:
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(status.split("VmHWM:")[1].split()[0]) / 1024
        return total

    def run(self) -> None:
        while not self.stopped.wait(RSS_SAMPLE_S):
            self.samples.append(self.sample())


def run(url: str, server_pid: int | None, duration_s: float, image_side: int, text_interval_s: float) -> dict:
    png = large_png(image_side)
    text = Stream(url)
    text.request("Hello")  # warm
    sampler = RssSampler(server_pid) if server_pid else None
    idle_mib = sampler.sample() if sampler else None
    stop = threading.Event()
    image_outcomes: list[Outcome] = []

    def image_client() -> None:
        stream = Stream(url)
        try:
            while not stop.is_set():
                image_outcomes.append(stream.request("Describe the images.", [png] * IMAGES_PER_REQUEST))
        finally:
            stream.close()

    clients = [threading.Thread(target=image_client, daemon=True) for _ in range(IMAGE_CLIENTS)]
    if sampler:
        sampler.reset_peak()
        sampler.start()
    load_started = time.monotonic()
    for client in clients:
        client.start()
    text_outcomes: list[Outcome] = []
    probes = {}
    try:
        time.sleep(2.0)  # every image client has a request in flight
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            text_outcomes.append(text.request("Is this chest X-ray normal?"))
            time.sleep(text_interval_s)
        probes["text"] = text.request("Is this chest X-ray normal?", timeout_ms=PROBE_TIMEOUT_MS)
        probes["images"] = text.request("Describe the images.", [png] * IMAGES_PER_REQUEST, timeout_ms=PROBE_TIMEOUT_MS)
    finally:
        stop.set()
        for client in clients:
            client.join(600)
        load_s = time.monotonic() - load_started
        if sampler:
            sampler.stopped.set()
            sampler.join()
            peak_mib = sampler.peak()
        text.close()
    time.sleep(SETTLE_S)
    after_mib = sampler.sample() if sampler else None
    latencies = [o.seconds for o in text_outcomes if o.error is None]
    images_done = [o for o in image_outcomes if o.error is None]
    return {
        "image_clients": IMAGE_CLIENTS,
        "images_per_request": IMAGES_PER_REQUEST,
        "image_side": image_side,
        "image_png_bytes": len(png),
        "duration_s": duration_s,
        "text_interval_s": text_interval_s,
        "text_requests": len(text_outcomes),
        "text_errors": [o.error for o in text_outcomes if o.error],
        "text_latency_s": dataclasses.asdict(distribution(latencies)),
        "image_requests": len(image_outcomes),
        "image_errors": [o.error for o in image_outcomes if o.error],
        "image_latency_s": dataclasses.asdict(distribution([o.seconds for o in images_done])),
        "load_s": load_s,
        "image_requests_per_min": 60.0 * len(images_done) / load_s,
        "deadline_probes": {kind: {"timeout_ms": PROBE_TIMEOUT_MS, **dataclasses.asdict(o)} for kind, o in probes.items()},
        "preprocessing_rss_mib": None if sampler is None else {
            "idle": idle_mib, "peak": peak_mib, "peak_sampled": max(sampler.samples, default=idle_mib),
            f"{SETTLE_S:g}_s_after_load": after_mib,
        },
    }


def lines(report: dict) -> list[str]:
    text, rss = report["text_latency_s"], report["preprocessing_rss_mib"]
    seconds = lambda value: "-" if value is None else f"{value:.2f} s"  # noqa: E731
    out = [
        f"{report['image_clients']} clients x {report['images_per_request']} PNGs of {report['image_side']}px "
        f"({report['image_png_bytes'] // 1024} KB each), {report['duration_s']:.0f} s",
        f"text-only: {report['text_requests']} requests, p50 {seconds(text['p50'])}, max {seconds(text['max'])}, "
        f"{len(report['text_errors'])} errors",
        f"images: {report['image_requests']} requests in {report['load_s']:.0f} s "
        f"({report['image_requests_per_min']:.1f}/min), {len(report['image_errors'])} errors",
    ]
    for error in sorted(set(report["text_errors"] + report["image_errors"]))[:5]:
        out.append(f"  error: {error}")
    for kind, probe in report["deadline_probes"].items():
        out.append(f"{kind} request with timeout_ms={probe['timeout_ms']}: {probe['seconds']:.2f} s, "
                   f"{probe['error'] or repr(probe['finish_reason'])}")
    if rss:
        after = rss[f"{SETTLE_S:g}_s_after_load"]
        out.append(f"preprocessing RSS: idle {rss['idle']:.0f} MiB, peak {rss['peak']:.0f} MiB, "
                   f"{SETTLE_S:g} s after the load {after:.0f} MiB")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repository", type=Path, help="serve this model repository for the run")
    target.add_argument("--url", help="a running server (gRPC HOST:PORT); RSS only with --server-pid")
    parser.add_argument("--server-pid", type=int, help="tritonserver's pid, when --url runs on this machine")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the server --repository starts (repeatable)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of text requests under load (default 30)")
    parser.add_argument("--text-interval", type=float, default=0.5,
                        help="seconds between one text request's answer and the next (default 0.5)")
    parser.add_argument("--image-side", type=int, default=IMAGE_SIDE, help=f"pixels per side (default {IMAGE_SIDE})")
    parser.add_argument("--label", default="", help="what this run measures (kept in the JSON)")
    parser.add_argument("--output", type=Path, help="write the report as JSON here")
    args = parser.parse_args()

    env = dict(item.split("=", 1) for item in args.server_env)
    server = TritonServer(args.repository, ready_timeout_s=300, env=env).start() if args.repository else None
    try:
        url = server.url if server else args.url
        pid = server.process.pid if server else args.server_pid
        report = run(url, pid, args.duration, args.image_side, args.text_interval)
    finally:
        if server is not None:
            server.stop()
    print("\n".join(lines(report)))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({
            "label": args.label, "command": " ".join(sys.argv), "revision": git_revision(),
            "server_env": env, "host": host_info(), "report": report,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
