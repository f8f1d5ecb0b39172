#!/usr/bin/env python
"""What the OpenAI gateway adds: the same requests over direct gRPC (AsyncMedGemmaClient) and through
the gateway (the official `openai` SDK, streaming), at each concurrency, in alternating rounds.

    # the dev model, built from the test cache (MEDGEMMA_TEST_CACHE), Triton and a gateway started here:
    python benchmarks/studies/gateway_overhead.py --rounds 2 --requests 16 --output docs/results/gateway-overhead.json
    # or a running deployment:
    python benchmarks/studies/gateway_overhead.py --url 127.0.0.1:8001 --gateway-url http://127.0.0.1:9000/v1 --output o.json

Per request: time to first text (TTFT) and end to end (E2E), measured by the caller; per round and
path: completion tokens per second of wall time. Rounds alternate which path goes first, so drift on a
shared host hits both alike. Greedy decoding: both paths must generate the same token counts, which
the script checks. The caller, Triton and the gateway share this host's CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "Describe this chest X-ray in detail, region by region."


def _image(seed: int = 0, size: int = 256) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _record(index: int, started: float, first: float | None, ended: float, prompt: int, completion: int,
            error: str | None = None) -> dict:
    return {
        "index": index,
        "ttft_ms": None if first is None else round((first - started) * 1000, 3),
        "e2e_ms": round((ended - started) * 1000, 3),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "error": error,
    }


class GrpcPath:
    name = "grpc"

    def __init__(self, url: str, image: bytes | None, max_tokens: int):
        from medgemma_triton.client import AsyncMedGemmaClient

        self.client = AsyncMedGemmaClient(url)
        content = [{"type": "text", "text": PROMPT}] + ([{"type": "image", "image": image}] if image else [])
        self.messages = [{"role": "user", "content": content}]
        self.max_tokens = max_tokens

    async def one(self, index: int) -> dict:
        started, first = time.perf_counter(), None
        try:
            async with self.client.stream_chat(self.messages, max_tokens=self.max_tokens) as stream:
                async for _ in stream:
                    if first is None:
                        first = time.perf_counter()
            result = stream.result
            return _record(index, started, first, time.perf_counter(), result.prompt_tokens, result.completion_tokens)
        except Exception as exc:  # noqa: BLE001 - recorded, and the run fails at the end
            return _record(index, started, first, time.perf_counter(), 0, 0, repr(exc))

    async def close(self) -> None:
        await self.client.close()


class GatewayPath:
    name = "gateway"

    def __init__(self, base_url: str, api_key: str | None, image: bytes | None, max_tokens: int, model: str | None):
        import openai

        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=600)
        content = [{"type": "text", "text": PROMPT}]
        if image:
            uri = "data:image/png;base64," + base64.b64encode(image).decode("ascii")
            content.append({"type": "image_url", "image_url": {"url": uri}})
        self.messages = [{"role": "user", "content": content}]
        self.max_tokens = max_tokens
        self.model = model

    async def one(self, index: int) -> dict:
        if self.model is None:
            self.model = (await self.client.models.list()).data[0].id
        started, first, usage = time.perf_counter(), None, None
        try:
            stream = await self.client.chat.completions.create(
                model=self.model, messages=self.messages, max_tokens=self.max_tokens, stream=True,
                stream_options={"include_usage": True},
            )
            async with stream:
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter()
                    if chunk.usage is not None:
                        usage = chunk.usage
            return _record(index, started, first, time.perf_counter(), usage.prompt_tokens, usage.completion_tokens)
        except Exception as exc:  # noqa: BLE001
            return _record(index, started, first, time.perf_counter(), 0, 0, repr(exc))

    async def close(self) -> None:
        await self.client.close()


async def _round(path, requests: int, concurrency: int) -> tuple[list[dict], float]:
    """`requests` requests, `concurrency` at a time; (records, wall seconds)."""
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    records: list[dict] = []

    async def worker():
        while not queue.empty():
            records.append(await path.one(queue.get_nowait()))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(records, key=lambda r: r["index"]), time.perf_counter() - started


def _summary(records: list[dict], wall_s: float) -> dict:
    ok = [r for r in records if r["error"] is None]
    tokens = sum(r["completion_tokens"] for r in ok)
    ttft = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
    return {
        "records": records,
        "wall_s": round(wall_s, 3),
        "errors": len(records) - len(ok),
        "ttft_p50_ms": round(statistics.median(ttft), 2) if ttft else None,
        "e2e_p50_ms": round(statistics.median(r["e2e_ms"] for r in ok), 2) if ok else None,
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall_s, 2) if wall_s else None,
        "requests_per_s": round(len(ok) / wall_s, 3) if wall_s else None,
    }


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time a process has used (Linux /proc), None when unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(args, paths) -> list[dict]:
    for path in paths:  # warm both: first-request costs are not overhead
        await _round(path, args.warmup, 1)
    points = []
    for concurrency in args.concurrency:
        collected = {p.name: ([], 0.0) for p in paths}
        gateway_cpu = 0.0
        for round_index in range(args.rounds):
            order = paths if round_index % 2 == 0 else paths[::-1]
            for path in order:
                cpu_before = cpu_seconds(args.gateway_pid)
                records, wall = await _round(path, args.requests, concurrency)
                if path.name == "gateway" and cpu_before is not None:
                    gateway_cpu += cpu_seconds(args.gateway_pid) - cpu_before
                for r in records:
                    r["round"] = round_index
                previous, total = collected[path.name]
                collected[path.name] = (previous + records, total + wall)
        point = {"concurrency": concurrency, **{name: _summary(*value) for name, value in collected.items()}}
        grpc, gateway = point["grpc"], point["gateway"]
        point["added"] = {
            "ttft_p50_ms": _difference(gateway["ttft_p50_ms"], grpc["ttft_p50_ms"]),
            "e2e_p50_ms": _difference(gateway["e2e_p50_ms"], grpc["e2e_p50_ms"]),
            "throughput_ratio": round(gateway["tokens_per_s"] / grpc["tokens_per_s"], 3)
            if grpc["tokens_per_s"] and gateway["tokens_per_s"] else None,
        }
        # the gateway process's own CPU time per request: what it costs, whatever the host's noise
        gateway["process_cpu_ms_per_request"] = (
            round(gateway_cpu * 1000 / (args.rounds * args.requests), 2) if args.gateway_pid else None)
        points.append(point)
    return points


def _difference(a, b):
    return None if a is None or b is None else round(a - b, 2)


def table(points: list[dict], cpu: str, note: str | None) -> str:
    lines = [f"CPU: {cpu}" + (f"  ({note})" if note else ""),
             "| concurrency | path | TTFT p50 ms | E2E p50 ms | tokens/s | errors | gateway CPU ms/request |",
             "|---|---|---|---|---|---|---|"]
    for point in points:
        for name in ("grpc", "gateway"):
            s = point[name]
            lines.append(f"| {point['concurrency']} | {name} | {s['ttft_p50_ms']} | {s['e2e_p50_ms']} | "
                         f"{s['tokens_per_s']} | {s['errors']} | {s.get('process_cpu_ms_per_request') or ''} |")
        a = point["added"]
        lines.append(f"| {point['concurrency']} | gateway - grpc | {a['ttft_p50_ms']:+} | {a['e2e_p50_ms']:+} | "
                     f"x{a['throughput_ratio']} | | |" if None not in a.values() else
                     f"| {point['concurrency']} | gateway - grpc | n/a | n/a | n/a | | |")
    return "\n".join(lines)


def _start_dev_deployment(stack, workdir: Path):
    """Triton on the dev checkpoint (repository built from the test cache's export) and a gateway."""
    from medgemma_triton.gateway.config import GatewayConfig
    from medgemma_triton.gateway.server import GatewayProcess
    from medgemma_triton.repository import build_repository
    from medgemma_triton.server.launcher import TritonServer, free_port

    cache = Path(os.environ.get("MEDGEMMA_TEST_CACHE", Path(__file__).resolve().parents[2] / ".cache" / "test-artifacts"))
    repository = build_repository(cache / "checkpoints" / "dev", workdir / "repo", onnx_dir=cache / "onnx" / "dev-fp32")
    server = stack.enter_context(TritonServer(repository, ready_timeout_s=300))
    gateway = GatewayProcess(GatewayConfig(port=free_port())).start(server.url)
    stack.callback(gateway.stop)
    return server.url, gateway.url, gateway.process.pid


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="Triton's gRPC address (with --gateway-url); default: start dev here")
    parser.add_argument("--gateway-url", help="the gateway's base URL, e.g. http://127.0.0.1:9000/v1")
    parser.add_argument("--api-key", default=os.environ.get("MEDGEMMA_API_KEY"))
    parser.add_argument("--model", default=None, help="the model id to send (default: the first of /v1/models)")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated (default 1,8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=16, help="per round, path and concurrency")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--images", type=int, choices=(0, 1), default=1, help="a 256x256 PNG per request (default 1)")
    parser.add_argument("--gateway-pid", type=int, default=None,
                        help="the gateway's process id, to report its CPU time (automatic when started here)")
    parser.add_argument("--note", default=None, help="stored with the results, e.g. 'noisy: shared host'")
    parser.add_argument("--output", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if bool(args.url) != bool(args.gateway_url):
        parser.error("--url and --gateway-url go together")

    import contextlib

    from medgemma_triton.bench.metadata import git_revision, host_info

    with contextlib.ExitStack() as stack:
        url, gateway_url = args.url, args.gateway_url
        if url is None:
            url, gateway_url, args.gateway_pid = _start_dev_deployment(
                stack, Path(stack.enter_context(tempfile.TemporaryDirectory())))
        image = _image() if args.images else None

        async def run():
            paths = [GrpcPath(url, image, args.max_tokens),
                     GatewayPath(gateway_url, args.api_key, image, args.max_tokens, args.model)]
            try:
                return await measure(args, paths)
            finally:
                for path in paths:
                    await path.close()

        points = asyncio.run(run())

    host = host_info()
    document = {
        "benchmark": "gateway_overhead",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "revision": git_revision(),
        "note": args.note,
        "host": host,
        "deployment": {"url": url, "gateway_url": gateway_url, "started_here": args.url is None},
        "settings": {k: getattr(args, k) for k in ("concurrency", "rounds", "requests", "warmup", "max_tokens", "images")},
        "points": points,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(document, indent=2) + "\n")
    print(table(points, f"{host['cpu']} ({host['cpu_class']}, {host['cpu_count']} CPUs)", args.note))
    print(f"saved {args.output}")
    problems = [f"concurrency {p['concurrency']}: {p[n]['errors']} {n} errors" for p in points for n in ("grpc", "gateway")
                if p[n]["errors"]]
    for point in points:
        grpc_tokens = [r["completion_tokens"] for r in point["grpc"]["records"]]
        gateway_tokens = [r["completion_tokens"] for r in point["gateway"]["records"]]
        if sorted(grpc_tokens) != sorted(gateway_tokens):
            problems.append(f"concurrency {point['concurrency']}: the paths generated different token counts")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
