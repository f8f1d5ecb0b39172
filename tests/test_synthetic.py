"""The synthetic deployment (`build --profile synthetic`): the contract with no model, at a fixed
rate, served by a real Triton server and driven by the real clients and throughput.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving_fixtures import MedgemmaStream, _start

pytestmark = pytest.mark.served  # starts tritonserver or the gateway: the full tier only

REPO_ROOT = Path(__file__).resolve().parents[1]
RATE, PER_RESPONSE = 200.0, 4  # tokens per second per request, tokens per streamed response
SECONDS_PER_IMAGE = 0.5  # modelled vision time per image


@pytest.fixture(scope="module")
def synthetic_server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("synthetic") / "repo"
    subprocess.run([sys.executable, "-m", "medgemma_triton.cli", "build", "synthetic",
                    "--output", str(repository), "--tokens-per-second", str(RATE),
                    "--tokens-per-response", str(PER_RESPONSE),
                    "--seconds-per-image", str(SECONDS_PER_IMAGE)], check=True, cwd=REPO_ROOT)
    assert sorted(p.name for p in repository.iterdir()) == ["medgemma"]
    server = _start(repository)
    try:
        yield server
    finally:
        server.stop()


def test_streams_deterministic_tokens_at_the_configured_rate(synthetic_server):
    stream = MedgemmaStream(synthetic_server.url)
    arrivals = []
    try:
        started = time.monotonic()
        outcome = stream.request(text_input="three words here", max_tokens=40, stream=True,
                                 on_response=lambda o: arrivals.append(time.monotonic()))
    finally:
        stream.close()
    assert outcome.error is None and outcome.finish_reason == "length"
    assert outcome.responses == 40 // PER_RESPONSE and outcome.completion_tokens == 40
    assert outcome.ids == [1000 + i % 64 for i in range(40)]
    assert outcome.text == "".join(f" w{i % 64}" for i in range(40)) and outcome.prompt_tokens == 3
    # never faster than the rate: the k-th response leaves no earlier than k * PER_RESPONSE / RATE
    for k, at in enumerate(arrivals, start=1):
        assert at - started >= 0.95 * k * PER_RESPONSE / RATE, (k, at - started)


def test_whole_answers_timeouts_and_bad_input(synthetic_server):
    stream = MedgemmaStream(synthetic_server.url)
    try:
        whole = stream.request(messages=[{"role": "user", "content": "two words"}], max_tokens=10, stream=False)
        assert (whole.responses, whole.completion_tokens, whole.finish_reason) == (1, 10, "length")
        assert whole.text == "".join(f" w{i}" for i in range(10)) and whole.prompt_tokens == 2
        late = stream.request(text_input="x", max_tokens=400, stream=True, timeout_ms=100)
        assert late.finish_reason == "timeout" and 0 < late.completion_tokens < 400
        bad = stream.request(text_input="x", max_tokens=0)
        assert bad.error and "max_tokens must be in [1," in bad.error
    finally:
        stream.close()


def test_throughput_against_it_measures_the_configured_rate(synthetic_server, tmp_path):
    out = tmp_path / "tp"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "throughput.py"), "--url", synthetic_server.url,
         "--concurrency", "1,4", "--num-requests", "8", "--warmup-requests", "1", "--output-tokens", "20",
         "--input-tokens", "8", "--metrics-url", "none", "--output-dir", str(out), "--no-plots", "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    document = json.loads((out / "throughput.json").read_text())
    assert document["metadata"]["profile"] == "synthetic"
    for point in document["points"]:
        metrics = point["metrics"]
        assert metrics["errors"] == 0 and metrics["completed"] == 8
        # each request streams at RATE: output tokens/s at most concurrency * RATE
        assert metrics["output_token_throughput"] <= point["value"] * RATE * 1.05
        assert point["client_cpu"] is not None and not point["client_cpu"]["limited"]


def test_throughput_through_the_openai_gateway_matches_grpc(synthetic_server, tmp_path):
    """`throughput.py --endpoint openai`: the same workload through `medgemma-triton openai` (official
    openai SDK), the same token counts as over gRPC, and never faster than the configured rate."""
    from test_openai_gateway import Gateway

    gateway = Gateway(synthetic_server.url, tmp_path)
    documents = {}
    try:
        for endpoint in ("grpc", "openai"):
            out = tmp_path / endpoint
            result = subprocess.run(
                [sys.executable, str(REPO_ROOT / "benchmarks" / "throughput.py"), "--url", synthetic_server.url,
                 "--endpoint", endpoint, "--openai-url", gateway.base_url, "--concurrency", "2",
                 "--num-requests", "6", "--warmup-requests", "1", "--output-tokens", "16", "--input-tokens", "8",
                 "--metrics-url", "none", "--output-dir", str(out), "--no-plots", "--quiet"],
                capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
            )
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + gateway.log()[-2000:]
            documents[endpoint] = json.loads((out / "throughput.json").read_text())
    finally:
        gateway.stop()
    assert documents["openai"]["workload"]["endpoint"] == f"openai {gateway.base_url}"
    grpc_point, openai_point = (documents[e]["points"][0] for e in ("grpc", "openai"))
    assert openai_point["metrics"]["errors"] == 0 and openai_point["metrics"]["completed"] == 6
    for key in ("total_output_tokens", "total_input_tokens"):
        assert openai_point["metrics"][key] == grpc_point["metrics"][key], key
    assert all(r["ttft_ms"] > 0 and r["output_tokens"] == 16 for r in openai_point["records"])
    assert openai_point["metrics"]["output_token_throughput"] <= 2 * RATE * 1.05


def test_each_image_adds_its_vision_time_before_the_first_token(synthetic_server):
    stream = MedgemmaStream(synthetic_server.url)
    first = {}
    try:
        for images in (0, 1, 3):
            started = time.monotonic()
            outcome = stream.request(text_input="two words", images=[b"not decoded"] * images, max_tokens=4,
                                     stream=True, on_response=lambda o: first.setdefault(images, time.monotonic() - started))
            assert outcome.error is None and outcome.completion_tokens == 4
            assert outcome.prompt_tokens == 2 + images  # the server counted every image sent
        # 3 images need 1.5 s of vision before the first token: a 1 s deadline ends the request with none
        late = stream.request(text_input="x", images=[b"img"] * 3, max_tokens=4, stream=True, timeout_ms=1000)
        assert late.finish_reason == "timeout" and late.completion_tokens == 0
    finally:
        stream.close()
    assert first[0] < 10 * SECONDS_PER_IMAGE  # no image, no vision time
    for images in (1, 3):  # never earlier than the images' time; far from it only when something is wrong
        assert images * SECONDS_PER_IMAGE <= first[images] < 10 * images * SECONDS_PER_IMAGE, first


def _throughput(url: str, out: Path, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "throughput.py"), "--url", url, "--num-requests", "3",
         "--warmup-requests", "1", "--input-tokens", "8", "--output-tokens", "8", "--image-size", "64",
         "--metrics-url", "none", "--output-dir", str(out), "--no-plots", "--quiet", *args],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    document = json.loads((out / "throughput.json").read_text())
    document["stdout"] = result.stdout
    return document


def test_a_volume_workload_carries_its_images_and_their_vision_time(synthetic_server, tmp_path):
    """`throughput.py --images N --image-layout series` over gRPC and through the OpenAI gateway: every
    request reaches the server with N images and N "SLICE k" labels, and its time to first token grows
    by the synthetic vision time of each image; the report and the capacity plan say what was sent."""
    from test_openai_gateway import Gateway

    gateway = Gateway(synthetic_server.url, tmp_path)
    documents = {}
    try:
        for name, images, endpoint in (("one", 1, "grpc"), ("grpc", 4, "grpc"), ("openai", 4, "openai")):
            documents[name] = _throughput(
                synthetic_server.url, tmp_path / name, "--images", str(images), "--image-layout", "series",
                "--concurrency", "3", "--endpoint", endpoint, "--openai-url", gateway.base_url)
    finally:
        gateway.stop()
    ttft_p50 = {}
    for name, document in documents.items():
        images = document["workload"]["images_per_request"]
        assert document["workload"]["image_layout"] == "series" and document["workload"]["image_size"] == [64, 64]
        records = document["points"][0]["records"]
        assert document["points"][0]["metrics"]["errors"] == 0 and len(records) == 3
        for record in records:
            assert record["num_images"] == images
            # the server's count: 8 words of text, each image, and the two words of each "SLICE k"
            assert record["input_tokens"] == 8 + images + 2 * images, record
            assert images * SECONDS_PER_IMAGE * 1000 <= record["ttft_ms"] < 10 * images * SECONDS_PER_IMAGE * 1000
        ttft_p50[name] = document["points"][0]["metrics"]["ttft_ms"]["p50"]
        plan = document["capacity_plans"][0]
        assert plan["images_per_request"] == images and f"{images} image(s) per request of 64x64 jpeg" in plan["workload"]
        assert f"at {images} per request" in document["stdout"] and "as a series" in document["stdout"]
    # in proportion: three more images, three more vision times (transport and client costs cancel out)
    for name in ("grpc", "openai"):
        added_ms = ttft_p50[name] - ttft_p50["one"]
        assert 1.5 * SECONDS_PER_IMAGE * 1000 <= added_ms < 10 * SECONDS_PER_IMAGE * 1000, ttft_p50
