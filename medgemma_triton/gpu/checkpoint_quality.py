"""Quality of a quantized checkpoint, measured on CPU or CUDA without TensorRT-LLM.

For one recipe (quantize.py) on one checkpoint:
- `fake`: ModelOpt's fake-quantized model right after calibration (weights, activations; the FP8 KV
  cache on and off), as ModelOpt itself evaluates it;
- `exported`: the written checkpoint read back by our own dequantizer (dequantize.py), i.e. what
  TensorRT-LLM would compute (up to its kernels' rounding), KV cache in the model dtype;
- each against the unquantized model: teacher-forced perplexity ratio and top-1 agreement on
  evaluation.MEDICAL_TEXT, and greedy agreement over verify's acceptance prompts (verify.compare);
- `exported` against `fake`: the same teacher-forced measures. ModelOpt's export legitimately
  changes the function a little (q/k/v and gate/up share an averaged AWQ scale, and their weights are
  re-quantized), so this is a tolerance, not an identity: EXPORT_AGREEMENT, set from measurements;
- checks for faults peer deployments shipped (verify.py): the exported checkpoint's decoder Linears all
  carry their quantization (dequantize.quantized_linear_faults), its lm_head loads tied to the embedding,
  the image chat's templated ids hold one BOS, and its image-prompt logits in bf16 stay within
  verify.IMAGE_KL_LIMIT of its own fp32 logits while a causal-only image mask does not (the control);
- the image prompt's KL from the unquantized model, reported (quantization error, not a runtime fault).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ExportAgreement:
    """How close the exported checkpoint must be to ModelOpt's own fake-quantized model."""

    max_log_ppl_ratio: float  # |log(ppl exported / ppl fake)|
    min_top1: float  # share of positions where both predict the same next token


# Set between what dev's exports measure with a correct norm fold and with ModelOpt 0.37's (docs/gpu.md,
# "Quantized checkpoints", with the command): wide enough for ModelOpt's scale averaging and re-quantization.
EXPORT_AGREEMENT = ExportAgreement(max_log_ppl_ratio=math.log(1.25), min_top1=0.6)


def token_ids(tokenizer, text: str):
    return tokenizer(text, return_tensors="pt").input_ids


def teacher_forced_logits(model, ids):
    import torch

    with torch.inference_mode():
        return model(input_ids=ids.to(model.device)).logits[0, :-1].float().cpu()


def perplexity(logits, ids) -> float:
    import torch

    targets = ids[0, 1:].to(logits.device)
    return math.exp(-torch.log_softmax(logits, -1).gather(1, targets[:, None]).mean().item())


def teacher_forced_agreement(reference, candidate, ids) -> dict:
    ppl_ref, ppl_cand = perplexity(reference, ids), perplexity(candidate, ids)
    top1 = (reference.argmax(-1) == candidate.argmax(-1)).float().mean().item()
    return {"perplexity": round(ppl_cand, 4), "reference_perplexity": round(ppl_ref, 4),
            "perplexity_ratio": round(ppl_cand / ppl_ref, 4), "top1": round(top1, 4)}


def export_agrees(agreement: dict, tolerance: ExportAgreement = EXPORT_AGREEMENT) -> bool:
    return (abs(math.log(agreement["perplexity_ratio"])) <= tolerance.max_log_ppl_ratio
            and agreement["top1"] >= tolerance.min_top1)


def fake_quant_logits(model, ids) -> dict:
    """ModelOpt's fake-quantized model's logits with its FP8 KV-cache quantizers on and off."""
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg_context

    from medgemma_triton.gpu.quantize import quantizer_settings

    logits = {"with_kv": teacher_forced_logits(model, ids)}
    with set_quantizer_by_cfg_context(model, quantizer_settings({"*[kv]_bmm_quantizer": {"enable": False}})):
        logits["without_kv"] = teacher_forced_logits(model, ids)
    return logits


def first_image_chat(image_size: int):
    from medgemma_triton.gpu import verify

    return next((messages, image) for messages, image in verify.acceptance_chats(image_size) if image is not None)


def image_mask_checks(model, processor, spec, device: str = "cpu", all_image_chats: bool = False) -> dict:
    """Image chats through `model` (the fp32 reference) and a bf16 copy of it, with the bidirectional image mask
    and without: verify.check_image_kl must pass for the first and fail for the causal-only control on every chat.
    `kl` holds the worst case (the largest bf16 mean, the smallest control mean); the first chat by default,
    every image chat of verify's acceptance set with all_image_chats."""
    import copy

    import torch

    from medgemma_triton.gpu import verify

    chats = [chat for chat in verify.acceptance_chats(spec.vision.image_size) if chat[1] is not None]
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)  # what a serving runtime computes with these weights
    per_chat = []
    for messages, image in chats if all_image_chats else chats[:1]:
        inputs = verify.image_inputs(processor, messages, image, device)
        reference = verify.prompt_logits(model, inputs)
        kl = {name: verify.image_kl(reference, verify.prompt_logits(bf16_model, inputs, bidirectional),
                                    inputs["input_ids"], spec.tokens.image)
              for name, bidirectional in (("bf16", True), ("bf16_causal_control", False))}
        per_chat.append({"kl": kl, "bos": verify.check_one_bos(inputs["input_ids"], spec.tokens.bos),
                         "reference_logits": reference, "input_ids": inputs["input_ids"]})
    del bf16_model
    worst = {"bf16": max((c["kl"]["bf16"] for c in per_chat), key=lambda kl: kl["mean"]),
             "bf16_causal_control": min((c["kl"]["bf16_causal_control"] for c in per_chat), key=lambda kl: kl["mean"])}
    bos = next((c["bos"] for c in per_chat if not c["bos"].passed), per_chat[0]["bos"])
    return {"kl": worst, "per_chat": [c["kl"] for c in per_chat], "bos": bos,
            "passes": verify.check_image_kl(worst["bf16"]),
            "control_fails": not verify.check_image_kl(worst["bf16_causal_control"]).passed,
            "reference_logits": per_chat[0]["reference_logits"], "input_ids": per_chat[0]["input_ids"]}


