"""A short real benchmark: the scripts as users run them, against Triton serving the `tiny` model,
with the transformers baseline on the same checkpoint. Checks the files they write and that the
numbers hang together (counts, token totals, stage statistics), not how fast anything is."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

MAX_TOKENS = 4
WORKLOAD = ["--input-tokens", "12", "--output-tokens", str(MAX_TOKENS), "--images", "1", "--warmup-requests", "1", "--quiet"]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / name), *args],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def refused_by_script(name: str, *args: str) -> str:
    """The stderr of a script run that must fail."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / name), *args],
                            capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert result.returncode != 0, result.stdout[-3000:]
    return result.stderr


def test_throughput_sweep_with_baseline_writes_json_csv_png(tiny_server, tiny_checkpoint, tmp_path):
    out = tmp_path / "throughput"
    result = run_script(
        "throughput.py", "--url", tiny_server.url, "--concurrency", "1,2", "--num-requests", "4",
        "--slo", "ttft_ms=60000,itl_ms=60000", "--target-rps", "10",
        "--baseline", "--checkpoint", str(tiny_checkpoint), "--baseline-requests", "2",
        "--metrics-url", tiny_server.metrics_url, "--output-dir", str(out), *WORKLOAD,
    )
    assert "Capacity plan" in result.stdout and "concurrency 2" in result.stdout
    assert f"basis: run {out} against {tiny_server.url}" in result.stdout and "scaling signal" in result.stdout

    document = json.loads((out / "throughput.json").read_text())
    deployment = [p for p in document["points"] if p["source"] == "deployment"]
    baseline = [p for p in document["points"] if p["source"] == "baseline"]
    assert [p["value"] for p in deployment] == [1, 2] and len(baseline) == 1
    for point in deployment + baseline:
        metrics = point["metrics"]
        assert metrics["errors"] == 0, [r["error"] for r in point["records"] if r["error"]]
        assert metrics["completed"] == len(point["records"])
        assert metrics["total_output_tokens"] == sum(r["output_tokens"] for r in point["records"])
        for r in point["records"]:
            assert 1 <= r["output_tokens"] <= MAX_TOKENS
            assert 0 < r["ttft_ms"] <= r["e2e_ms"]
            assert r["num_images"] == 1
    # the gRPC client saw each first token arrive, at or before the first text
    assert all(0 < r["first_token_ms"] <= r["ttft_ms"] for point in deployment for r in point["records"])
    # same chat template and image tokens on both paths: the prompt lengths agree request by request
    deployed_lengths = {r["index"]: r["input_tokens"] for r in deployment[0]["records"]}
    for r in baseline[0]["records"]:
        assert r["input_tokens"] == deployed_lengths[r["index"]]
    stages = deployment[0]["stages"]
    assert stages["preprocessing_ms"] > 0 and stages["llm_ms"] > 0 and stages["vision_encoder_ms"] > 0, stages
    assert stages["prefill_ms"] is not None

    plan = document["capacity_plans"][0]
    assert plan["best"] == "concurrency 2" and plan["instances"] >= 1
    # the llm's queue gauge was read during every deployment point (two requests never wait for a slot)
    assert all(p["queued"]["samples"] >= 1 and p["queued"]["mean"] >= 0 for p in deployment)
    assert plan["queued_at_best"] == deployment[1]["queued"]["mean"]
    # the load generator's own CPU is recorded; two requests in flight never make it the limit
    assert all(p["client_cpu"]["loop_cpu_s"] > 0 and not p["client_cpu"]["limited"] for p in deployment)
    assert "client CPU" in result.stdout
    assert len(document["baseline_comparison"]) == 2
    meta = document["metadata"]
    assert meta["deployment"]["server"]["version"] and meta["profile"] == "cpu" and meta["precision"] == "fp32"
    assert meta["git_revision"] and meta["host"]["cpu_count"]

    rows = list(csv.DictReader((out / "throughput_requests.csv").open()))
    assert len(rows) == 4 + 4 + 2
    summary = list(csv.DictReader((out / "throughput_summary.csv").open()))
    assert [row["source"] for row in summary] == ["deployment", "deployment", "baseline"]
    for png in ("latency_vs_throughput.png", "ttft_itl_vs_concurrency.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_latency_reports_percentiles_and_stages(tiny_server, tmp_path):
    out = tmp_path / "latency"
    result = run_script("latency.py", "--url", tiny_server.url, "--num-requests", "3", "--output-dir", str(out), *WORKLOAD)
    assert "Time by stage" in result.stdout
    document = json.loads((out / "latency.json").read_text())
    (point,) = document["points"]
    assert point["metrics"]["completed"] == 3 and point["metrics"]["ttft_ms"]["p50"] > 0
    stages = point["stages"]
    assert stages["requests"] == 3
    models = {m["model"]: m for m in stages["models"]}
    assert models["preprocessing"]["calls"] == 3  # warm-up excluded from the statistics window
    assert models["vision_encoder"]["calls"] == 3
    assert stages["llm_ms"] > 0 and stages["prefill_ms"] is not None and stages["decode_step_ms"] > 0


def test_quantized_matmul_compares_the_exports_kernels(tmp_path):
    """benchmarks/studies/quantized_matmul.py times the int4 and int8 exports' own MatMul nodes; each computes
    the fp32 product within its quantization error (int8 per-column ~1%, int4 blocks ~7-9%)."""
    out = tmp_path / "quantized_matmul.json"
    result = run_script("studies/quantized_matmul.py", "--shape", "64", "96", "--rows", "1", "3", "--block-sizes", "16", "32",
                        "--repeats", "2", "--output", str(out))
    assert "int4 MatMulNBits block 16 (shipped)" in result.stdout
    document = json.loads(out.read_text())
    assert document["shape"] == [64, 96]
    by_row = {}
    for r in document["results"]:
        by_row.setdefault(r["rows"], {})[r["kernel"]] = r
        assert r["ms"] > 0
    assert sorted(by_row) == [1, 3]
    assert document["cpu"] in result.stdout
    for kernels in by_row.values():
        int8 = kernels.pop("int8 DynamicQuantizeMatMul (shipped)")
        assert int8["relative_error"] < 0.02
        # signed storage saturates on x86 without VNNI: timed and reported, its error not bounded here
        assert kernels.pop("int8 DynamicQuantizeMatMul, signed storage")["ms"] > 0
        assert len(kernels) == 2
        for int4 in kernels.values():
            assert int8["relative_error"] < int4["relative_error"] < 0.15


def test_kv_attention_compares_the_exported_attention_with_gqa(dev_checkpoint, tmp_path):
    """benchmarks/studies/kv_attention.py: GroupQueryAttention over a shared past/present buffer computes what
    the exported Concat attention computes, for every layer of both geometries, and writes the new key
    row into the bound buffer (in place: nothing is returned but the attention output)."""
    out = tmp_path / "kv_attention.json"
    run_script("studies/kv_attention.py", "--geometry", str(dev_checkpoint), "4b", "--contexts", "3", "17", "--repeats", "3",
               "--output", str(out))
    results = json.loads(out.read_text())["results"]
    assert [(r["geometry"], r["context"]) for r in results] == [("dev", 3), ("dev", 17), ("4b", 3), ("4b", 17)]
    for r in results:
        assert r["max_abs_diff"] < 1e-5
        assert r["written_in_place"] is True
        assert r["exported_ms"] > 0 and r["gqa_ms"] > 0
    assert (results[0]["layers"], results[0]["kv_heads"]) == (18, 1)  # Gemma 3 270M, from its config.json
    assert (results[2]["layers"], results[2]["kv_heads"]) == (34, 4)


@pytest.mark.slow
def test_decode_speed_measures_onnx_decoding_and_the_kv_cache(tiny_checkpoint, tiny_onnx, tmp_path):
    out = tmp_path / "decode_speed.json"
    run_script(
        "studies/decode_speed.py", "--checkpoint", str(tiny_checkpoint), "--fp32-decoder", str(tiny_onnx / "decoder.onnx"),
        "--int4-decoder", str(tmp_path / "absent.onnx"), "--int8-decoder", str(tmp_path / "absent.onnx"),
        "--threads", "1", "--concurrency", "1", "2", "--new-tokens", "4", "--prompt-tokens", "8",
        "--no-transformers", "--kv-contexts", "64", "128", "--kv-measure-up-to", "64", "--bandwidth-gib", "0.125",
        "--output", str(out),
    )
    document = json.loads(out.read_text())
    runs = document["decode"]
    assert [(r["engine"], r["concurrency"], r["prompt_tokens"]) for r in runs] == [
        ("onnx-fp32", 1, [8]), ("onnx-fp32", 2, [8, 15])]  # different lengths, so the batch is padded
    assert all(r["new_tokens"] == 4 and r["tokens_per_s"] > 0 for r in runs)
    measured, spec_only = document["kv_cache"]
    # a real prefill's cache matches the spec's size with the sliding layers trimmed to their window
    assert measured["context"] == 64 and measured["measured_bytes"] == measured["trimmed_bytes"]
    assert measured["trimmed_bytes"] < measured["untrimmed_bytes"] and spec_only["measured_bytes"] is None

    missing = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "studies" / "decode_speed.py"),
         "--fp32-decoder", str(tmp_path / "absent.onnx")],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )
    assert missing.returncode == 2 and "no fp32 decoder at" in missing.stderr


