"""One prepared check for a lent GPU machine (one H100/H200, torch with CUDA, no TensorRT, no network):
what the gpu profile's build and baseline cost there, written to one JSON.

0. The reference checks of medgemma_triton/gpu/verify.py on `dev`, on this device: the image prompt's
   KL between fp32 and bf16 kernels with the bidirectional image mask and with a causal-only one (the
   control that must fail), one BOS in the templated ids, lm_head tied, and the largest fp32 activation
   against fp16's range (why fp16 is refused).
1. ModelOpt FP8 and INT4-AWQ on the `dev` checkpoint (real Gemma 3 270M weights): calibration time,
   peak GPU memory, and the quality figures and checks of medgemma_triton/gpu/checkpoint_quality.py
   (fake-quantized and exported, against the unquantized model; every decoder Linear quantized; the
   exported checkpoint's image-prompt KL and its causal-only control).
   With --modelopt-list-shape DIR (a folder holding ModelOpt 0.47, installed with pip --target), part 1
   runs again under it in a child process: the list-shaped presets and ModelOpt's own Gemma norm fold.
2. The same recipes on a random-weight model of the real MedGemma 4B geometry: time, peak memory,
   exported size (random weights say nothing about quality).
3. transformers bf16 `generate` on that 4B geometry, batch 1 and 8, 128 tokens in and 128 out: the
   model card's baseline, in output tokens/s on this GPU.

    python benchmarks/studies/gpu_check.py --output gpu_check.json                      # on the GPU machine
    python benchmarks/studies/gpu_check.py --geometry tiny --device cpu --output x.json   # the same steps, tiny, CPU

Each part stops being started once --budget-s has passed (recorded as skipped), so the run fits a
lease. Carry the repository, the dev checkpoint (.cache/test-artifacts/checkpoints/dev) and, if the
machine lacks it, the nvidia-modelopt 0.37.0 wheel; for the second shape, the nvidia-modelopt 0.47.0,
omegaconf 2.4.0 and antlr4-python3-runtime 4.9.3 wheels (about 2.5 MB together), installed with
`pip install --no-deps --target DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = REPO_ROOT / ".cache" / "test-artifacts" / "checkpoints"
# Files a random-weight checkpoint borrows from a real one (tokenizer, chat template).
BORROWED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                  "chat_template.jinja", "chat_template.json", "generation_config.json")


class Clock:
    def __init__(self, budget_s: float):
        self.started, self.budget_s = time.monotonic(), budget_s

    def left(self) -> bool:
        return time.monotonic() - self.started < self.budget_s


def peak_memory(device: str) -> dict:
    import torch

    if device.startswith("cuda"):
        return {"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    import resource

    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def random_checkpoint(config: dict, borrow_from: Path, output: Path, device: str) -> Path:
    """A Gemma3ForConditionalGeneration of `config`'s geometry with random bf16 weights, saved with
    `borrow_from`'s tokenizer and image processor files resized to the config's image size."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    with torch.device(device):
        model = Gemma3ForConditionalGeneration(Gemma3Config.from_dict(config)).to(torch.bfloat16).eval()
    model.save_pretrained(output, safe_serialization=True)
    del model
    for name in BORROWED_FILES:
        if (borrow_from / name).is_file():
            shutil.copy2(borrow_from / name, output / name)
    size = config["vision_config"]["image_size"]
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = borrow_from / name
        if path.is_file():
            data = json.loads(path.read_text())
            nested = data.get("image_processor", data)
            if "size" in nested:
                nested["size"] = {"height": size, "width": size}
            if "image_seq_length" in data:
                data["image_seq_length"] = config["mm_tokens_per_image"]
            (output / name).write_text(json.dumps(data, indent=2))
    return output


def directory_gib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30, 3)


