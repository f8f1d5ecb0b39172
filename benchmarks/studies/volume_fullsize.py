"""One CT volume at the MedGemma 4B geometry: seconds per image in the vision encoder and per prefill chunk
in the decoder, measured in ONNX Runtime with random weights, and the volume's time to first token
estimated from them.

A volume request (MedGemma 1.5's CT recipe: 85 slices, ~22,000 prompt tokens at 4B) spends its time
before the first token in two places: the vision encoder, once per image, and the `llm`'s prefill, in
chunks of `prefill_chunk_tokens` (512 in built repositories) whose time grows with the tokens before
them (global layers attend to all of them, sliding layers to at most their window). This script:

1. builds and exports the 4B vision tower + projector (SigLIP-so400m at 896 px, the code path of
   benchmarks/studies/vision_fullsize.py) and times `--vision-repeats` images through the graph
   the cpu profile serves (vision_encoder.ort.onnx);
2. builds and exports a decoder of the 4B text geometry cut to `--layers` layers (the code path of
   benchmarks/studies/decoder_fullsize.py; the 4B's 34 layers in fp32 need ~16 GB for the session
   alone, more than a shared 24 GiB machine spares); 6 is one period of the 5 sliding : 1 global
   pattern; `--int8` also quantizes it as `build --precision int8` does;
3. builds the volume prompt as the server does (PromptBuilder: chat template, each image then
   "SLICE k", then the question), cuts it where the `llm` does (OnnxDecoder.chunk_ends), and times the
   first, a middle and the last full chunk, each at its real position: the KV cache before it is
   zeros of the shapes the `llm` holds there (a chunk's time depends on those shapes, not the values);
4. writes every time both as wall-clock seconds and as this process's CPU seconds: with one ONNX
   Runtime thread (`--threads 1`, the default; on a 2-vCPU VM a second thread adds little), CPU
   seconds are what the work costs when other processes share the machine and wall seconds are not.

The estimate (written with its inputs):

    prefill(4B) = sum over the prompt's chunks of tokens x seconds-per-token(position) x 34 / layers
                  (seconds per token interpolated linearly in position between the timed chunks)
    time to first token(4B) = slices x seconds-per-image + prefill(4B)

Scaling by 34 / layers weights the global layers as 1 in 6 where the 4B has 5 in 34 and scales the
embedding lookup and LM head too: both overstate slightly. Decoding (per output token) comes on top
and is not measured here.

    python benchmarks/studies/volume_fullsize.py --layers 6 --int8 --output volume-fullsize.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decoder_fullsize  # noqa: E402  (this folder's scripts are not a package)

CT_SLICES = 85  # MedGemma 1.5's CT recipe
QUESTION = "Any findings in this CT volume?"
DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / ".cache" / "test-artifacts" / "checkpoints" / "tiny"


def timed(function, *args):
    """(result, wall seconds, this process's CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def vision_per_image(workdir: Path, repeats: int, threads: int, log) -> dict:
    """Build, export and time the 4B vision encoder (vision_fullsize.py's model and export path)."""
    import torch

    import vision_fullsize
    from medgemma_triton.export.onnx_export import _quiet_exporter
    from medgemma_triton.export.vision import build_vision_encoder, export_vision_module
    from medgemma_triton.export.vision_fusion import VISION_ORT_ONNX
    from medgemma_triton.runtime.vision import OnnxVisionEncoder

    torch.manual_seed(0)
    config = vision_fullsize.medgemma_4b_vision_config(vision_fullsize.medgemma_4b_config()["vision_config"]["num_hidden_layers"])
    spec = vision_fullsize.spec_for(config)
    module = build_vision_encoder(config)
    with torch.no_grad():  # transformers zero-initialises these: every embedding would be 0
        module.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
        module.multi_modal_projector.mm_soft_emb_norm.weight.normal_(0.0, 0.2)
    with _quiet_exporter():
        export_vision_module(module, spec, workdir, progress=log)
    del module
    encoder = OnnxVisionEncoder(workdir / VISION_ORT_ONNX, spec, intra_op_threads=threads)
    size = spec.vision.image_size
    pixel_values = np.random.default_rng(0).uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
    walls, cpus = [], []
    for _ in range(repeats):
        embeddings, wall, cpu = timed(encoder.encode, pixel_values)
        walls.append(wall)
        cpus.append(cpu)
        log(f"vision: one {size} px image in {wall:.1f} s wall, {cpu:.1f} s CPU")
    return {"image_size": size, "layers": config.vision_config.num_hidden_layers,
            "output_shape": list(embeddings.shape), "graph": VISION_ORT_ONNX,
            "wall_s": [round(s, 2) for s in walls], "cpu_s": [round(s, 2) for s in cpus],
            "seconds_per_image_cpu": round(min(cpus), 2), "seconds_per_image_wall": round(min(walls), 2)}


def int8_child(fp32_path: Path, out_path: Path, spec, log_origin: float) -> tuple[Path, float]:
    """quantize_decoder_int8 with the package's settings; returns the .onnx path and this process's peak RSS."""
    decoder_fullsize._import_from_checkout()
    from medgemma_triton.export.int8 import quantize_decoder_int8

    return quantize_decoder_int8(fp32_path, out_path, spec, decoder_fullsize.Log(log_origin)), decoder_fullsize.peak_rss_gib()


def volume_prompt(spec, checkpoint: Path, slices: int) -> np.ndarray:
    """The server's own prompt for a volume: chat template, image expansion, tokenizer."""
    from medgemma_triton.runtime.chat import PromptBuilder
    from medgemma_triton.runtime.limits import Limits

    content = []
    for k in range(1, slices + 1):
        content += [{"type": "image"}, {"type": "text", "text": f"SLICE {k}"}]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": QUESTION}]}]
    return PromptBuilder(spec, checkpoint, Limits()).build(messages, slices)


def past_at(text, position: int) -> list[np.ndarray]:
    """A KV cache of the shapes the `llm` holds after `position` tokens: sliding layers keep their window."""
    from medgemma_triton.runtime.decoder import sliding_cache_length

    keep = sliding_cache_length(text)
    past = []
    for layer in range(text.num_layers):
        length = min(position, keep) if text.is_sliding(layer) else position
        shape = (1, text.num_kv_heads, length, text.head_dim)
        past += [np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)]
    return past


