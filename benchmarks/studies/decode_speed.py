#!/usr/bin/env python
"""Decode speed of the ONNX decoder (fp32, int4, int8) vs transformers generate, and KV-cache memory per request.

In-process, no server: what the `llm` model's decoder can do on this machine.
- single stream: one request, greedy, decode tokens/s (eos ignored, so every run decodes --new-tokens);
  ONNX Runtime per intra-op thread count, and transformers `generate` (fp32) per torch thread count.
- batched: --concurrency requests with different prompt lengths decoded together by
  OnnxDecoder.step_batch (one graph call per step): aggregate tokens/s.
- KV cache: bytes one request holds vs context length, from the spec (untrimmed = every layer keeps
  every key; trimmed = sliding layers keep window - 1) and measured from a real prefill.
- memory bandwidth: single-stream decode reads every weight once per token, so its ceiling is
  (weight bytes read per step) / (the read bandwidth ONNX Runtime reaches on one 1 GiB fp32 GEMV with
  the same threads); each single-stream ONNX row reports the share of that ceiling it reaches.
Decode rates are tokens / (median step time): a shared machine's stalls move the mean, not the median.

    python benchmarks/studies/decode_speed.py --output decode_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medgemma_triton.runtime.decoder import OnnxDecoder, kv_cache_bytes
from medgemma_triton.runtime.host_check import describe_cpu
from medgemma_triton.spec import ModelSpec

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "test-artifacts"
PARAGRAPH = (
    "The chest radiograph shows clear lungs without focal consolidation, effusion or pneumothorax. "
    "The cardiomediastinal silhouette is within normal limits and the osseous structures are intact. "
)


@dataclass
class DecodeRun:
    engine: str  # "onnx-fp32", "onnx-int4", "onnx-int8", "transformers-fp32"
    threads: int
    concurrency: int
    prompt_tokens: list[int]
    new_tokens: int  # per request
    prefill_s: float  # all requests' prefill, one call each (batched: one call)
    step_ms_median: float
    step_ms_p90: float
    tokens_per_s: float  # aggregate: concurrency / median step time
    tokens_per_s_wall: float  # aggregate: decoded tokens / total decode wall time
    weight_bytes_per_step: int | None = None  # weights one decode step reads (ONNX engines)
    bandwidth_share: float | None = None  # weight bytes per step / step time / measured read bandwidth


@dataclass
class KvRow:
    model: str
    context: int
    untrimmed_bytes: int
    trimmed_bytes: int
    measured_bytes: int | None


def _prompt(tokenizer, tokens: int) -> np.ndarray:
    """Chat-formatted text prompt of exactly `tokens` tokens (a medical paragraph, cut to length)."""
    text = PARAGRAPH
    while len(tokenizer(text)["input_ids"]) < tokens * 2:
        text += PARAGRAPH
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    return np.concatenate([ids[: tokens - 5], ids[-5:]])  # keep the turn end and "<start_of_turn>model\n"


def _summary(engine, threads, prompts, new_tokens, prefill_s, step_s: list[float]) -> DecodeRun:
    concurrency = len(prompts)
    median = statistics.median(step_s)
    return DecodeRun(
        engine=engine,
        threads=threads,
        concurrency=concurrency,
        prompt_tokens=[int(p.size) for p in prompts],
        new_tokens=new_tokens,
        prefill_s=round(prefill_s, 3),
        step_ms_median=round(1e3 * median, 2),
        step_ms_p90=round(1e3 * float(np.percentile(step_s, 90)), 2),
        tokens_per_s=round(concurrency / median, 2),
        tokens_per_s_wall=round(concurrency * len(step_s) / sum(step_s), 2),
    )


def onnx_decode(decoder: OnnxDecoder, engine: str, threads: int, prompts, new_tokens: int) -> DecodeRun:
    """Prefill each prompt, then decode them together with step_batch (step() for a single request)."""
    states = [decoder.new_sequence(p) for p in prompts]
    started = time.perf_counter()
    logits = np.stack([decoder.prefill(s) for s in states])
    prefill_s = time.perf_counter() - started
    step_s = []
    for _ in range(new_tokens - 1):  # the first token comes from the prefill
        tokens = logits.argmax(axis=-1)
        started = time.perf_counter()
        if len(states) == 1:
            logits = decoder.step(states[0], int(tokens[0]))[None]
        else:
            logits = decoder.step_batch(states, tokens)
        step_s.append(time.perf_counter() - started)
    for state in states:
        decoder.release(state)  # LlamaDecoder: the sequence's KV cells
    return _summary(engine, threads, prompts, new_tokens, prefill_s, step_s)


def transformers_decode(model, threads: int, prompt: np.ndarray, new_tokens: int) -> DecodeRun:
    """transformers generate (greedy, fp32); per-step times from a streamer's callbacks."""
    import torch

    torch.set_num_threads(threads)
    stamps: list[float] = []

    class Stamps:  # generate calls put() once with the prompt, then once per new token
        def put(self, value):
            stamps.append(time.perf_counter())

        def end(self):
            pass

    input_ids = torch.from_numpy(prompt[None])
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            streamer=Stamps(),
        )
    # stamps[0]: prompt; stamps[1]: first token (after prefill); then one per decode step
    prefill_s = stamps[1] - started
    step_s = list(np.diff(stamps[1:]))
    return _summary("transformers-fp32", threads, [prompt], new_tokens, prefill_s, step_s)