def evaluate(
    checkpoint: str | Path,
    output: str | Path,
    precision: str,
    device: str = "cpu",
    calib_text: int = 64,
    calib_image: int = 64,
    group_size: int | None = None,
    greedy_tokens: int = 32,
    fix_gemma_norms: bool = True,
    log=print,
) -> dict:
    """Quantize `checkpoint` to `output` and measure it; returns the report (see the module docstring)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from medgemma_triton.evaluation import MEDICAL_TEXT
    from medgemma_triton.gpu import verify
    from medgemma_triton.gpu.dequantize import QuantFormat, load_dequantized, quantized_linear_faults, read_tensors
    from medgemma_triton.gpu.quantize import RECIPE_FILE, quantize_checkpoint
    from medgemma_triton.spec import ModelSpec

    spec = ModelSpec.from_checkpoint(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint)
    ids = token_ids(processor.tokenizer, MEDICAL_TEXT)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    reference = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    reference_logits = teacher_forced_logits(reference, ids)
    chats = verify.acceptance_chats(spec.vision.image_size if spec.vision else 224)
    stop_ids = set(spec.tokens.eos)
    reference_greedy = verify.generate_tokens(reference, processor, chats, greedy_tokens, stop_ids, device)
    messages, image = first_image_chat(spec.vision.image_size)
    image_inputs = verify.image_inputs(processor, messages, image, device)
    reference_image_logits = verify.prompt_logits(reference, image_inputs)
    del reference

    fake = {}
    started = time.monotonic()
    quantize_checkpoint(checkpoint, output, precision=precision, device=device, calib_text=calib_text,
                        calib_image=calib_image, group_size=group_size, fix_gemma_norms=fix_gemma_norms,
                        inspect=lambda model: fake.update(fake_quant_logits(model, ids)), log=log)
    quantize_s = time.monotonic() - started
    exported = load_dequantized(output).to(device)
    exported_logits = teacher_forced_logits(exported, ids)
    masks = image_mask_checks(exported, processor, spec, device)
    quantization_kl = verify.image_kl(reference_image_logits, masks["reference_logits"], image_inputs["input_ids"], spec.tokens.image)
    linear_faults = quantized_linear_faults(read_tensors(output), QuantFormat.read(output))
    checks = [masks["passes"], verify.Check("image_kl_causal_control_fails", masks["control_fails"],
                                            f"causal-only image mask: mean KL {masks['kl']['bf16_causal_control']['mean']:.3g}"),
              masks["bos"], verify.check_tied_lm_head(exported),
              verify.Check("quantized_linears", not linear_faults, "; ".join(linear_faults[:3]) or "every decoder Linear quantized")]
    greedy = verify.compare(reference_greedy,
                            verify.generate_tokens(exported, processor, chats, greedy_tokens, stop_ids, device))
    versus_fake = teacher_forced_agreement(fake["without_kv"], exported_logits, ids)
    recipe = json.loads((Path(output) / RECIPE_FILE).read_text())
    return {
        "checkpoint": str(checkpoint),
        "precision": precision,
        "group_size": recipe["recipe"]["awq_block_size"],
        "device": device,
        "calibration_chats": recipe["calibration_chats"],
        "quantize_seconds": round(quantize_s, 1),
        "gemma_norm_fold_corrected": recipe["gemma_norm_fold_corrected"],
        "text_tokens": int(ids.shape[-1]),
        "fake_quant": teacher_forced_agreement(reference_logits, fake["without_kv"], ids),
        "fake_quant_fp8_kv": teacher_forced_agreement(reference_logits, fake["with_kv"], ids),
        "exported": teacher_forced_agreement(reference_logits, exported_logits, ids),
        "exported_vs_fake": versus_fake,
        "exported_agrees_with_fake": export_agrees(versus_fake),
        "greedy": {"prompts": greedy.prompts, "first_token": round(greedy.first_token, 4),
                   "prefix": round(greedy.prefix, 4), "tokens": greedy_tokens},
        "image_kl": {"quantization": _rounded(quantization_kl), **{k: _rounded(v) for k, v in masks["kl"].items()}},
        "checks": [asdict(check) for check in checks],
        "checks_passed": all(check.passed for check in checks),
    }


def _rounded(kl: dict) -> dict:
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in kl.items()}
