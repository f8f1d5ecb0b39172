"""`benchmarks/throughput.py` and `benchmarks/latency.py`: argument parsing and the run itself."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
from pathlib import Path

from .client_cpu import ClientCpuMeter
from .capacity import DEFAULT_ATTAINMENT, DEFAULT_HEADROOM, LoadPoint, capacity_plan
from .load import LoadSpec, run_load_point
from .metadata import deployment_profile, run_metadata
from .metrics import Slo, compute_metrics
from .queue import QueueSampler, metrics_url_for
from .report import BenchmarkReport, MeasuredPoint, comparison_rows, console_report, write_all
from .stages import stage_breakdown
from .target import TritonTarget
from .workload import IMAGE_LAYOUTS, LengthDistribution, load_jsonl, synthetic_requests


def _numbers(text: str, kind=float) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more positive numbers, e.g. 1,2,4")
    return values


def _slo(text: str) -> Slo | None:
    try:
        return Slo.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _image_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size {text!r}: expected S or WxH, e.g. 896 or 1024x768") from None


def add_common_arguments(parser: argparse.ArgumentParser, default_requests: int) -> None:
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address HOST:PORT (default %(default)s)")
    parser.add_argument("--model", default="medgemma", help="the top model's name (default %(default)s)")
    parser.add_argument("--num-requests", type=int, default=default_requests, help="measured requests per load point (default %(default)s)")
    parser.add_argument("--max-duration", type=float, default=300.0, help="seconds per load point, after which no new request starts (default %(default)s)")
    parser.add_argument("--warmup-requests", type=int, default=2, help="unmeasured requests before each point (default %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request counts as failed (default %(default)s)")
    parser.add_argument("--endpoint", choices=("grpc", "openai"), default="grpc",
                        help="send the requests over Triton's gRPC (default) or through the OpenAI-compatible gateway "
                        "(--openai-url); metadata, statistics and the queue gauge come from --url either way")
    parser.add_argument("--openai-url", default="http://127.0.0.1:9000/v1",
                        help="the gateway's base URL for --endpoint openai (default %(default)s)")
    parser.add_argument("--metrics-url", help="Triton's Prometheus endpoint, read for the llm's queue gauge during each point "
                        "(default: port 8002 on --url's host; 'none' to skip)")
    workload = parser.add_argument_group("workload (synthetic unless --dataset)")
    workload.add_argument("--dataset", type=Path, help="JSONL file of chat-messages requests (see workload.load_jsonl)")
    workload.add_argument("--input-tokens", default="128", help="user text tokens: N, normal:MEAN,STD or uniform:LOW,HIGH (default %(default)s)")
    workload.add_argument("--output-tokens", default="128", help="max_tokens per request, same forms (default %(default)s); "
                          "the model may stop earlier at end of turn, the report counts what it generated")
    workload.add_argument("--images", type=int, default=0,
                          help="images per request (default %(default)s); 85 with --image-layout series is a CT volume")
    workload.add_argument("--image-size", type=_image_size, help="S or WxH pixels of each generated image "
                          "(default: the served vision encoder's input size; 512 is a CT slice's)")
    workload.add_argument("--image-layout", choices=IMAGE_LAYOUTS, default="after-text",
                          help="after-text: the text, then the images (default); series: each image followed by "
                          "'SLICE k', then the text, as MedGemma 1.5's volume recipe and chat --series send them")
    workload.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg")
    workload.add_argument("--tokenizer", help="checkpoint directory or tokenizer.json for exact input lengths "
                          "(default: the served checkpoint when readable from here, else ~1 token per word)")
    workload.add_argument("--system-prompt", help="system message for synthetic requests")
    workload.add_argument("--seed", type=int, default=0)
    baseline = parser.add_argument_group("transformers baseline (model card generate, in this process)")
    baseline.add_argument("--baseline", action="store_true", help="also run the same workload through transformers generate")
    baseline.add_argument("--checkpoint", help="checkpoint for the baseline (default: the served checkpoint's path)")
    baseline.add_argument("--baseline-dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                          help="auto: bfloat16 on CUDA as the model card, float32 on CPU")
    baseline.add_argument("--baseline-requests", type=int, help="baseline requests (default: --num-requests)")
    parser.add_argument("--output-dir", type=Path, help="where files go (default results/<script>-<UTC time>)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (throughput.py)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def throughput_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="throughput.py",
        description="Capacity planning for a served medgemma deployment: a load sweep, metrics as genai-perf "
        "defines them, goodput under SLOs, and the instances a target load needs.",
    )
    add_common_arguments(parser, default_requests=32)
    load = parser.add_argument_group("load (one sweep per run)")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=lambda t: _numbers(t, int), help="closed loop: requests in flight, e.g. 1,2,4,8 (default 1)")
    mode.add_argument("--request-rate", type=_numbers, help="open loop: Poisson arrivals per second, e.g. 0.5,1,2")
    load.add_argument("--max-concurrency", type=int, help="open loop: cap on requests in flight")
    plan = parser.add_argument_group("SLOs and capacity plan")
    plan.add_argument("--slo", type=_slo, help="per-request objectives, e.g. ttft_ms=500,itl_ms=50 (also e2e_ms)")
    plan.add_argument("--slo-attainment", type=float, default=DEFAULT_ATTAINMENT,
                      help="share of requests that must meet every objective at a point (default %(default)s)")
    plan.add_argument("--target-rps", type=float, help="requests per second to plan instances for")
    plan.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                      help="spare share of each instance's measured capacity (default %(default)s)")
    plan.add_argument("--allow-client-limited", action="store_true",
                      help="let points where the load generator was the limit (flagged 'client-limited') into the plan")
    return parser


def latency_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latency.py",
        description="Single-request latency of a served medgemma deployment: TTFT/ITL/E2E percentiles and the "
        "server time per stage from Triton's statistics extension.",
    )
    add_common_arguments(parser, default_requests=20)
    return parser


class _Progress:
    """A tqdm bar per load point (stderr); silent with --quiet or without tqdm."""

    def __init__(self, total: int, label: str, quiet: bool):
        self.bar = None
        if not quiet:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, leave=True)
            except ImportError:
                pass

    def __call__(self, record) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if record.error:
                self.bar.set_postfix_str("errors seen", refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _workload(args, image_size, count: int, served_checkpoint: str | None):
    if args.dataset:
        requests = load_jsonl(args.dataset)
        images = sum(len(r.images) for r in requests) / len(requests)
        return requests, {"description": f"{args.dataset}, {images:g} image(s) per request on average",
                          "dataset": str(args.dataset), "images_per_request": images}
    if args.images < 0:
        raise SystemExit("error: --images must be 0 or more")
    if args.images and image_size is None:
        raise SystemExit("error: --images needs --image-size: the deployment serves no vision encoder config to read it from")
    tokenizer = args.tokenizer or (served_checkpoint if served_checkpoint and Path(served_checkpoint).is_dir() else None)
    input_tokens = LengthDistribution.parse(args.input_tokens, "--input-tokens")
    output_tokens = LengthDistribution.parse(args.output_tokens, "--output-tokens")
    requests = synthetic_requests(
        count, input_tokens, output_tokens, args.images, image_size if args.images else None,
        args.image_format, tokenizer, args.system_prompt, args.seed, args.image_layout,
    )
    images = ""
    if args.images:
        layout = ", as a series (image, SLICE k, ... then the text)" if args.image_layout == "series" else ""
        images = f", {args.images} image(s) per request of {image_size[0]}x{image_size[1]} {args.image_format}{layout}"
    description = f"synthetic: {input_tokens} text tokens in, max_tokens {output_tokens}{images}"
    return requests, {
        "description": description,
        "input_tokens": str(input_tokens),
        "output_tokens": str(output_tokens),
        "images_per_request": args.images,
        "image_size": list(image_size) if args.images else None,
        "image_format": args.image_format,
        "image_layout": args.image_layout if args.images else None,
        "tokenizer": str(tokenizer) if tokenizer else None,
        "seed": args.seed,
        "endpoint": args.endpoint if args.endpoint == "grpc" else f"openai {args.openai_url}",
    }


async def _run_deployment(args, specs: list[LoadSpec], collect_stages: bool):
    import contextlib

    async with contextlib.AsyncExitStack() as stack:
        target = await stack.enter_async_context(TritonTarget(args.url, args.model, args.request_timeout))
        send = target.send
        if args.endpoint == "openai":
            from .openai_target import OpenAITarget

            send = (await stack.enter_async_context(OpenAITarget(args.openai_url, args.request_timeout))).send
        deployment = await target.metadata()
        image_size = args.image_size or await target.image_size()
        served = deployment_profile(deployment)["checkpoint"]
        count = max(s.num_requests for s in specs) + args.warmup_requests
        requests, workload = _workload(args, image_size, count, served)
        decoupled = {name for name, model in deployment["models"].items() if model["decoupled"]}
        points = []
        metrics_url = None if args.metrics_url == "none" else (args.metrics_url or metrics_url_for(args.url))
        for spec in specs:
            snapshot = {}
            sampler = QueueSampler(metrics_url) if metrics_url else None
            client_cpu = ClientCpuMeter()

            async def before_measuring():
                if collect_stages:
                    snapshot["before"] = await target.statistics()
                if sampler is not None:
                    sampler.start()
                client_cpu.start()

            label = f"concurrency {spec.value:g}" if spec.mode == "concurrency" else f"rate {spec.value:g}/s"
            progress = _Progress(spec.num_requests, label, args.quiet)
            try:
                records = await run_load_point(send, requests, spec, progress, before_measuring)
                client = client_cpu.stop()
            finally:
                progress.close()
                queued = await sampler.stop() if sampler is not None else None
            if sampler is not None and queued is None and not args.quiet:
                print(f"  queue gauge not read: {sampler.error}", file=sys.stderr)
            metrics = compute_metrics(records, args.slo)
            stages = None
            if collect_stages:
                stages = stage_breakdown(
                    snapshot["before"], await target.statistics(), len(records), decoupled,
                    metrics.ttft_ms.mean, metrics.itl_ms.mean, metrics.e2e_ms.mean,
                ).to_dict()
            point = LoadPoint(spec.mode, spec.value, metrics, queued, client)
            points.append(MeasuredPoint("deployment", point, records, min(r.start_s for r in records), stages))
    return deployment, requests, workload, points


def _run_baseline(args, requests, served_checkpoint) -> tuple[MeasuredPoint, dict]:
    from .baseline import TransformersBaseline

    checkpoint = args.checkpoint or served_checkpoint
    if not checkpoint or not Path(checkpoint).is_dir():
        raise SystemExit("error: --baseline needs --checkpoint DIR (the served checkpoint's path is not readable here)")
    baseline = TransformersBaseline(checkpoint, dtype=args.baseline_dtype)
    count = args.baseline_requests or args.num_requests
    progress = _Progress(count, "baseline", args.quiet)
    try:
        records = baseline.run(requests, count, warmup=min(1, args.warmup_requests), on_done=progress)
    finally:
        progress.close()
    point = LoadPoint("concurrency", 1, compute_metrics(records, args.slo))
    return MeasuredPoint("baseline", point, records, min(r.start_s for r in records)), baseline.describe()


def _output_dir(args, name: str) -> Path:
    if args.output_dir:
        return args.output_dir
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path("results") / f"{name}-{stamp}"


def _finish(args, argv, name, deployment, workload, slo, points, requests, plans_for=(), plots=True) -> BenchmarkReport:
    metadata = run_metadata(deployment, [f"benchmarks/{name}.py", *argv])
    served = metadata.get("checkpoint")
    report = BenchmarkReport(metadata, workload, slo, points)
    if args.baseline:
        baseline_point, described = _run_baseline(args, requests, served)
        report.points.append(baseline_point)
        report.metadata["baseline"] = described
        report.comparison = comparison_rows(report.deployment(), baseline_point)
    output_dir = _output_dir(args, name)
    via = f" through the gateway at {args.openai_url}" if args.endpoint == "openai" else ""
    basis = (f"run {output_dir} against {args.url}{via}: {served or 'checkpoint not reported'} "
             f"({metadata.get('profile')}, {metadata.get('precision')}), {args.num_requests} requests per point")
    for mode in plans_for:
        mode_points = [p.point for p in report.deployment() if p.point.mode == mode]
        if mode_points:
            report.plans.append(capacity_plan(mode_points, slo, args.slo_attainment, args.target_rps, args.headroom, basis,
                                              allow_client_limited=args.allow_client_limited,
                                              workload=workload.get("description", ""),
                                              images_per_request=workload.get("images_per_request") or 0))
    paths = write_all(report, output_dir, prefix=name, plots=plots and not args.no_plots)
    print(console_report(report))
    print("\nfiles:\n" + "\n".join(f"  {p}" for p in paths))
    return report


def _user_errors(main):
    """A wrong argument, a missing file or an unreachable server: one line, exit status 1."""

    def wrapped(argv=None) -> int:
        from ..client import MedGemmaError

        try:
            return main(argv)
        except (MedGemmaError, ConnectionError, ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return wrapped


@_user_errors
def throughput_main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = throughput_parser().parse_args(argv)
    if args.request_rate:
        specs = [
            LoadSpec("request_rate", rate, args.num_requests, args.max_duration, args.warmup_requests, args.max_concurrency, args.seed)
            for rate in args.request_rate
        ]
    else:
        specs = [
            LoadSpec("concurrency", c, args.num_requests, args.max_duration, args.warmup_requests, seed=args.seed)
            for c in (args.concurrency or [1])
        ]
    if not 0 < args.slo_attainment <= 1:
        raise SystemExit("error: --slo-attainment must be in (0, 1], e.g. 0.99")
    if args.target_rps is not None and args.target_rps <= 0:
        raise SystemExit("error: --target-rps must be positive")
    if not 0 <= args.headroom < 1:
        raise SystemExit("error: --headroom must be in [0, 1), e.g. 0.2 for 20%")
    deployment, requests, workload, points = asyncio.run(_run_deployment(args, specs, collect_stages=True))
    _finish(args, argv, "throughput", deployment, workload, args.slo, points, requests, plans_for=("concurrency", "request_rate"))
    return 0


@_user_errors
def latency_main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = latency_parser().parse_args(argv)
    args.slo = None
    spec = LoadSpec("concurrency", 1, args.num_requests, args.max_duration, args.warmup_requests, seed=args.seed)
    deployment, requests, workload, points = asyncio.run(_run_deployment(args, [spec], collect_stages=True))
    # one load point: a latency-vs-throughput curve would be a single dot, so no plots
    _finish(args, argv, "latency", deployment, workload, None, points, requests, plots=False)
    return 0