def weight_bytes_per_step(model_path: Path) -> int:
    """Bytes of the initializers a decode step reads: all but embedding tables, which a Gather only
    indexes (the tied fp32 table counts once, as the LM head reads it whole)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    read = {name for n in model.graph.node if n.op_type not in ("Gather", "GatherBlockQuantized") for name in n.input}
    total = 0
    for tensor in model.graph.initializer:
        if tensor.name in gathered and tensor.name not in read:
            continue
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return total


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes/s ONNX Runtime reads on a [1, K] x [K, N] fp32 MatMul over `gib` GiB of weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 4096
    n = int(gib * 2**30) // (4 * k)
    weights = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])], "gemv",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del model, graph
    a = np.ones((1, k), dtype=np.float32)
    session.run(None, {"a": a})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {"a": a})
        times.append(time.perf_counter() - started)
    return weights.nbytes / statistics.median(times)


def kv_table(decoder: OnnxDecoder, name: str, contexts: list[int], measure_up_to: int) -> list[KvRow]:
    rows = []
    for context in contexts:
        measured = None
        if context <= measure_up_to:
            state = decoder.new_sequence(np.full(context, decoder.spec.tokens.bos, dtype=np.int64))
            decoder.prefill(state)
            measured = state.kv_bytes
        rows.append(
            KvRow(name, context, kv_cache_bytes(decoder.text, context, trimmed=False),
                  kv_cache_bytes(decoder.text, context), measured)
        )
    return rows


def kv_table_from_config(config_json: Path, contexts: list[int]) -> list[KvRow]:
    """Spec-only rows for another geometry (e.g. google/medgemma-4b-it's config.json)."""
    from medgemma_triton.spec import _text_spec  # the spec's own config parser, minus the tokenizer files

    config_json = Path(config_json)
    config = json.loads(config_json.read_text())
    text = _text_spec(config.get("text_config", config))
    return [
        KvRow(config_json.name, c, kv_cache_bytes(text, c, trimmed=False), kv_cache_bytes(text, c), None)
        for c in contexts
    ]


def _print_decode(runs: list[DecodeRun], baseline: DecodeRun | None) -> None:
    print(f"\n{'engine':<20}{'thr':>4}{'conc':>5}{'prompt':>14}{'step ms (p50/p90)':>20}{'tok/s':>9}"
          f"{'tok/s wall':>11}{'vs HF':>7}{'weights/step':>14}{'of bandwidth':>13}")
    for run in runs:
        ratio = f"{run.tokens_per_s / baseline.tokens_per_s:.2f}x" if baseline else "-"
        lengths = sorted(set(run.prompt_tokens))
        prompt = f"{lengths[0]}-{lengths[-1]}" if len(lengths) > 1 else str(lengths[0])
        print(f"{run.engine:<20}{run.threads:>4}{run.concurrency:>5}{prompt:>14}"
              f"{run.step_ms_median:>11.1f} /{run.step_ms_p90:>7.1f}{run.tokens_per_s:>9.1f}"
              f"{run.tokens_per_s_wall:>11.1f}{ratio:>7}"
              f"{_size(run.weight_bytes_per_step) if run.weight_bytes_per_step else '-':>14}"
              f"{f'{run.bandwidth_share:.0%}' if run.bandwidth_share else '-':>13}")


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _print_kv(rows: list[KvRow]) -> None:
    print(f"\n{'KV cache per request (fp32)':<40}{'context':>8}{'untrimmed':>12}{'trimmed':>12}"
          f"{'measured':>12}{'saving':>8}")
    for row in rows:
        measured = _size(row.measured_bytes) if row.measured_bytes is not None else "-"
        print(f"{row.model[-40:]:<40}{row.context:>8}{_size(row.untrimmed_bytes):>12}{_size(row.trimmed_bytes):>12}"
              f"{measured:>12}{row.untrimmed_bytes / row.trimmed_bytes:>7.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=CACHE / "checkpoints" / "dev")
    parser.add_argument("--fp32-decoder", type=Path, default=CACHE / "onnx" / "dev-fp32" / "decoder.onnx",
                        help="required: the reference row and the KV-cache table")
    parser.add_argument("--int4-decoder", type=Path, default=CACHE / "onnx" / "dev-int4" / "decoder.onnx",
                        help="skipped when the file does not exist")
    parser.add_argument("--int8-decoder", type=Path, default=CACHE / "onnx" / "dev-int8" / "decoder.onnx",
                        help="skipped when the file does not exist")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="ORT intra-op / torch threads")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--kv-contexts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 32768])
    parser.add_argument("--kv-measure-up-to", type=int, default=2048,
                        help="measure KV bytes with a real prefill up to this context (it costs a prefill)")
    parser.add_argument("--kv-config", type=Path, nargs="*", default=[],
                        help="config.json files of other geometries (e.g. the 4B) for spec-only KV rows")
    parser.add_argument("--bandwidth-gib", type=float, default=1.0,
                        help="weights the bandwidth probe reads; keep it well above the CPU's last-level cache")
    parser.add_argument("--output", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)
    if not args.fp32_decoder.is_file():  # the reference row and the measured KV table come from it
        parser.error(f"no fp32 decoder at {args.fp32_decoder}: pass --fp32-decoder (an fp32 export's decoder.onnx)")

    from transformers import AutoTokenizer

    spec = ModelSpec.from_checkpoint(args.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    # different lengths, so step_batch pads and masks as it does for real traffic
    prompts = [_prompt(tokenizer, args.prompt_tokens + 7 * i) for i in range(max(args.concurrency))]
    decoders = {"onnx-fp32": args.fp32_decoder}
    for precision, path in (("int4", args.int4_decoder), ("int8", args.int8_decoder)):
        if path.is_file():
            decoders[f"onnx-{precision}"] = path
        else:
            print(f"no {precision} decoder at {path}: skipping {precision}")

    bandwidth = {t: read_bandwidth(t, args.bandwidth_gib) for t in args.threads}
    for threads, value in bandwidth.items():
        print(f"read bandwidth, ORT fp32 GEMV over {args.bandwidth_gib:g} GiB, {threads} thread(s): "
              f"{value / 1e9:.1f} GB/s", flush=True)
    runs: list[DecodeRun] = []
    kv_rows: list[KvRow] = []
    for engine, path in decoders.items():
        weight_bytes = weight_bytes_per_step(path)
        for threads in args.threads:
            decoder = OnnxDecoder(path, spec, intra_op_threads=threads)
            onnx_decode(decoder, engine, threads, prompts[:1], 4)  # warm-up: allocations, first-run costs
            for concurrency in sorted(args.concurrency):
                if concurrency > 1 and threads != args.threads[0]:
                    continue  # batching is measured at one thread count
                run = onnx_decode(decoder, engine, threads, prompts[:concurrency], args.new_tokens)
                run.weight_bytes_per_step = weight_bytes
                if concurrency == 1:
                    run.bandwidth_share = round(weight_bytes / (run.step_ms_median / 1e3) / bandwidth[threads], 3)
                runs.append(run)
                print(f"{engine} threads={threads} concurrency={concurrency}: {runs[-1].tokens_per_s} tok/s",
                      flush=True)
            if engine == "onnx-fp32" and threads == args.threads[0]:
                kv_rows = kv_table(decoder, args.checkpoint.name, args.kv_contexts, args.kv_measure_up_to)
            del decoder

    baseline = None
    if not args.no_transformers:
        import torch
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
        for threads in args.threads:
            transformers_decode(model, threads, prompts[0], 4)  # warm-up
            runs.append(transformers_decode(model, threads, prompts[0], args.new_tokens))
            print(f"transformers threads={threads}: {runs[-1].tokens_per_s} tok/s", flush=True)
        baseline = max((r for r in runs if r.engine == "transformers-fp32"), key=lambda r: r.tokens_per_s)

    for config_json in args.kv_config:
        kv_rows += kv_table_from_config(config_json, args.kv_contexts)

    _print_decode(runs, baseline)
    for engine in decoders:
        batched = {r.concurrency: r for r in runs if r.engine == engine and r.threads == args.threads[0]}
        if 1 in batched:
            ratios = (f"c={c}: {r.tokens_per_s / batched[1].tokens_per_s:.2f}x" for c, r in sorted(batched.items()))
            print(f"aggregate vs concurrency 1 ({engine}): " + ", ".join(ratios))
    _print_kv(kv_rows)
    if args.output:
        args.output.write_text(json.dumps(
            {"checkpoint": str(args.checkpoint), "cpu": describe_cpu(), "decoders": {k: str(v) for k, v in decoders.items()},
             "read_bandwidth_bytes_per_s": bandwidth,
             "decode": [asdict(r) for r in runs], "kv_cache": [asdict(r) for r in kv_rows]}, indent=2))
        print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