def time_chunk(decoder, prompt: np.ndarray, start: int, end: int, rng) -> tuple[float, float, list[int]]:
    """Wall and CPU seconds of one prefill call over prompt[start:end] at its position, and the cache lengths after it."""
    rows = int(np.count_nonzero(prompt[start:end] == decoder.spec.tokens.image))
    image_rows = rng.normal(0, 1, (rows, decoder.text.hidden_size)).astype(np.float32)
    feeds = (prompt[None, start:end], np.ones((1, end), dtype=np.int64),
             np.arange(start, end, dtype=np.int64)[None, :], image_rows, past_at(decoder.text, start))
    (_, present), wall, cpu = timed(decoder.run, *feeds)
    return wall, cpu, [int(present[2 * layer].shape[2]) for layer in range(decoder.text.num_layers)]


def prefill_chunks(decoder, prompt: np.ndarray, ends: list[int], repeats: int, scale: float, log) -> dict:
    from medgemma_triton.runtime.decoder import sliding_cache_length

    starts = [0, *ends[:-1]]
    sizes = [end - start for start, end in zip(starts, ends)]
    # first, middle and last of the full-size chunks (not a first token run alone, not a short tail)
    full = [i for i, size in enumerate(sizes) if size >= max(sizes) // 2]
    picked = sorted({full[0], full[len(full) // 2], full[-1]})
    keep = sliding_cache_length(decoder.text)
    rng = np.random.default_rng(0)
    chunks = []
    for index in picked:
        start, end = starts[index], ends[index]
        walls, cpus = [], []
        for _ in range(repeats):
            wall, cpu, cache = time_chunk(decoder, prompt, start, end, rng)
            walls.append(wall)
            cpus.append(cpu)
        expected = [min(end, keep) if decoder.text.is_sliding(layer) else end for layer in range(decoder.text.num_layers)]
        if cache != expected:  # the graph must hold what the llm holds, or the timing is of something else
            raise RuntimeError(f"chunk {index}: cache lengths {cache}, expected {expected}")
        chunks.append({"chunk": index, "start": start, "tokens": end - start,
                       "wall_s": [round(s, 2) for s in walls], "cpu_s": [round(s, 2) for s in cpus],
                       "cpu_tokens_per_s": round((end - start) / min(cpus), 1),
                       "cpu_tokens_per_s_at_4b_depth": round((end - start) / min(cpus) / scale, 1)})
        log(f"chunk {index} at {start}: {end - start} tokens in {min(cpus):.2f} s CPU, {min(walls):.2f} s wall")
    positions = [c["start"] for c in chunks]
    per_token = [min(c["cpu_s"]) / c["tokens"] for c in chunks]
    prefill = sum(size * float(np.interp(start, positions, per_token)) for start, size in zip(starts, sizes))
    return {"chunks": len(ends), "timed_chunks": chunks, "prefill_cpu_s": round(prefill, 1),
            "prefill_cpu_s_at_4b_depth": round(prefill * scale, 1), "first_token_alone": decoder.first_token_alone}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6, help="decoder layers built (default %(default)s: one "
                        "5-sliding:1-global period); the estimate scales to the 4B's depth")
    parser.add_argument("--chunk-tokens", type=int, default=512, help="prefill_chunk_tokens (default %(default)s)")
    parser.add_argument("--slices", type=int, default=CT_SLICES, help="images in the volume (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="calls per timed chunk; the fastest counts (default %(default)s)")
    parser.add_argument("--vision-repeats", type=int, default=1, help="images timed in the vision encoder (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default %(default)s)")
    parser.add_argument("--int8", action="store_true", help="also quantize the decoder to int8 and time that")
    parser.add_argument("--no-vision", action="store_true", help="skip the vision encoder")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER if DEFAULT_TOKENIZER.is_dir() else None,
                        help="a directory with a Gemma 3 tokenizer and chat template (default: the tiny test checkpoint)")
    parser.add_argument("--workdir", type=Path, default=None, help="checkpoints and ONNX files (default: a temp dir, deleted)")
    parser.add_argument("--output", type=Path, default=None, help="write the result as JSON here (rewritten after each phase)")
    args = parser.parse_args(argv)

    rec = decoder_fullsize.Recorder(args.output)
    result = rec.result
    result["versions"] = decoder_fullsize.versions()
    decoder_fullsize._import_from_checkout()
    from medgemma_triton.bench.metadata import git_revision, host_info
    from medgemma_triton.runtime.decoder import OnnxDecoder
    from medgemma_triton.spec import ModelSpec

    result["host"] = host_info()
    result["revision"] = git_revision()
    result["threads"] = args.threads
    with tempfile.TemporaryDirectory(prefix="volume-fullsize-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if not args.no_vision:
            with rec.phase("vision"):
                (workdir / "vision").mkdir(exist_ok=True)
                result["vision"] = vision_per_image(workdir / "vision", args.vision_repeats, args.threads, rec.log)
        # the checkpoint keeps its weights: the spec loader and PromptBuilder read it after the export
        decoder_fullsize.run(rec, args.layers, workdir / "decoder", check=False, tokenizer_dir=args.tokenizer,
                             keep_checkpoint=True)
        checkpoint = workdir / "decoder" / "checkpoint"
        spec = ModelSpec.from_checkpoint(checkpoint)
        prompt = volume_prompt(spec, checkpoint, args.slices)
        fp32_path = next((workdir / "decoder" / "onnx-fp32").glob("*.onnx"))
        graphs = {"fp32": fp32_path}
        if args.int8:
            with rec.phase("int8"):
                graphs["int8"], peak = decoder_fullsize.in_fresh_process(
                    int8_child, fp32_path, workdir / "decoder" / "onnx-int8" / fp32_path.name, spec, rec.log.origin)
                result["int8_peak_rss_gib"] = round(peak, 2)
        result["prompt"] = {"slices": args.slices, "tokens": int(prompt.size), "chunk_tokens": args.chunk_tokens,
                            "image_tokens": int(np.count_nonzero(prompt == spec.tokens.image))}
        layers_4b = decoder_fullsize.published_4b()["text_config"]["num_hidden_layers"]
        scale = layers_4b / args.layers
        result["depth"] = {"layers_built": args.layers, "layers_4b": layers_4b, "scale": round(scale, 3)}
        for precision, path in graphs.items():
            with rec.phase(f"{precision}_prefill"):
                decoder = OnnxDecoder(path, spec, intra_op_threads=args.threads)
                ends = decoder.chunk_ends(prompt, args.chunk_tokens)
                result[precision] = prefill_chunks(decoder, prompt, ends, args.repeats, scale, rec.log)
                del decoder
        if "vision" in result:
            vision_s = args.slices * result["vision"]["seconds_per_image_cpu"]
            result["estimate_4b"] = {
                "formula": "slices x vision seconds per image + sum over chunks of prefill seconds x 34 / layers "
                           "(CPU seconds, one ONNX Runtime thread); decoding not included",
                "vision_s": round(vision_s, 1),
                **{f"time_to_first_token_{p}_s": round(vision_s + result[p]["prefill_cpu_s_at_4b_depth"], 1)
                   for p in graphs},
            }
    rec.save()
    print(json.dumps({k: v for k, v in result.items() if k not in ("versions", "host")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