@pytest.mark.slow
def test_peer_comparison_measures_our_decoders_and_llamacpp_where_installed(tiny_checkpoint, tiny_onnx,
                                                                           tiny_onnx_int4, tmp_path):
    """benchmarks/peer_llamacpp.py at tiny size. llama.cpp is an optional benchmark dependency: where it
    is not built (CI), the script measures our decoders alone and says so; where it is
    (`peer_llamacpp.py build-llamacpp`), it converts the tiny checkpoint with llama.cpp's own tools and
    measures both."""
    spec = importlib.util.spec_from_file_location("peer_llamacpp", REPO_ROOT / "benchmarks" / "peer_llamacpp.py")
    peer = sys.modules["peer_llamacpp"] = importlib.util.module_from_spec(spec)  # its dataclasses need it
    spec.loader.exec_module(peer)
    installed = peer.llamacpp_at(peer.PEER_CACHE).installed
    out = tmp_path / "peer.json"
    result = run_script(
        "peer_llamacpp.py", "compare", "--checkpoint", str(tiny_checkpoint),
        "--decoder", f"int4={tiny_onnx_int4 / 'decoder.onnx'}", "--decoder", f"fp32={tiny_onnx / 'decoder.onnx'}",
        "--prompt-tokens", "12", "--new-tokens", "6", "--streams", "2", "--rounds", "2", "--repetitions", "1",
        "--bandwidth-gib", "0.05", "--profile-steps", "2", "--output", str(out), "--plot", str(tmp_path / "peer.png"),
    )
    document = json.loads(out.read_text())
    engines = [row["engine"] for row in document["rows"]]
    ours = ["ours int4", "ours fp32"]
    assert engines == (["llama.cpp Q4_K_M", *ours] * 2 if installed else ours * 2)  # alternating rounds
    assert [row["round"] for row in document["rows"]] == [1] * (len(engines) // 2) + [2] * (len(engines) // 2)
    if installed:
        assert document["llamacpp"]["skipped"] is None
        (theirs,) = [s for s in document["summary"] if s["engine"] == "llama.cpp Q4_K_M"]
        assert theirs["decode_tokens_per_s"] > 0 and theirs["aggregate_decode_tokens_per_s"] > 0
        assert {s["engine"]: s["decode_vs_llamacpp"] for s in document["summary"]}["llama.cpp Q4_K_M"] == 1.0
    else:
        assert "not installed" in document["llamacpp"]["skipped"]
        assert "skipping llama.cpp: llama.cpp is not installed" in result.stderr
    for row in document["rows"]:
        if row["engine"].startswith("ours"):
            assert row["prompt_tokens"] == 12 and row["new_tokens"] == 6 and row["streams"] == 2
            assert row["decode_tokens_per_s"] > 0 and row["aggregate_decode_tokens_per_s"] > 0
            assert row["weight_bytes_per_step"] > 0 and row["bandwidth_share"] > 0
    sizes = {row["engine"]: row["weight_bytes_per_step"] for row in document["rows"]}
    assert sizes["ours int4"] < sizes["ours fp32"] / 2  # the int4 decoder reads its quantized weights
    assert document["cpu"] and (tmp_path / "peer.png").stat().st_size > 0
    for name in ("int4", "fp32"):  # per-operator kernel time; int4's head is its own 8-bit MatMulNBits row
        profile = document["profiles"][name]
        assert profile["graph_nodes"] > 0 and all(ms >= 0 for ms in profile["ms_per_step"].values())
    assert "MatMulNBits (LM head)" in document["profiles"]["int4"]["ms_per_step"]
    assert "Gemm (LM head)" in document["profiles"]["fp32"]["ms_per_step"]
    assert "decode tok/s c=1" in result.stdout


def test_quality_measures_against_a_reference_report(tiny_checkpoint, tiny_onnx, tiny_onnx_int8, tmp_path):
    """benchmarks/int4_quality.py --reference: an earlier report's fp32 result stands in for running fp32
    (an emulated CPU runs only the quantized kernels it checks). A reference with a doubled perplexity
    halves the candidate's ratio, so the report is what the comparison used; a reference without greedy
    outputs is refused for a run that generates."""
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    common = ["--checkpoint", str(tiny_checkpoint), "--int8", str(tiny_onnx_int8), "--max-new-tokens", "0", "--threads", "1"]
    run_script("int4_quality.py", "--fp32", str(tiny_onnx), *common, "--output", str(first))
    report = json.loads(first.read_text())
    report["results"]["fp32"]["perplexity"] *= 2
    doubled = tmp_path / "doubled.json"
    doubled.write_text(json.dumps(report))
    run_script("int4_quality.py", "--reference", str(doubled), *common, "--output", str(second))
    before, after = (json.loads(p.read_text())["results"] for p in (first, second))
    assert after["fp32"]["perplexity"] == pytest.approx(2 * before["fp32"]["perplexity"])
    (name,) = [n for n in before if n != "fp32"]
    assert after[name]["perplexity"] == pytest.approx(before[name]["perplexity"])
    assert after[name]["comparison"]["perplexity_ratio"] == pytest.approx(before[name]["comparison"]["perplexity_ratio"] / 2)
    assert "--max-new-tokens 0" in refused_by_script("int4_quality.py", "--reference", str(first), *common[:-4],
                                                     "--max-new-tokens", "2")
    report["checkpoint_sha256"] = "0" * 64  # another checkpoint's fp32 run
    other = tmp_path / "other.json"
    other.write_text(json.dumps(report))
    assert "measured checkpoint 000000000000, not --checkpoint" in refused_by_script(
        "int4_quality.py", "--reference", str(other), *common)
