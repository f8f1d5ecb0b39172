"""What Triton costs: the served `medgemma` model vs the same runtime called in this process.

`InProcessPipeline` runs exactly what the repository's models run - the same Preprocessor, the same
ONNX files (read from the repository's config.pbtxt parameters), the same Engine with the llm's
batching settings, the same detokenization - without Triton, gRPC or the Python-backend stubs.
`compare` sends the same requests both ways, in alternating blocks so drift on a shared host hits
both sides alike and each side is measured warm, checks that the two produce the same tokens, and
reports the served side's extra end-to-end latency as a share of the served latency: what serving
through Triton and the four models costs.
"""

from __future__ import annotations

import io
import queue
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medgemma_triton import contract


@dataclass(frozen=True)
class Timing:
    e2e_ms: float
    ttft_ms: float
    completion_tokens: int
    token_ids: tuple[int, ...]


class _CollectingStream:
    """engine.ResponseStream for one in-process request: chunks arrive on the scheduler thread."""

    def __init__(self):
        self.chunks: queue.SimpleQueue = queue.SimpleQueue()

    def send(self, chunk, final: bool) -> None:
        self.chunks.put((chunk, final, None))

    def fail(self, message: str, invalid_request: bool) -> None:
        self.chunks.put((None, True, message))

    def close(self) -> None:
        self.chunks.put((None, True, "closed"))

    def is_cancelled(self) -> bool:
        return False


def _parameters(config_path: Path) -> dict[str, str]:
    """A model's config parameters, path parameters resolved as the model resolves them."""
    from medgemma_triton.repository.config import read_config
    from medgemma_triton.serving.triton_io import model_path

    config = read_config(config_path)
    args = {"model_repository": str(config_path.parent), "model_version": "1"}
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    for key in ("checkpoint", "onnx_model", "gguf_model"):
        if parameters.get(key):
            parameters[key] = model_path(args, parameters[key])
    return parameters


class InProcessPipeline:
    """preprocessing -> vision encoder -> engine -> detokenization, in this process, as the repository's models."""

    def __init__(self, repository: str | Path):
        from medgemma_triton.runtime.tokenizer import load_tokenizer
        from medgemma_triton.runtime.vision import OnnxVisionEncoder
        from medgemma_triton.serving.engine import llm_engine
        from medgemma_triton.serving.parameters import int_parameter
        from medgemma_triton.serving.preprocess import Preprocessor

        repository = Path(repository)
        llm = _parameters(repository / contract.LLM_MODEL / "config.pbtxt")
        checkpoint = llm["checkpoint"]
        self.preprocessor = Preprocessor(checkpoint)
        self.spec = self.preprocessor.spec
        self.tokenizer = load_tokenizer(checkpoint)
        self.encode_images = None
        if self.spec.multimodal:
            vision = _parameters(repository / contract.VISION_ENCODER_MODEL / "config.pbtxt")
            vision_threads = int_parameter(vision, "intra_op_threads", 0) or None
            self.encode_images = OnnxVisionEncoder(vision["onnx_model"], self.spec, vision_threads).encode
        self.engine = llm_engine(llm, self.spec, llm.get)

    def run(self, inputs: dict[str, np.ndarray]) -> Timing:
        """One request given as the contract's input tensors; streams like the served model."""
        from medgemma_triton.serving.engine import GenerationRequest
        from medgemma_triton.serving.options import generation_options
        from medgemma_triton.serving.text import SequenceText

        started = time.perf_counter()
        prepared = self.preprocessor(inputs.get)
        options = generation_options(inputs.get, self.preprocessor.limits, self.spec)
        embeddings = None
        if prepared.pixel_values is not None and len(prepared.pixel_values):
            embeddings = self.encode_images(prepared.pixel_values)
        stream = _CollectingStream()
        self.engine.submit(GenerationRequest(prepared.input_ids, embeddings, options, stream))
        text = SequenceText(self.tokenizer, options.sampling.stop)
        ttft_ms, ids = None, []
        while True:
            chunk, final, error = stream.chunks.get(timeout=600)
            if error is not None:
                raise RuntimeError(f"in-process request failed: {error}")
            for token in chunk.output_ids:  # the work the served pipeline does per response
                text.add(token)
            text.take_text()
            if ttft_ms is None:
                ttft_ms = (time.perf_counter() - started) * 1e3
            ids.extend(chunk.output_ids)
            if final:
                break
        e2e_ms = (time.perf_counter() - started) * 1e3
        return Timing(e2e_ms, ttft_ms, len(ids), tuple(ids))

    def close(self) -> None:
        self.engine.shutdown()
        self.engine.decoder.close()


