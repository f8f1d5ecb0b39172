"""GPU acceptance: check a running gpu deployment against the transformers reference, then run the
latency benchmark. Run inside the pinned container, next to the server:

    python -m medgemma_triton.gpu.verify --url localhost:8001 --checkpoint /models/medgemma-4b-it --precision fp8

Token agreement on a fixed prompt set (text-only and image chats; greedy, the model card's setting):
for each prompt, the served ids are compared with transformers' `generate` in bf16 on the same GPU.
`first_token` is the share of prompts whose first generated token matches; `prefix` is the mean share
of the reference continuation reproduced before the first difference. Quantized models drift after a
while by design, so the thresholds are per precision (THRESHOLDS); bf16 must match almost exactly.

Beside the agreement, checks for faults peer Gemma deployments shipped (each a `Check`; sources in
docs/gpu.md): one BOS in the templated ids and the served prompt length equal to the reference's; with
--quantized-checkpoint, every decoder Linear carrying its quantization; fp16 refused. The image-prompt
KL check (image_kl, with its causal-only control) and the tied lm_head need the served model's logits or
weights, which Triton's contract does not return: checkpoint_quality.py and benchmarks/studies/gpu_check.py run
them where a model is in hand.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from medgemma_triton.contract import TOP_MODEL


@dataclass(frozen=True)
class Threshold:
    first_token: float  # share of prompts whose first generated token agrees
    prefix: float  # mean share of the reference continuation matched before the first difference


def threshold_from(first_token: float, prefix: float, prompts: int) -> Threshold:
    """A pass mark from a measured agreement: one prompt's first token may differ, and the mean
    matched prefix may fall to three quarters of the measured one (rounded down to 0.05)."""
    return Threshold(first_token=round(max(first_token - 1 / prompts, 0.0), 3),
                     prefix=math.floor(prefix * 0.75 * 20) / 20)


# fp8 and int4_awq: threshold_from the greedy agreement measured on the dev checkpoint (real Gemma 3
# 270M weights) read back from ModelOpt's export, 32 tokens over ACCEPTANCE_PROMPTS
# (docs/results/gpu-checkpoint-quality-dev.json, docs/gpu.md; a test recomputes these from it). A 270M
# model loses more to quantization than the 4B, so for MedGemma 4B these are floors. bf16 is not
# quantized: only kernels differ from transformers, and it must match almost exactly (chosen, not measured).
THRESHOLDS = {
    "bf16": Threshold(first_token=1.0, prefix=0.9),
    "fp8": Threshold(first_token=0.875, prefix=0.3),
    "int4_awq": Threshold(first_token=0.625, prefix=0.05),
}

# (system, user text, synthetic image kind or None); images are drawn with seeds calibration never uses.
ACCEPTANCE_PROMPTS = (
    ("You are an expert radiologist.", "List the radiographic signs of a tension pneumothorax.", None),
    ("You are a careful clinical assistant.", "What is the first-line treatment of uncomplicated hypertension?", None),
    ("You are a medical educator.", "Explain the difference between sensitivity and specificity.", None),
    ("You are an expert radiologist.", "What does a Kerley B line indicate?", None),
    ("You summarise clinical documents for physicians.", "Summarise: 72-year-old with chest pain, troponin rising, ST depression in V4-V6.", None),
    ("You are an expert radiologist.", "Describe this X-ray", "radiograph"),
    ("You are an expert radiologist.", "Describe the structures visible in this CT slice.", "ct"),
    ("You are a dermatologist.", "Describe this skin lesion.", "dermoscopy"),
)
IMAGE_SEED_BASE = 7_000_000


@dataclass
class Agreement:
    prompts: int
    first_token: float
    prefix: float
    per_prompt: list

    def passes(self, threshold: Threshold) -> bool:
        return self.first_token >= threshold.first_token and self.prefix >= threshold.prefix


def acceptance_chats(image_size: int):
    from medgemma_triton.gpu.calibration import synthetic_image

    chats = []
    for index, (system, text, kind) in enumerate(ACCEPTANCE_PROMPTS):
        user = [{"type": "text", "text": text}]
        image = None
        if kind:
            user.append({"type": "image"})
            image = synthetic_image(kind, image_size, IMAGE_SEED_BASE + index)
        chats.append(([{"role": "system", "content": [{"type": "text", "text": system}]}, {"role": "user", "content": user}], image))
    return chats


def compare(reference: list[list[int]], served: list[list[int]]) -> Agreement:
    """Agreement of served token ids with the reference's, prompt by prompt."""
    if len(reference) != len(served):
        raise ValueError(f"{len(reference)} reference results for {len(served)} served ones")
    per_prompt = []
    for ref, got in zip(reference, served):
        common = 0
        for a, b in zip(ref, got):
            if a != b:
                break
            common += 1
        per_prompt.append({"reference": len(ref), "served": len(got), "common_prefix": common,
                           "first_token": bool(ref and got and ref[0] == got[0])})
    count = len(per_prompt) or 1
    return Agreement(
        prompts=len(per_prompt),
        first_token=sum(p["first_token"] for p in per_prompt) / count,
        prefix=sum(p["common_prefix"] / max(p["reference"], 1) for p in per_prompt) / count,
        per_prompt=per_prompt,
    )


