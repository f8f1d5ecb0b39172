"""int4 and int8 vs fp32 decoder quality on the dev checkpoint (real Gemma 3 270M weights), through ONNX Runtime.

Measures, for the fp32 export, each int4 variant and the int8 export:
- greedy generation: 8 plain-text medical prompts (the dev decoder is a base model, not a chat model),
  32 new tokens each; position-wise token agreement with fp32, common-prefix length, identical outputs;
- teacher forcing on MEDICAL_TEXT (medgemma_triton/evaluation.py): perplexity, and top-1 agreement with fp32's next-token
  prediction given the same context (a per-position measure that does not cascade after a divergence);
  the same after one prefill of PREFILL_TOKENS tokens ("pf": only the paragraph's last 24 tokens);
- decode throughput of the batched greedy run (tokens/s, this machine; indicative only).

Teacher forcing feeds the paragraph one token at a time through the KV cache (OnnxDecoder.prefill/step),
exactly the serving path. (A batched alternative - prefill once, then a batch of one-token rows whose
attention_mask hides the later cache columns - would need T <= sliding_window, because the graph puts
the sliding window in cache coordinates; at ~200 tokens the plain loop takes seconds anyway.)

    python benchmarks/int4_quality.py --output int4_quality.json
    python benchmarks/int4_quality.py --variants --output int4_variants.json   # LM-head/embedding choices
    python benchmarks/int4_quality.py --fp32 DIR --int4 DIR --int8 DIR            # existing exports
    python benchmarks/int4_quality.py --fp32 DIR --gguf Q4_K_M=FILE --gguf Q8_0=FILE  # llama.cpp's only
    python benchmarks/int4_quality.py --reference REPORT.json --gguf ...  # fp32 from an earlier report
    qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/int4_quality.py --max-new-tokens 0 --fp32 DIR ...
        # ONNX Runtime's (and ggml's haswell variant's) AVX2 kernels on any x86 host (qemu-user; teacher
        # forcing only: ~30x slower)

The CPU class decides the int8/int4 kernels, and so these numbers: the report names it (read from
/proc/cpuinfo, which under qemu shows the host's flags, not the emulated CPU's).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medgemma_triton.evaluation import MEDICAL_TEXT
from medgemma_triton.export.manifest import checkpoint_sha256
from medgemma_triton.runtime.host_check import describe_cpu

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO_ROOT / ".cache" / "test-artifacts"

PROMPTS = (
    "The most common symptoms of type 2 diabetes are",
    "A chest X-ray of a patient with pneumonia typically shows",
    "The first-line treatment for uncomplicated hypertension in adults is",
    "Myocardial infarction occurs when",
    "The function of the kidneys is to",
    "Patients with asthma should avoid",
    "An MRI scan of the brain is used to",
    "Common side effects of ibuprofen include",
)


INT8 = "int8 (W8A8: per-column weights, dynamic activations)"  # what `export --precision int8` writes
# (name, lm_head, embedding_int4); the first is what `export --precision int4` writes
VARIANTS = (
    ("int4 (head int8 blocks, embedding int4)", "int8-blocks", True),
    ("int4 (head int8 per row, embedding int4)", "int8", True),
    ("int4 (head int4, embedding int4)", "int4", True),
    ("int4 (head fp32, embedding fp32)", "fp32", False),
)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


PREFILL_TOKENS = 160  # the paragraph's rest (24 tokens) is then predicted after one long prefill


def teacher_forced(decoder, token_ids: np.ndarray, prefill_tokens: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(log-prob of each next token, argmax prediction at each position) after the first
    `prefill_tokens` tokens, which are prefilled in one call: [T - prefill_tokens] each."""
    state = decoder.new_sequence(token_ids[:prefill_tokens])
    logits = decoder.prefill(state)
    log_probs, predictions = [], []
    for position in range(prefill_tokens, len(token_ids)):
        target = int(token_ids[position])
        log_probs.append(log_softmax(logits)[target])
        predictions.append(int(logits.argmax()))
        if position < len(token_ids) - 1:
            logits = decoder.step(state, target)
    return np.array(log_probs), np.array(predictions)


def load_decoder(decoder_path: Path, spec, threads: int | None):
    """decoder.onnx in ONNX Runtime, or a GGUF in llama.cpp (the cpu profile's int4/int8 engine)."""
    if Path(decoder_path).suffix == ".gguf":
        from medgemma_triton.runtime.llamacpp import LlamaDecoder

        return LlamaDecoder(decoder_path, spec, threads=threads, max_sequences=len(PROMPTS), context_tokens=4096)
    from medgemma_triton.runtime.decoder import OnnxDecoder

    return OnnxDecoder(decoder_path, spec, intra_op_threads=threads)


