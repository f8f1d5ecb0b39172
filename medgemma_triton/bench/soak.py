"""A bounded soak: a served `medgemma` model under full concurrency with a mix of good, bad, cancelled
and image requests, for a given duration.

Every request must end in an expected way - answered (finish reason stop or length), refused as
invalid (the bad ones), cancelled by the client (the cancelled ones) or refused as busy - or it is
counted as lost: a hang past its timeout, an unexpected error, a bad request that was served. The
resident memory of the Triton server and of each model process is sampled throughout, and its slope
(least squares, MiB per minute) reported: a leak shows as a slope that does not settle.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

KINDS = ("text", "image", "bad", "cancel")  # drawn in turn, so every kind runs from the start
EXPECTED = {"text": "answered", "image": "answered", "bad": "invalid", "cancel": "cancelled"}
PROMPTS = (
    "Summarise the findings of a normal chest X-ray.",
    "List three causes of a widened mediastinum.",
    "What does consolidation in the right lower lobe suggest?",
)


@dataclass
class SoakReport:
    duration_s: float
    concurrency: int
    requests: dict[str, int]  # kind -> sent
    outcomes: dict[str, int]  # "kind: outcome" -> count
    busy: int  # refused as busy (retryable), any kind
    lost: int  # ended in no expected way
    lost_examples: list[str]
    images_per_request: int = 1
    rss_mib: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # process -> (s, MiB)
    rss_slope_mib_per_min: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"{sum(self.requests.values())} requests in {self.duration_s:.0f} s at concurrency "
               f"{self.concurrency}, {self.images_per_request} image(s) per image request: {self.lost} lost, "
               f"{self.busy} refused as busy"]
        out += [f"  {key}: {count}" for key, count in sorted(self.outcomes.items())]
        for name, slope in sorted(self.rss_slope_mib_per_min.items()):
            samples = self.rss_mib[name]
            out.append(f"  RSS {name}: {samples[0][1]:.0f} -> {samples[-1][1]:.0f} MiB, slope {slope:+.2f} MiB/min")
        return out


def server_processes(server_pid: int) -> dict[int, str]:
    """pid -> name of the Triton server and each of its Python-backend model processes (Linux /proc)."""
    from medgemma_triton.server.launcher import model_processes

    return {server_pid: "tritonserver", **model_processes(server_pid)}


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    return 60.0 * sum((t - mean_t) * (v - mean_v) for t, v in samples) / var


def _png(seed: int, size: int = 64) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def _one(client, kind: str, rng: random.Random, timeout_s: float, max_new_tokens_limit: int,
               images: int = 1) -> str:
    """Send one request of `kind`; its outcome: answered | invalid | cancelled | busy | an unexpected one."""
    from medgemma_triton.client import InvalidArgumentError, MedGemmaError, ServerBusyError

    prompt = rng.choice(PROMPTS)
    max_tokens = rng.randint(4, 40)
    try:
        if kind == "text":
            result = await client.chat(prompt, max_tokens=max_tokens, timeout=timeout_s)
            return "answered" if result.finish_reason in ("stop", "length") else f"finish {result.finish_reason}"
        if kind == "image":
            pictures = [{"type": "image", "image": _png(rng.randrange(1000))} for _ in range(images)]
            messages = [{"role": "user", "content": [{"type": "text", "text": prompt}, *pictures]}]
            result = await client.chat(messages, max_tokens=max_tokens, timeout=timeout_s)
            return "answered" if result.finish_reason in ("stop", "length") else f"finish {result.finish_reason}"
        if kind == "bad":  # over the server's max_tokens limit: the server must refuse it
            await client.chat(prompt, max_tokens=max_new_tokens_limit + 1, timeout=timeout_s)
            return "bad request served"
        async with client.stream_chat(prompt, max_tokens=200, timeout=timeout_s) as stream:  # cancel
            async for _ in stream:
                break  # leaving the block cancels the request on the server
        return "cancelled"
    except ServerBusyError:
        return "busy"
    except InvalidArgumentError:
        return "invalid" if kind == "bad" else "invalid (a good request)"
    except MedGemmaError as exc:
        return f"{type(exc).__name__}"


async def _soak(url: str, duration_s: float, concurrency: int, timeout_s: float, server_pid: int | None,
                sample_s: float, max_new_tokens_limit: int, seed: int, images: int) -> SoakReport:
    from medgemma_triton.client import AsyncMedGemmaClient

    sent: Counter = Counter()
    outcomes: Counter = Counter()
    lost_examples: list[str] = []
    rss: dict[str, list[tuple[float, float]]] = {}
    started = time.monotonic()
    stop_at = started + duration_s
    turn = iter(range(10**9))

    async def worker(index: int, client) -> None:
        rng = random.Random(seed * 1000 + index)
        while time.monotonic() < stop_at:
            kind = KINDS[next(turn) % len(KINDS)]
            sent[kind] += 1
            outcome = await _one(client, kind, rng, timeout_s, max_new_tokens_limit, images)
            outcomes[f"{kind}: {outcome}"] += 1
            if outcome not in (EXPECTED[kind], "busy") and len(lost_examples) < 10:
                lost_examples.append(f"{kind}: {outcome}")

    async def sampler() -> None:
        while time.monotonic() < stop_at:
            if server_pid is not None:
                now = time.monotonic() - started
                for pid, name in server_processes(server_pid).items():
                    value = rss_mib(pid)
                    if value is not None:
                        rss.setdefault(name, []).append((now, value))
            await asyncio.sleep(sample_s)

    async with AsyncMedGemmaClient(url) as client:
        await client.wait_until_ready(timeout=60)
        await asyncio.gather(sampler(), *(worker(i, client) for i in range(concurrency)))
    busy = sum(count for key, count in outcomes.items() if key.endswith(": busy"))
    expected = sum(outcomes[f"{kind}: {EXPECTED[kind]}"] for kind in KINDS)
    return SoakReport(
        duration_s=time.monotonic() - started,
        concurrency=concurrency,
        requests=dict(sent),
        outcomes=dict(outcomes),
        busy=busy,
        lost=sum(outcomes.values()) - expected - busy,
        lost_examples=lost_examples,
        images_per_request=images,
        rss_mib=rss,
        rss_slope_mib_per_min={name: slope_per_minute(samples) for name, samples in rss.items()},
    )


def run_soak(url: str, duration_s: float, concurrency: int = 16, timeout_s: float = 120.0,
             server_pid: int | None = None, sample_s: float = 2.0, max_new_tokens_limit: int = 8192,
             seed: int = 0, images_per_request: int = 1) -> SoakReport:
    """Soak the server at `url` for `duration_s`; `server_pid` (tritonserver's pid, when it runs on
    this machine) enables the RSS samples; `max_new_tokens_limit` is its MEDGEMMA_MAX_NEW_TOKENS;
    image requests carry `images_per_request` images (more than the vision batch takes medgemma's
    batched pixel path)."""
    return asyncio.run(_soak(url, duration_s, concurrency, timeout_s, server_pid, sample_s,
                             max_new_tokens_limit, seed, images_per_request))