# ---- checks for faults peer Gemma deployments shipped (sources in docs/gpu.md) ------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


# Mean KL(reference || candidate), in nats per position, over an image prompt's positions from its first image
# token on, for a candidate that runs the reference's own weights in bf16 (a serving runtime) against the fp32
# reference: above what a correct bf16 run measures on dev's image chats, far below what the same run measures
# with image tokens attending causally, and at the low end of what vLLM #40106 reported for that fault in Gemma 4
# (docs/gpu.md, "Checks", with the numbers and the command). Quantized checkpoints are compared with their own
# dequantized weights (checkpoint_quality.py): quantization error is not a runtime fault.
IMAGE_KL_LIMIT = 0.03


def image_inputs(processor, messages, image, device: str = "cpu"):
    """The processor's model inputs (batch 1) for one chat whose image parts are filled with `image`."""
    messages = json.loads(json.dumps(messages))
    for part in messages[-1]["content"]:
        if part["type"] == "image":
            part["image"] = image
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True, return_tensors="pt").to(device)


def prompt_logits(model, inputs, bidirectional_images: bool = True):
    """Next-token logits (fp32, CPU) at every prompt position. bidirectional_images=False drops
    token_type_ids, so transformers builds a causal-only mask: the image mask a faulty runtime forgets."""
    import torch

    inputs = dict(inputs)
    if not bidirectional_images:
        inputs.pop("token_type_ids", None)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        return model(**inputs).logits[0].float().cpu()