def evaluate(decoder_path: Path, spec, tokenizer, max_new_tokens: int, threads: int | None) -> dict:
    decoder = load_decoder(decoder_path, spec, threads)
    prompts = [np.array(tokenizer.encode(p).ids, dtype=np.int64) for p in PROMPTS]
    started = time.perf_counter()
    generated = decoder.generate_greedy(prompts, max_new_tokens=max_new_tokens) if max_new_tokens else []
    generate_s = time.perf_counter() - started
    text_ids = np.array(tokenizer.encode(MEDICAL_TEXT).ids, dtype=np.int64)
    log_probs, predictions = teacher_forced(decoder, text_ids)
    prefilled_log_probs, prefilled_predictions = teacher_forced(decoder, text_ids, PREFILL_TOKENS)
    return {
        "generated": generated,
        "generated_text": [tokenizer.decode(g) for g in generated],
        "generate_s": round(generate_s, 2),
        "generate_tokens_per_s": round(sum(map(len, generated)) / generate_s, 1) if generated else None,
        "text_tokens": int(len(text_ids)),
        "perplexity": float(math.exp(-log_probs.mean())),
        "predictions": predictions.tolist(),
        "prefilled_perplexity": float(math.exp(-prefilled_log_probs.mean())),
        "prefilled_predictions": prefilled_predictions.tolist(),
        "decoder_bytes": sum(p.stat().st_size for p in decoder_path.parent.glob(decoder_path.name + "*")),
        "cpu_kernels": getattr(decoder, "backends", {}).get("variant"),  # llama.cpp: the ggml CPU variant loaded
    }


def compare(reference: dict, candidate: dict, max_new_tokens: int) -> dict:
    positions = matches = identical = 0
    prefixes = []
    for ref, cand in zip(reference["generated"], candidate["generated"]):
        length = max(len(ref), len(cand))
        positions += length
        matches += sum(1 for a, b in zip(ref, cand) if a == b)
        prefix = next((i for i, (a, b) in enumerate(zip(ref, cand)) if a != b), min(len(ref), len(cand)))
        prefixes.append(prefix)
        identical += ref == cand
    def agreement(key: str) -> float:
        return float(np.mean(np.array(reference[key]) == np.array(candidate[key])))

    return {
        "token_agreement": matches / positions if positions else None,
        "mean_common_prefix": float(np.mean(prefixes)) if prefixes else None,
        "identical_outputs": f"{identical}/{len(prefixes)}",
        "teacher_forced_top1_agreement": agreement("predictions"),
        "perplexity_ratio": candidate["perplexity"] / reference["perplexity"],
        # after one prefill call of PREFILL_TOKENS (int8 quantizes all its rows' activations with one scale)
        "prefilled_top1_agreement": agreement("prefilled_predictions"),
        "prefilled_perplexity_ratio": candidate["prefilled_perplexity"] / reference["prefilled_perplexity"],
    }


def ensure_exports(checkpoint: Path, cache: Path) -> tuple[Path, Path, Path]:
    from medgemma_triton.export.onnx_export import export_onnx

    fp32 = export_onnx(checkpoint, cache / "onnx" / "dev-fp32", precision="fp32")
    int4 = export_onnx(checkpoint, cache / "onnx" / "dev-int4", precision="int4", fp32_source=fp32)
    int8 = export_onnx(checkpoint, cache / "onnx" / "dev-int8", precision="int8", fp32_source=fp32)
    return fp32, int4, int8


