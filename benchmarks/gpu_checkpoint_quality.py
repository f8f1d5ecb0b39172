"""Quality of the gpu profile's quantized checkpoints (ModelOpt FP8 and INT4-AWQ), measured without a GPU.

For each recipe: ModelOpt PTQ on the checkpoint (CPU, or CUDA with --device cuda), then ModelOpt's
fake-quantized model and the exported checkpoint read back by our dequantizer
(medgemma_triton/gpu/dequantize.py), each against the unquantized model: teacher-forced perplexity
ratio and top-1 agreement on a held-out clinical paragraph, and greedy agreement over the gpu
acceptance prompts (medgemma_triton/gpu/verify.py); then verify's checks on the export (every decoder
Linear quantized, lm_head tied, one BOS, image-prompt KL in bf16 and its causal-only control) and the
image prompt's KL from the unquantized model. See medgemma_triton/gpu/checkpoint_quality.py.

    python benchmarks/gpu_checkpoint_quality.py --output docs/results/gpu-checkpoint-quality-dev.json
    python benchmarks/gpu_checkpoint_quality.py --recipes int4_awq:128 int4_awq:64 --modelopt-norm-fold
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO_ROOT / ".cache" / "test-artifacts" / "checkpoints" / "dev"


def parse_recipe(text: str) -> tuple[str, int | None]:
    precision, _, group = text.partition(":")
    return precision, int(group) if group else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="HF checkpoint (default: the dev checkpoint the test suite builds)")
    parser.add_argument("--recipes", nargs="+", default=["fp8", "int4_awq"],
                        help="precision[:AWQ group size], e.g. fp8 int4_awq int4_awq:64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calib-text", type=int, default=16)
    parser.add_argument("--calib-image", type=int, default=4)
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--modelopt-norm-fold", action="store_true",
                        help="also export the first INT4-AWQ recipe with ModelOpt's own norm fold (shows its Gemma fault)")
    parser.add_argument("--output", type=Path, help="write the reports here (JSON)")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"{args.checkpoint} is not a checkpoint (run the test suite once to build dev, or pass --checkpoint)")

    from medgemma_triton.gpu.checkpoint_quality import evaluate
    from medgemma_triton.runtime.host_check import describe_cpu

    runs = [(p, g, True) for p, g in map(parse_recipe, args.recipes)]
    if args.modelopt_norm_fold:
        runs += [(p, g, False) for p, g, _ in runs if p == "int4_awq"][:1]
    reports = []
    with tempfile.TemporaryDirectory(prefix="medgemma-quality-") as scratch:
        for index, (precision, group, fixed) in enumerate(runs):
            print(f"[{index + 1}/{len(runs)}] {precision}{f' group {group}' if group else ''}"
                  f"{'' if fixed else ' (ModelOpt norm fold)'} on {args.device} ...", flush=True)
            reports.append(evaluate(args.checkpoint, Path(scratch) / f"q{index}", precision, device=args.device,
                                    calib_text=args.calib_text, calib_image=args.calib_image, group_size=group,
                                    greedy_tokens=args.greedy_tokens, fix_gemma_norms=fixed, log=lambda *a: None))
    print(f"{'recipe':<28} {'fake ppl x':>10} {'fake+kv x':>10} {'export ppl x':>12} {'top-1':>6} "
          f"{'vs fake top-1':>13} {'greedy 1st':>10} {'prefix':>6}")
    for r in reports:
        name = f"{r['precision']}{'/g' + str(r['group_size']) if r['group_size'] else ''}"
        name += "" if r["gemma_norm_fold_corrected"] or r["precision"] == "fp8" else " (modelopt fold)"
        print(f"{name:<28} {r['fake_quant']['perplexity_ratio']:>10.3f} {r['fake_quant_fp8_kv']['perplexity_ratio']:>10.3f} "
              f"{r['exported']['perplexity_ratio']:>12.3f} {r['exported']['top1']:>6.3f} {r['exported_vs_fake']['top1']:>13.3f} "
              f"{r['greedy']['first_token']:>10.2f} {r['greedy']['prefix']:>6.2f}")
    print(f"\n{'recipe':<28} {'KL quantization':>15} {'KL bf16':>9} {'KL causal':>9}  checks")
    for r in reports:
        name = f"{r['precision']}{'/g' + str(r['group_size']) if r['group_size'] else ''}"
        kl = r["image_kl"]
        failed = [c["name"] for c in r["checks"] if not c["passed"]]
        print(f"{name:<28} {kl['quantization']['mean']:>15.4g} {kl['bf16']['mean']:>9.4g} {kl['bf16_causal_control']['mean']:>9.4g}  "
              f"{'all pass' if not failed else 'FAILED: ' + ', '.join(failed)}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        meta = {"cpu": describe_cpu() if args.device == "cpu" else None, "checkpoint": str(args.checkpoint),
                "calib_text": args.calib_text, "calib_image": args.calib_image}
        args.output.write_text(json.dumps({"meta": meta, "reports": reports}, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
