"""The gpu profile's typed vision graph (bf16, norms/softmax/reductions in fp32) against the fp32 graph, on CPU.

No GPU and no bf16 kernels in ONNX Runtime's CPU provider: the typed graph runs as vision_typed.emulate_on_cpu
writes it (fp32 compute, every bf16 tensor rounded where it is produced). Reported per graph: max and mean
|diff| of the image embeddings (the vision tower + projector output the llm consumes), the same relative to
the embeddings' magnitude, the lowest per-token cosine. For scale, the same numbers for transformers' own
module run in bf16 (torch, CPU) against its fp32 run.

    python benchmarks/studies/vision_typed.py --checkpoint .cache/test-artifacts/checkpoints/dev --output dev.json
    nice -n 10 python benchmarks/studies/vision_typed.py --geometry 4b --typing rule --no-torch --output 4b.json
    python benchmarks/studies/vision_typed.py --geometry 4b --layers 3 --typing both --output 4b-3layers.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _encoder(args, workdir: Path):
    """(torch module, spec-like, fp32 vision_encoder.onnx) for a checkpoint or the 4B geometry."""
    import torch

    from medgemma_triton.export.onnx_export import _quiet_exporter
    from medgemma_triton.export.vision import export_vision_module, load_vision_encoder
    from medgemma_triton.spec import ModelSpec

    if args.checkpoint:
        spec = ModelSpec.from_checkpoint(args.checkpoint)
        module = load_vision_encoder(args.checkpoint)
        geometry = {"checkpoint": str(args.checkpoint)}
    else:
        from vision_fullsize import GEOMETRY_KEYS, medgemma_4b_vision_config, spec_for

        from medgemma_triton.export.vision import build_vision_encoder
        from medgemma_triton.spec import medgemma_4b_config

        torch.manual_seed(args.seed)
        layers = args.layers or medgemma_4b_config()["vision_config"]["num_hidden_layers"]
        config = medgemma_4b_vision_config(layers)
        spec = spec_for(config)
        geometry = {"google/medgemma-4b-it vision (random weights, seed %d)" % args.seed:
                    {key: getattr(config.vision_config, key) for key in GEOMETRY_KEYS}}
        exported = workdir / "fp32" / "vision_encoder.onnx"
        if args.reuse_export and exported.is_file():  # written by an earlier run with the same seed and layers
            geometry.update(mm_tokens_per_image=spec.vision.mm_tokens_per_image, text_hidden_size=spec.text.hidden_size,
                            image_size=spec.vision.image_size, num_layers=spec.vision.num_layers,
                            export="reused from an earlier run of this script (same seed, geometry)")
            return None, spec, exported, geometry
        module = build_vision_encoder(config)
        with torch.no_grad():  # transformers zero-initialises these: every embedding would be 0
            module.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
            module.multi_modal_projector.mm_soft_emb_norm.weight.normal_(0.0, 0.2)
    geometry.update(mm_tokens_per_image=spec.vision.mm_tokens_per_image, text_hidden_size=spec.text.hidden_size,
                    image_size=spec.vision.image_size, num_layers=spec.vision.num_layers)
    with _quiet_exporter():
        path = export_vision_module(module, spec, workdir / "fp32", progress=lambda m: print(m, file=sys.stderr))
    return module, spec, path, geometry


def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise), before a big step."""
    import ctypes
    import gc

    gc.collect()
    if platform.system() == "Linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _fp32_graph_embeddings(fp32_path: Path, pixel_values):
    import onnxruntime as ort

    session = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": pixel_values})[0]


def _typed_graph_embeddings(typed_path: Path, pixel_values):
    from medgemma_triton.gpu import vision_typed

    return vision_typed.emulated_session(typed_path).run(None, {"pixel_values": pixel_values})[0]


def _rule_embeddings(fp32_path: Path, out_dir: Path, pixel_values):
    from medgemma_triton.gpu import vision_typed

    return vision_typed.rule_emulated_session(fp32_path, out_dir).run(None, {"pixel_values": pixel_values})[0]