def run(checkpoint: Path, fp32_dir: Path | None, int4_dir: Path | None, variants: bool, max_new_tokens: int,
        threads: int | None, workdir: Path, int8_dir: Path | None = None, ggufs: dict | None = None,
        reference: dict | None = None) -> dict:
    """ggufs: {name: decoder.gguf} measured too (the llama.cpp engine's Q4_K_M and Q8_0). reference: an
    earlier report's fp32 result, used instead of running the fp32 export here (an emulated CPU runs only
    the quantized kernels it is there to check; the fp32 reference is the same on every CPU class)."""
    from medgemma_triton.runtime.tokenizer import load_tokenizer
    from medgemma_triton.spec import ModelSpec

    spec = ModelSpec.from_checkpoint(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    candidates = {}
    if int4_dir is not None:
        candidates[VARIANTS[0][0]] = int4_dir / "decoder.onnx"
    if int8_dir is not None:
        candidates[INT8] = int8_dir / "decoder.onnx"
    candidates.update(ggufs or {})
    if variants:
        from medgemma_triton.export.int4 import quantize_decoder_int4

        for index, (name, head, embedding) in enumerate(VARIANTS):
            if name in candidates:
                continue
            candidates[name] = quantize_decoder_int4(
                fp32_dir / "decoder.onnx", workdir / f"variant{index}" / "decoder.onnx", spec,
                progress=lambda m: print(m, file=sys.stderr), lm_head=head, embedding_int4=embedding,
            )
    if reference is None:
        print("fp32 ...", file=sys.stderr)
        reference = evaluate(fp32_dir / "decoder.onnx", spec, tokenizer, max_new_tokens, threads)
    elif max_new_tokens and len(reference["generated"]) != len(PROMPTS):
        raise SystemExit("the reference report was run with --max-new-tokens 0: run this with 0 too")
    results = {"fp32": {**reference, "comparison": None}}
    for name, path in candidates.items():
        print(f"{name} ...", file=sys.stderr)
        measured = evaluate(path, spec, tokenizer, max_new_tokens, threads)
        results[name] = {**measured, "comparison": compare(reference, measured, max_new_tokens)}
    return {
        "checkpoint": str(checkpoint),
        "cpu": describe_cpu(),  # int8/int4 numerics depend on the CPU class's kernels
        "prompts": list(PROMPTS),
        "max_new_tokens": max_new_tokens,
        "threads": threads,
        "results": results,
    }


def reference_result(path: Path, checkpoint: Path, checkpoint_hash: str) -> dict:
    """An earlier report's fp32 result, refused unless it measured these prompts on this checkpoint (by its
    sha256, where the report records one)."""
    report = json.loads(path.read_text())
    if report.get("prompts") != list(PROMPTS):
        raise SystemExit(f"{path} measured other prompts than this script's: rerun its fp32 reference")
    recorded = report.get("checkpoint_sha256")
    if recorded is not None and recorded != checkpoint_hash:
        raise SystemExit(f"{path} measured checkpoint {recorded[:12]}, not --checkpoint {checkpoint} "
                         f"({checkpoint_hash[:12]}): give the report of this checkpoint's fp32 run")
    return report["results"]["fp32"]


def print_table(report: dict) -> None:
    def number(value, width: int, digits: int) -> str:
        return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}s}"

    print(f"CPU: {report['cpu']}")
    header = (f"{'decoder':36s} {'MB':>7s} {'ppl':>8s} {'ppl x':>6s} {'agree':>6s} {'prefix':>6s} {'same':>5s} "
              f"{'top1':>6s} {'pf ppl x':>8s} {'pf top1':>7s} {'tok/s':>6s}")
    print(header)
    print("-" * len(header))
    for name, r in report["results"].items():
        c = r["comparison"] or {}
        generated = bool(report["max_new_tokens"])
        print(
            f"{name:36s} {r['decoder_bytes'] / 1e6:7.0f} {r['perplexity']:8.3f} "
            f"{c.get('perplexity_ratio', 1.0):6.3f} {number(c.get('token_agreement', 1.0 if generated else None), 6, 3)} "
            f"{number(c.get('mean_common_prefix', report['max_new_tokens'] or None), 6, 1)} "
            f"{c.get('identical_outputs', '-'):>5s} {c.get('teacher_forced_top1_agreement', 1.0):6.3f} "
            f"{c.get('prefilled_perplexity_ratio', 1.0):8.3f} {c.get('prefilled_top1_agreement', 1.0):7.3f} "
            f"{number(r['generate_tokens_per_s'], 6, 1)}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CACHE / "checkpoints" / "dev"))
    parser.add_argument("--fp32", default=None, help="fp32 export directory (default: export into the test cache)")
    parser.add_argument("--int4", default=None, help="int4 export directory (default: export into the test cache)")
    parser.add_argument("--int8", default=None, help="int8 export directory (default: export into the test cache)")
    parser.add_argument("--gguf", action="append", default=[], metavar="NAME=FILE",
                        help="also measure this GGUF decoder in llama.cpp (e.g. 'Q4_K_M=DIR/decoder.gguf')")
    parser.add_argument("--reference", type=Path, default=None,
                        help="an earlier --output report: its fp32 result is the reference (fp32 is not run)")
    parser.add_argument("--variants", action="store_true", help="also measure other LM-head/embedding choices")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="greedy tokens per prompt; 0 measures teacher forcing only (for slow or emulated CPUs)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--output", default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    # hashed once, here: for --reference's check and the report (the quality gates call run() without it)
    checkpoint_hash = checkpoint_sha256(checkpoint, progress=lambda message: print(message, file=sys.stderr))
    reference = reference_result(args.reference, checkpoint, checkpoint_hash) if args.reference else None
    if (args.fp32 or reference) and (args.int4 or args.int8 or args.gguf):  # existing exports: those named
        fp32_dir = Path(args.fp32) if args.fp32 else None
        int4_dir, int8_dir = (Path(d) if d else None for d in (args.int4, args.int8))
    else:
        fp32_dir, int4_dir, int8_dir = ensure_exports(checkpoint, DEFAULT_CACHE)
    if args.variants and fp32_dir is None:
        parser.error("--variants quantizes the fp32 export: give --fp32 DIR with --reference")
    with tempfile.TemporaryDirectory(prefix="int4-variants-") as workdir:
        ggufs = dict(item.split("=", 1) for item in args.gguf)
        report = run(checkpoint, fp32_dir, int4_dir, args.variants, args.max_new_tokens, args.threads, Path(workdir),
                     int8_dir=int8_dir, ggufs={name: Path(path) for name, path in ggufs.items()}, reference=reference)
    report["checkpoint_sha256"] = checkpoint_hash
    print_table(report)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
