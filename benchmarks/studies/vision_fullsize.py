"""Full-size dry run of the vision encoder export: the real MedGemma 4B geometry, random weights.

No MedGemma weights are reachable from the machines this is developed on, so this builds the vision
tower + projector of google/medgemma-4b-it's config.json in code (SigLIP-so400m, pooled to
mm_tokens_per_image tokens, RMSNorm, linear to the text hidden size; the numbers are in
medgemma_triton/data/medgemma-4b-it.config.json), exports it with the same code path as
`medgemma-triton export`, and reports export time, file size, peak RSS, and seconds per image and max
|diff| vs torch for both ONNX graphs in ONNX Runtime: the served one with fused attention
(vision_encoder.ort.onnx) and the plain one (vision_encoder.onnx, what TensorRT reads).

    python benchmarks/studies/vision_fullsize.py --output vision_fullsize.json
    python benchmarks/studies/vision_fullsize.py --layers 2 --output quick.json   # same geometry, 2 layers
    python benchmarks/studies/vision_fullsize.py --layers 2 --repeats 3          # timings on a busy machine
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from medgemma_triton.spec import medgemma_4b_config

# The vision config's entries reported as the run's geometry (their values: the built config's)
GEOMETRY_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "layer_norm_eps", "vision_use_head")


def medgemma_4b_vision_config(num_layers: int):
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    published = medgemma_4b_config()
    vision = SiglipVisionConfig(**{**published["vision_config"], "num_hidden_layers": num_layers})
    # Only hidden_size of the text config matters to the projector; keep the rest tiny.
    text = Gemma3TextConfig(**{key: published["text_config"][key] for key in ("hidden_size", "vocab_size")},
                            num_hidden_layers=1)
    return Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=published["mm_tokens_per_image"]
    )


def spec_for(config):
    """A ModelSpec-shaped view of the config: the exporter reads geometry only from `spec.vision`."""
    from types import SimpleNamespace

    from medgemma_triton.spec import VisionSpec

    v = config.vision_config
    vision = VisionSpec(
        image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size, num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads, layer_norm_eps=v.layer_norm_eps,
        mm_tokens_per_image=config.mm_tokens_per_image,
    )
    return SimpleNamespace(vision=vision, text=SimpleNamespace(hidden_size=config.text_config.hidden_size))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def run(num_layers: int, check: bool, workdir: Path, seed: int = 0, repeats: int = 1) -> dict:
    import numpy as np
    import torch

    from medgemma_triton.export.onnx_export import _quiet_exporter
    from medgemma_triton.export.vision import build_vision_encoder, export_vision_module
    from medgemma_triton.export.vision_fusion import VISION_ORT_ONNX
    from medgemma_triton.runtime.vision import OnnxVisionEncoder

    torch.manual_seed(seed)
    config = medgemma_4b_vision_config(num_layers)
    spec = spec_for(config)
    started = time.perf_counter()
    module = build_vision_encoder(config)
    with torch.no_grad():  # transformers zero-initialises these: every embedding would be 0
        module.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
        module.multi_modal_projector.mm_soft_emb_norm.weight.normal_(0.0, 0.2)
    build_s = time.perf_counter() - started
    parameters = sum(p.numel() for p in module.parameters())

    started = time.perf_counter()
    with _quiet_exporter():
        path = export_vision_module(module, spec, workdir, progress=lambda m: print(m, file=sys.stderr))
    export_s = time.perf_counter() - started
    files = {p.name: p.stat().st_size for p in workdir.iterdir()}
    result = {
        "geometry": {**{key: getattr(config.vision_config, key) for key in GEOMETRY_KEYS},
                     "mm_tokens_per_image": config.mm_tokens_per_image, "text_hidden_size": spec.text.hidden_size},
        "parameters": parameters,
        "build_s": round(build_s, 1),
        "export_s": round(export_s, 1),
        "files_bytes": files,
        "total_bytes": sum(files.values()),
        "peak_rss_after_export_gib": round(peak_rss_gib(), 2),
    }
    if check:
        size = spec.vision.image_size
        pixel_values = np.random.default_rng(seed).uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
        # "ort": the graph the cpu profile serves (fused attention); "ort_plain": the plain graph TensorRT reads
        graphs = {"ort": workdir / VISION_ORT_ONNX, "ort_plain": path}
        encoders = {}
        for name, graph in graphs.items():
            started = time.perf_counter()
            encoders[name] = OnnxVisionEncoder(graph, spec)
            result[f"{name}_session_s"] = round(time.perf_counter() - started, 1)

        def torch_encode(pixel_values):
            with torch.no_grad():
                return module(torch.from_numpy(pixel_values)).numpy()

        backends = {"torch": torch_encode, **{name: encoder.encode for name, encoder in encoders.items()}}
        seconds = {name: [] for name in backends}
        outputs = {}
        for _ in range(repeats):  # backends take turns, so a busy machine slows each of them alike
            for name, encode in backends.items():
                started = time.perf_counter()
                outputs[name] = encode(pixel_values)
                seconds[name].append(time.perf_counter() - started)
        for name, runs in seconds.items():
            result[f"{name}_s"] = round(min(runs), 1)
            result[f"{name}_runs_s"] = [round(s, 1) for s in runs]
        reference = outputs["torch"]
        result["output_shape"] = list(outputs["ort"].shape)
        result["max_abs_diff"] = float(np.abs(outputs["ort"] - reference).max())
        result["max_abs_diff_plain"] = float(np.abs(outputs["ort_plain"] - reference).max())
        result["max_abs_reference"] = float(np.abs(reference).max())
    result["peak_rss_gib"] = round(peak_rss_gib(), 2)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=medgemma_4b_config()["vision_config"]["num_hidden_layers"])
    parser.add_argument("--no-check", action="store_true", help="skip the ORT vs torch comparison")
    parser.add_argument("--repeats", type=int, default=1, help="images per backend, taking turns (reports the fastest)")
    parser.add_argument("--workdir", default=None, help="where to write the ONNX files (default: a temp dir)")
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vision-fullsize-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        result = run(args.layers, not args.no_check, workdir, repeats=args.repeats)
    for key, value in result.items():
        if key != "geometry":
            print(f"{key:28s} {value}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