def _in_child(function, *args):
    """function(*args) in a fresh process: each big step's memory goes back to the OS when it ends, so the
    steps' peaks never add up (the 4B tower's graphs are 1.7 GB each)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _child_peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)


def run(args, workdir: Path) -> dict:
    """Steps in the order that keeps the peak memory lowest: transformers' runs, then the fp32 graph, then the
    typing (ModelOpt AutoCast, in a child process: it holds several copies of the weights), then the
    emulated typed graph."""
    import subprocess

    import numpy as np
    import torch

    from medgemma_triton.gpu import vision_typed
    from medgemma_triton.runtime.host_check import describe_cpu

    module, spec, fp32_path, geometry = _encoder(args, workdir)
    size = spec.vision.image_size
    pixel_values = np.random.default_rng(args.seed).uniform(-1, 1, (args.batch, 3, size, size)).astype(np.float32)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "cpu": describe_cpu(),
        "machine": platform.machine(),
        "geometry": geometry,
        "batch": args.batch,
        "pixel_values": f"uniform(-1, 1), numpy default_rng({args.seed})",
        "emulation": "vision_typed.emulate_on_cpu: fp32 compute, each bf16 tensor rounded (nearest even) where produced",
        "graphs": {},
        "seconds": {},
    }

    torch_outputs = {}
    if not args.no_torch and module is not None:
        with torch.no_grad():
            for dtype, name in ((torch.float32, "torch_fp32"), (torch.bfloat16, "torch_bf16")):
                module = module.to(dtype)
                started = time.perf_counter()
                torch_outputs[name] = module(torch.from_numpy(pixel_values).to(dtype)).float().numpy()
                result["seconds"][name] = round(time.perf_counter() - started, 1)
        result["torch_bf16_note"] = ("transformers' module cast to bf16 (weights and activations) on CPU; its "
                                     "Gemma3RMSNorm computes in fp32, SigLIP's LayerNorm/softmax are torch's bf16 CPU kernels")
    del module
    _release_memory()

    started = time.perf_counter()
    reference = _in_child(_fp32_graph_embeddings, fp32_path, pixel_values)
    result["seconds"]["fp32_graph"] = round(time.perf_counter() - started, 1)

    emulated = {}
    if args.typing in ("autocast", "both"):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "medgemma_triton.gpu.vision_typed", str(fp32_path),
                        str(workdir / "typed")], check=True)
        typed_path = workdir / "typed" / vision_typed.TYPED_ONNX.format(precision="bf16")
        result["seconds"]["autocast"] = round(time.perf_counter() - started, 1)
        result["autocast_peak_rss_gib"] = _child_peak_rss_gib()  # the largest child so far: AutoCast
        import onnx

        typed_model = onnx.load(str(typed_path), load_external_data=False)
        types = vision_typed.compute_types(typed_model)
        result["typed_graph"] = {
            "file": typed_path.name,
            "nodes_by_type": {t: sum(v == t for v in types.values()) for t in sorted(set(types.values()))},
            "fp32_op_types": list(vision_typed.FP32_OP_TYPES),
            "projector_norm_nodes": len(vision_typed.projector_norm_nodes(typed_model)),
            "rule_violations": vision_typed.check_types(typed_model),
            "bytes": sum(p.stat().st_size for p in typed_path.parent.glob(typed_path.name + "*")),
        }
        del typed_model
        _release_memory()
        started = time.perf_counter()
        emulated["autocast"] = _in_child(_typed_graph_embeddings, typed_path, pixel_values)
        result["seconds"]["typed_graph_emulated"] = round(time.perf_counter() - started, 1)
    if args.typing in ("rule", "both"):
        started = time.perf_counter()
        emulated["rule"] = _in_child(_rule_embeddings, fp32_path, workdir / "rule", pixel_values)
        result["seconds"]["rule_emulated"] = round(time.perf_counter() - started, 1)
    result["typing"] = {
        "autocast": "the typed graph ModelOpt AutoCast writes (vision_typed.type_vision_graph), emulated",
        "rule": "vision_typed.emulate_rule_on_cpu: the same rule applied to the fp32 graph, without AutoCast",
        "both": "both of the above, and how far apart they are",
    }[args.typing]
    if len(emulated) == 2:
        result["graphs"]["autocast_vs_rule_emulation"] = vision_typed.compare(emulated["autocast"], emulated["rule"])
    typed = emulated.get("autocast", emulated.get("rule"))
    result["graphs"]["typed_bf16_vs_fp32_graph"] = vision_typed.compare(reference, typed)
    if torch_outputs:
        result["graphs"]["fp32_graph_vs_torch_fp32"] = vision_typed.compare(torch_outputs["torch_fp32"], reference)
        result["graphs"]["torch_bf16_vs_torch_fp32"] = vision_typed.compare(torch_outputs["torch_fp32"],
                                                                           torch_outputs["torch_bf16"])
        result["graphs"]["typed_bf16_vs_torch_bf16"] = vision_typed.compare(torch_outputs["torch_bf16"], typed)
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    result["largest_child_peak_rss_gib"] = _child_peak_rss_gib()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint", type=Path, help="a Gemma3ForConditionalGeneration checkpoint (e.g. dev)")
    where.add_argument("--geometry", choices=["4b"], help="google/medgemma-4b-it's vision geometry, random weights")
    parser.add_argument("--layers", type=int, default=None, help="SigLIP layers for --geometry (default: all 27)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers fp32/bf16 runs")
    parser.add_argument("--typing", choices=["autocast", "rule", "both"], default="autocast",
                        help="emulate AutoCast's typed graph, the rule applied to the fp32 graph (no AutoCast: "
                        "it holds many copies of the weights; the 4B tower's do not fit 24 GiB), or both")
    parser.add_argument("--workdir", default=None, help="where to write the ONNX files (default: a temp dir)")
    parser.add_argument("--reuse-export", action="store_true",
                        help="with --geometry and --no-torch: take WORKDIR/fp32/vision_encoder.onnx from an earlier run")
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vision-typed-") as tmp:
        result = run(args, Path(args.workdir) if args.workdir else Path(tmp))
    text = json.dumps(result, indent=2) + "\n"
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