def image_kl(reference_logits, candidate_logits, input_ids, image_token: int) -> dict:
    """KL(reference || candidate) per position in nats, from the first image token to the prompt's end
    (the positions an image mask can change): mean, max, and at the last position (the first reply token)."""
    import torch

    ids = torch.as_tensor(input_ids).reshape(-1)
    image_positions = (ids == image_token).nonzero()
    if not len(image_positions):
        raise ValueError("the prompt has no image token: an image-mask check needs an image prompt")
    start = int(image_positions[0])
    log_p = torch.log_softmax(reference_logits[start:].double(), -1)
    log_q = torch.log_softmax(candidate_logits[start:].double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {"mean": float(kl.mean()), "max": float(kl.max()), "last": float(kl[-1]), "positions": int(kl.numel())}


def check_image_kl(kl: dict, limit: float | None = None) -> Check:
    limit = IMAGE_KL_LIMIT if limit is None else limit
    return Check("image_prompt_kl", kl["mean"] <= limit,
                 f"mean KL {kl['mean']:.3g} nats over {kl['positions']} positions (max {kl['max']:.3g}); limit {limit:.3g}")


def check_one_bos(input_ids, bos_id: int) -> Check:
    """Exactly one BOS, first: a template that writes <bos> tokenized with special tokens added has two."""
    ids = [int(t) for t in (input_ids.reshape(-1).tolist() if hasattr(input_ids, "reshape") else input_ids)]
    count = ids.count(bos_id)
    return Check("one_bos", count == 1 and bool(ids) and ids[0] == bos_id,
                 f"{count} BOS token(s) (id {bos_id}) in {len(ids)} prompt ids; the first id is {ids[0] if ids else None}")


def check_tied_lm_head(model) -> Check:
    """The loaded output projection is the input embedding (Gemma 3 ties them; an untied load leaves lm_head
    as whatever was initialised or stored)."""
    import torch

    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    same = head.shape == embedding.shape and bool(torch.equal(head.detach().cpu(), embedding.detach().cpu()))
    return Check("tied_lm_head", same, "lm_head equals the token embedding" if same else
                 f"lm_head {tuple(head.shape)} differs from the token embedding {tuple(embedding.shape)}")


ACTIVATION_DTYPES = ("bfloat16", "float32")


def refuse_fp16(dtype, where: str) -> None:
    """Gemma 3's activations overflow fp16 (docs/gpu.md): bf16 or fp32 only."""
    name = str(dtype).removeprefix("torch.")
    if name in ("float16", "half"):
        raise ValueError(f"{where}: float16 activations overflow in Gemma 3 (the residual stream exceeds fp16's "
                         f"range); use bfloat16 (the reference dtype) or float32")
    if name not in ACTIVATION_DTYPES:
        raise ValueError(f"{where}: dtype {name} is not one of {', '.join(ACTIVATION_DTYPES)}")


def _strip_stop(ids, stop_ids) -> list[int]:
    ids = [int(t) for t in ids]
    for i, token in enumerate(ids):
        if token in stop_ids:
            return ids[:i]
    return ids


def generate_tokens(model, processor, chats, max_tokens: int, stop_ids: set[int], device: str) -> list[list[int]]:
    """Greedy continuations of each chat by a transformers model, without the stop token and after."""
    import torch

    results = []
    for messages, image in chats:
        messages = json.loads(json.dumps(messages))
        for part in messages[-1]["content"]:
            if part["type"] == "image":
                part["image"] = image
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt").to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_tokens)
        results.append(_strip_stop(out[0, inputs["input_ids"].shape[-1]:].tolist(), stop_ids))
    return results


def reference_tokens(checkpoint: Path, chats, max_tokens: int, device: str = "cuda", dtype: str = "bfloat16") -> list[list[int]]:
    refuse_fp16(dtype, "the reference model")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from medgemma_triton.spec import ModelSpec

    spec = ModelSpec.from_checkpoint(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).to(device).eval()
    return generate_tokens(model, processor, chats, max_tokens, set(spec.tokens.eos), device)


def served_tokens(url: str, chats, max_tokens: int, stop_ids: set[int], prompt_lengths: list | None = None) -> list[list[int]]:
    """Greedy continuations from the deployment; `prompt_lengths`, when given, receives its prompt_tokens per chat."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    results = []
    for messages, image in chats:
        tensors = {
            "messages": np.array([json.dumps(messages).encode()], dtype=np.object_),
            "max_tokens": np.array([max_tokens], dtype=np.int32),
            "temperature": np.array([0.0], dtype=np.float32),
            "stream": np.array([False]),
        }
        if image is not None:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            tensors["images"] = np.array([buffer.getvalue()], dtype=np.object_)
        inputs = []
        for name, value in tensors.items():
            tensor = grpcclient.InferInput(name, list(value.shape), "BYTES" if value.dtype == np.object_ else
                                           {np.int32: "INT32", np.float32: "FP32", np.bool_: "BOOL"}[value.dtype.type])
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        # `medgemma` is decoupled: collect the responses of one request over a stream.
        responses = []
        client.start_stream(callback=lambda result, error: responses.append((result, error)))
        client.async_stream_infer(TOP_MODEL, inputs, outputs=[grpcclient.InferRequestedOutput("output_ids"),
                                                              grpcclient.InferRequestedOutput("prompt_tokens")])
        client.stop_stream()  # waits for the request's responses
        ids, prompt_tokens = [], None
        for result, error in responses:
            if error is not None:
                raise RuntimeError(f"{url}: {error}")
            ids.extend(result.as_numpy("output_ids").tolist())
            counted = result.as_numpy("prompt_tokens")
            prompt_tokens = int(counted.reshape(-1)[0]) if counted is not None and counted.size else prompt_tokens
        results.append(_strip_stop(ids, stop_ids))
        if prompt_lengths is not None:
            prompt_lengths.append(prompt_tokens)
    return results


def reference_checks(checkpoint: Path, chats, served_prompt_lengths: list[int | None]) -> list[Check]:
    """What the deployment's prompts must be, from the reference's processor: one BOS each, and the served
    prompt_tokens equal to the reference's length (a second BOS or a dropped token shows as a difference)."""
    from transformers import AutoProcessor

    from medgemma_triton.spec import ModelSpec

    spec = ModelSpec.from_checkpoint(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint)
    checks = []
    for index, ((messages, image), served) in enumerate(zip(chats, served_prompt_lengths)):
        ids = image_inputs(processor, messages, image)["input_ids"][0]
        bos = check_one_bos(ids, spec.tokens.bos)
        checks.append(Check(f"one_bos[{index}]", bos.passed, bos.detail))
        checks.append(Check(f"prompt_tokens[{index}]", served == len(ids),
                            f"served prompt_tokens {served}, reference {len(ids)}"))
    return checks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    parser.add_argument("--checkpoint", required=True, help="the HF checkpoint the deployment was built from")
    parser.add_argument("--precision", choices=sorted(THRESHOLDS), required=True)
    parser.add_argument("--quantized-checkpoint", help="the ModelOpt checkpoint the llm serves: every decoder "
                                                       "Linear must carry its quantization")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda", help="where the transformers reference runs")
    parser.add_argument("--dtype", default="bfloat16", help="the reference's dtype: bfloat16 (the model card's) or float32")
    parser.add_argument("--report", default="gpu_acceptance.json")
    parser.add_argument("--latency-cmd", default="{python} benchmarks/latency.py --url {url}",
                        help="the latency benchmark to run after the agreement check ('' to skip)")
    args = parser.parse_args(argv)

    from medgemma_triton.spec import ModelSpec

    refuse_fp16(args.dtype, "--dtype")
    spec = ModelSpec.from_checkpoint(args.checkpoint)
    chats = acceptance_chats(spec.vision.image_size if spec.vision else 224)
    reference = reference_tokens(Path(args.checkpoint), chats, args.max_tokens, device=args.device, dtype=args.dtype)
    prompt_lengths: list = []
    served = served_tokens(args.url, chats, args.max_tokens, set(spec.tokens.eos), prompt_lengths)
    agreement = compare(reference, served)
    threshold = THRESHOLDS[args.precision]
    checks = reference_checks(Path(args.checkpoint), chats, prompt_lengths)
    if args.quantized_checkpoint:
        from medgemma_triton.gpu.dequantize import QuantFormat, quantized_linear_faults, read_tensors

        faults = quantized_linear_faults(read_tensors(args.quantized_checkpoint), QuantFormat.read(args.quantized_checkpoint))
        checks.append(Check("quantized_linears", not faults, "; ".join(faults[:3]) or "every decoder Linear quantized"))
    failed = [c for c in checks if not c.passed]
    ok = agreement.passes(threshold) and not failed
    report = {"precision": args.precision, "threshold": asdict(threshold), "agreement": asdict(agreement),
              "checks": [asdict(c) for c in checks], "passed": ok}
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    for check in failed:
        print(f"FAIL {check.name}: {check.detail}")
    print(f"token agreement ({args.precision}): first token {agreement.first_token:.2f} (>= {threshold.first_token}), "
          f"prefix {agreement.prefix:.2f} (>= {threshold.prefix}); {len(checks) - len(failed)}/{len(checks)} checks "
          f"-> {'PASS' if ok else 'FAIL'}; report {args.report}")
    if args.latency_cmd:
        command = args.latency_cmd.format(python=shlex.quote(sys.executable), url=shlex.quote(args.url))
        ok = subprocess.run(shlex.split(command)).returncode == 0 and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
