"""The synthetic deployment (`build --profile synthetic`): the contract with no model, at a fixed
rate, served by a real Triton server and driven by the real clients and throughput.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving_fixtures import EnsembleStream, _start

REPO_ROOT = Path(__file__).resolve().parents[1]
RATE, PER_RESPONSE = 200.0, 4  # tokens per second per request, tokens per streamed response


@pytest.fixture(scope="module")
def synthetic_server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("synthetic") / "repo"
    subprocess.run([sys.executable, "-m", "medgemma_triton.cli", "build", "--profile", "synthetic",
                    "--output", str(repository), "--synthetic-tokens-per-second", str(RATE),
                    "--synthetic-tokens-per-response", str(PER_RESPONSE)], check=True, cwd=REPO_ROOT)
    assert sorted(p.name for p in repository.iterdir()) == ["medgemma"]
    server = _start(repository)
    try:
        yield server
    finally:
        server.stop()


def test_streams_deterministic_tokens_at_the_configured_rate(synthetic_server):
    stream = EnsembleStream(synthetic_server.url)
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
    stream = EnsembleStream(synthetic_server.url)
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