def request_inputs(messages_json: str, images: list[bytes], max_tokens: int) -> dict[str, np.ndarray]:
    """The contract's input tensors for a greedy streaming chat request (what the client sends)."""
    return {
        "messages": np.array([messages_json.encode("utf-8")], dtype=np.object_),
        "images": np.array(images, dtype=np.object_) if images else None,
        "max_tokens": np.array([max_tokens], dtype=np.int32),
        "temperature": np.array([0.0], dtype=np.float32),
        "stream": np.array([True]),
    }


def served_run(client, messages: list, max_tokens: int) -> Timing:
    started = time.perf_counter()
    ttft_ms = None
    stream = client.stream_chat(messages, max_tokens=max_tokens, temperature=0.0)
    for _delta in stream:
        if ttft_ms is None:
            ttft_ms = (time.perf_counter() - started) * 1e3
    result = stream.final_result()
    e2e_ms = (time.perf_counter() - started) * 1e3
    return Timing(e2e_ms, ttft_ms if ttft_ms is not None else e2e_ms, result.completion_tokens, tuple(result.token_ids))


def synthetic_image(seed: int, size: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


PROMPTS = (
    "Describe the findings in this chest radiograph.",
    "Is there evidence of a pleural effusion in this image?",
    "List the abnormalities you see and how confident you are.",
    "Write a short radiology report for this study.",
)


@dataclass
class OverheadReport:
    requests: int  # measured pairs (warm: each side had just served the previous request)
    max_tokens: int
    images_per_request: int
    block: int  # requests per side before switching to the other side
    in_process_e2e_ms_median: float
    served_e2e_ms_median: float
    in_process_ttft_ms_median: float
    served_ttft_ms_median: float
    overhead_ms_median: float  # median over pairs of (served - in-process) e2e
    overhead_share: float  # overhead_ms_median / served e2e median
    same_tokens: int  # pairs whose served tokens equal the in-process ones
    # the first request of each block, after the other side held the CPU (not in the medians above)
    after_switch_in_process_e2e_ms_median: float
    after_switch_served_e2e_ms_median: float
    pairs: list

    def to_json(self) -> dict:
        return asdict(self)


def compare(pipeline: InProcessPipeline, client, requests: int, max_tokens: int, images: int,
            image_size: int, block: int = 4, progress=print) -> OverheadReport:
    """The same requests both ways, in blocks: `block` + 1 requests on one side, then on the other.

    Measured pairs are warm on both sides: the first request of a block follows the other side's
    block, and on a host whose memory goes cold within a second of not being touched (docs/performance.md)
    it pays for that rather than for Triton. It is reported apart. Blocks alternate which side goes first.
    """
    from medgemma_triton.client.request import prepare_messages

    def messages(seed: int):
        image_bytes = [synthetic_image(1000 * seed + i, image_size) for i in range(images)]
        return [{"role": "user", "content": [
            {"type": "text", "text": PROMPTS[seed % len(PROMPTS)]},
            *({"type": "image", "image": data} for data in image_bytes),
        ]}]

    def run(side: str, client_messages) -> Timing:
        if side == "served":
            return served_run(client, client_messages, max_tokens)
        messages_json, image_bytes = prepare_messages(client_messages)  # exactly what the client sends
        return pipeline.run(request_inputs(messages_json, image_bytes, max_tokens))

    pairs, after_switch = [], {"in_process": [], "served": []}
    blocks = -(-requests // block)
    for block_index in range(blocks):
        first = block_index * block
        seeds = list(range(first, min(first + block, requests)))
        sides = ["in_process", "served"] if block_index % 2 == 0 else ["served", "in_process"]
        timings = {}
        for side in sides:
            after_switch[side].append(run(side, messages(10_000 + block_index)).e2e_ms)
            timings[side] = [run(side, messages(seed)) for seed in seeds]
        for seed, inproc, served in zip(seeds, timings["in_process"], timings["served"]):
            same = inproc.token_ids == served.token_ids
            pairs.append({
                "in_process_e2e_ms": inproc.e2e_ms, "served_e2e_ms": served.e2e_ms,
                "in_process_ttft_ms": inproc.ttft_ms, "served_ttft_ms": served.ttft_ms,
                "completion_tokens": served.completion_tokens, "same_tokens": same,
            })
            progress(f"request {seed + 1}/{requests}: in-process {inproc.e2e_ms:.0f} ms, served {served.e2e_ms:.0f} ms, "
                     f"{served.completion_tokens} tokens, same tokens: {same}")

    def median(key):
        return statistics.median(p[key] for p in pairs)

    overhead = statistics.median(p["served_e2e_ms"] - p["in_process_e2e_ms"] for p in pairs)
    return OverheadReport(
        requests=requests, max_tokens=max_tokens, images_per_request=images, block=block,
        in_process_e2e_ms_median=median("in_process_e2e_ms"), served_e2e_ms_median=median("served_e2e_ms"),
        in_process_ttft_ms_median=median("in_process_ttft_ms"), served_ttft_ms_median=median("served_ttft_ms"),
        overhead_ms_median=overhead, overhead_share=overhead / median("served_e2e_ms"),
        same_tokens=sum(p["same_tokens"] for p in pairs),
        after_switch_in_process_e2e_ms_median=statistics.median(after_switch["in_process"]),
        after_switch_served_e2e_ms_median=statistics.median(after_switch["served"]),
        pairs=pairs,
    )


def console(report: OverheadReport) -> str:
    return "\n".join([
        f"{report.requests} requests, {report.images_per_request} image(s), max_tokens {report.max_tokens}, concurrency 1",
        f"{'':12} {'E2E p50':>10} {'TTFT p50':>10}",
        f"{'in-process':12} {report.in_process_e2e_ms_median:8.0f} ms {report.in_process_ttft_ms_median:8.0f} ms",
        f"{'served':12} {report.served_e2e_ms_median:8.0f} ms {report.served_ttft_ms_median:8.0f} ms",
        f"Triton overhead: {report.overhead_ms_median:.0f} ms per request = {100 * report.overhead_share:.1f}% "
        f"of served end-to-end latency; same tokens in {report.same_tokens}/{report.requests} requests",
        f"first request after the other side ran (not above): in-process "
        f"{report.after_switch_in_process_e2e_ms_median:.0f} ms, served {report.after_switch_served_e2e_ms_median:.0f} ms",
    ])


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="overhead.py",
        description="Served medgemma vs the same runtime in-process, concurrency 1: Triton's share of latency.",
    )
    parser.add_argument("repository", type=Path, help="a model repository built by `medgemma-triton build`")
    parser.add_argument("--url", help="a server already serving this repository (default: start one here)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--block", type=int, default=4, help="requests per side before switching sides")
    parser.add_argument("--output", type=Path, help="write the report as JSON")
    args = parser.parse_args(argv)

    from medgemma_triton.client import MedGemmaClient
    from medgemma_triton.server.launcher import TritonServer

    server = None
    url = args.url
    if url is None:
        server = TritonServer(args.repository).start()
        url = server.url
    try:
        pipeline = InProcessPipeline(args.repository)
        image_size = pipeline.spec.vision.image_size if pipeline.spec.multimodal else 0
        with MedGemmaClient(url) as client:
            client.wait_until_ready(timeout=300)
            report = compare(pipeline, client, args.requests, args.max_tokens,
                             args.images if pipeline.spec.multimodal else 0, image_size, block=args.block)
        pipeline.close()
    finally:
        if server is not None:
            server.stop()
    print(console(report))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report.to_json(), indent=2))
    return 0