def generate_speed(checkpoint: Path, device: str, batch: int, input_tokens: int, output_tokens: int) -> dict:
    """transformers bf16 greedy generate, exactly output_tokens new tokens per row; output tokens/s."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.bfloat16).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 200_000, (batch, input_tokens), generator=generator).to(device)
    kwargs = dict(do_sample=False, max_new_tokens=output_tokens, min_new_tokens=output_tokens)
    with torch.inference_mode():
        model.generate(input_ids=ids[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    generated = int(out.shape[1] - input_tokens) * batch
    del model
    return {"batch": batch, "input_tokens": input_tokens, "output_tokens": output_tokens, "seconds": round(seconds, 3),
            "output_tokens_per_s": round(generated / seconds, 1)}


def reference_checks(checkpoint: Path, device: str) -> dict:
    """verify.py's checks on the unquantized checkpoint with this device's kernels (see the module docstring)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from medgemma_triton.gpu import verify
    from medgemma_triton.gpu.checkpoint_quality import first_image_chat, image_mask_checks
    from medgemma_triton.spec import ModelSpec

    spec = ModelSpec.from_checkpoint(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    masks = image_mask_checks(model, processor, spec, device, all_image_chats=True)
    messages, image = first_image_chat(spec.vision.image_size)
    with torch.inference_mode():
        hidden = model(**verify.image_inputs(processor, messages, image, device), output_hidden_states=True).hidden_states
    largest = max(float(h.abs().max()) for h in hidden)
    checks = [masks["passes"], verify.Check("image_kl_causal_control_fails", masks["control_fails"], ""),
              masks["bos"], verify.check_tied_lm_head(model)]
    del model
    return {"checkpoint": checkpoint.name, "image_kl": masks["kl"], "image_kl_per_chat": masks["per_chat"],
            "image_kl_limit": verify.IMAGE_KL_LIMIT,
            "max_abs_activation_fp32": largest, "fp16_max": float(torch.finfo(torch.float16).max),
            "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks]}


def modelopt_shape() -> dict:
    import modelopt

    from medgemma_triton.gpu.quantize import installed_quant_cfg_is_list

    return {"version": modelopt.__version__, "quant_cfg": "list" if installed_quant_cfg_is_list() else "dict"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--geometry", choices=("4b", "tiny"), default="4b",
                        help="4b: dev + the MedGemma 4B geometry (the GPU run); tiny: the tiny checkpoint for both (CI)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINTS,
                        help="folder holding the dev (and tiny) checkpoints (default: the test suite's cache)")
    parser.add_argument("--calib-text", type=int, default=16)
    parser.add_argument("--calib-image", type=int, default=4)
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new part after this many seconds")
    parser.add_argument("--parts", nargs="+", choices=("checks", "quality", "geometry", "generate"),
                        default=["checks", "quality", "geometry", "generate"])
    parser.add_argument("--modelopt-list-shape", type=Path,
                        help="a folder with ModelOpt 0.47 (pip install --no-deps --target): part 1 again under it")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)

    import torch

    from medgemma_triton.gpu.checkpoint_quality import evaluate
    from medgemma_triton.gpu.quantize import quantize_checkpoint
    from medgemma_triton.spec import medgemma_4b_config

    tiny = args.geometry == "tiny"
    quality_checkpoint = args.checkpoints / ("tiny" if tiny else "dev")
    if not (quality_checkpoint / "config.json").is_file():
        parser.error(f"{quality_checkpoint} is missing: run the test suite once, or carry it")
    clock = Clock(args.budget_s)
    lengths = (16, 16) if tiny else (128, 128)
    report = {"geometry": args.geometry, "device": args.device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
              "modelopt": modelopt_shape(), "checks": None,
              "quality": [], "geometry_4b": [], "generate": [], "skipped": []}

    def save():
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="medgemma-gpu-check-") as scratch:
        scratch = Path(scratch)
        if "checks" in args.parts:
            print(f"checks: verify's reference checks on {quality_checkpoint.name} ({args.device})", flush=True)
            report["checks"] = reference_checks(quality_checkpoint, args.device)
            save()
        for precision in ("fp8", "int4_awq") if "quality" in args.parts else ():
            if not clock.left():
                report["skipped"].append(f"quality {precision}")
                continue
            print(f"quality: {precision} on {quality_checkpoint.name} ({args.device})", flush=True)
            reset_peak(args.device)
            result = evaluate(quality_checkpoint, scratch / f"quality-{precision}", precision, device=args.device,
                              calib_text=args.calib_text, calib_image=args.calib_image, log=lambda *a: None)
            report["quality"].append({**result, **peak_memory(args.device)})
            save()

        if args.modelopt_list_shape:
            if clock.left():
                print(f"quality again under the ModelOpt in {args.modelopt_list_shape}", flush=True)
                child = scratch / "list-shape.json"
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(args.modelopt_list_shape),
                                                                                   os.environ.get("PYTHONPATH")]))}
                command = [sys.executable, __file__, "--geometry", args.geometry, "--device", args.device,
                           "--checkpoints", str(args.checkpoints), "--calib-text", str(args.calib_text),
                           "--calib-image", str(args.calib_image), "--parts", "quality", "--output", str(child)]
                returncode = subprocess.run(command, env=env).returncode
                report["modelopt_list_shape"] = (json.loads(child.read_text()) if child.is_file()
                                                 else {"returncode": returncode})
                save()
            else:
                report["skipped"].append("quality under list-shaped ModelOpt")
        geometry = json.loads((quality_checkpoint / "config.json").read_text()) if tiny else medgemma_4b_config()
        big = scratch / "random-geometry"
        if {"geometry", "generate"} & set(args.parts) and clock.left():
            print("random-weight checkpoint of the 4B geometry" if not tiny else "random-weight tiny geometry", flush=True)
            started = time.monotonic()
            random_checkpoint(geometry, quality_checkpoint, big, args.device)
            report["random_checkpoint"] = {"seconds": round(time.monotonic() - started, 1), "gib": directory_gib(big)}
            save()
        for precision in ("fp8", "int4_awq") if "geometry" in args.parts else ():
            if not (big.is_dir() and clock.left()):
                report["skipped"].append(f"geometry {precision}")
                continue
            print(f"geometry: {precision}", flush=True)
            reset_peak(args.device)
            started = time.monotonic()
            out = quantize_checkpoint(big, scratch / f"geometry-{precision}", precision=precision, device=args.device,
                                      calib_text=args.calib_text, calib_image=0, log=lambda *a: None)
            report["geometry_4b"].append({"precision": precision, "seconds": round(time.monotonic() - started, 1),
                                          "exported_gib": directory_gib(out), **peak_memory(args.device)})
            shutil.rmtree(out)
            save()
        for batch in (1, 8) if "generate" in args.parts else ():
            if not (big.is_dir() and clock.left()):
                report["skipped"].append(f"generate batch {batch}")
                continue
            print(f"generate: bf16, batch {batch}", flush=True)
            reset_peak(args.device)
            report["generate"].append({**generate_speed(big, args.device, batch, *lengths), **peak_memory(args.device)})
            save()
    report["seconds"] = round(time.monotonic() - clock.started, 1)
    save()
    print(json.dumps({k: report[k] for k in ("modelopt", "geometry_4b", "generate", "skipped", "seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
