"""GPU acceptance: check a running gpu deployment against the transformers reference, then run the
latency benchmark. Run inside the pinned container, next to the server:

    python -m medgemma_triton.gpu.verify --url localhost:8001 --checkpoint /models/medgemma-4b-it --precision fp8

Token agreement on a fixed prompt set (text-only and image chats; greedy, the model card's setting):
for each prompt, the served ids are compared with transformers' `generate` in bf16 on the same GPU.
`first_token` is the share of prompts whose first generated token matches; `prefix` is the mean share
of the reference continuation reproduced before the first difference. Quantized models drift after a
while by design, so the thresholds are per precision (THRESHOLDS); bf16 must match almost exactly.
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


def reference_tokens(checkpoint: Path, chats, max_tokens: int, device: str = "cuda") -> list[list[int]]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from medgemma_triton.spec import ModelSpec

    spec = ModelSpec.from_checkpoint(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.bfloat16).to(device).eval()
    return generate_tokens(model, processor, chats, max_tokens, set(spec.tokens.eos), device)


def served_tokens(url: str, chats, max_tokens: int, stop_ids: set[int]) -> list[list[int]]:
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
        # The ensemble is decoupled: collect the responses of one request over a stream.
        responses = []
        client.start_stream(callback=lambda result, error: responses.append((result, error)))
        client.async_stream_infer(TOP_MODEL, inputs, outputs=[grpcclient.InferRequestedOutput("output_ids")])
        client.stop_stream()  # waits for the request's responses
        ids = []
        for result, error in responses:
            if error is not None:
                raise RuntimeError(f"{url}: {error}")
            ids.extend(result.as_numpy("output_ids").tolist())
        results.append(_strip_stop(ids, stop_ids))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    parser.add_argument("--checkpoint", required=True, help="the HF checkpoint the deployment was built from")
    parser.add_argument("--precision", choices=sorted(THRESHOLDS), required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--report", default="gpu_acceptance.json")
    parser.add_argument("--latency-cmd", default="{python} benchmarks/latency.py --url {url}",
                        help="the latency benchmark to run after the agreement check ('' to skip)")
    args = parser.parse_args(argv)

    from medgemma_triton.spec import ModelSpec

    spec = ModelSpec.from_checkpoint(args.checkpoint)
    chats = acceptance_chats(spec.vision.image_size if spec.vision else 224)
    reference = reference_tokens(Path(args.checkpoint), chats, args.max_tokens)
    served = served_tokens(args.url, chats, args.max_tokens, set(spec.tokens.eos))
    agreement = compare(reference, served)
    threshold = THRESHOLDS[args.precision]
    ok = agreement.passes(threshold)
    report = {"precision": args.precision, "threshold": asdict(threshold), "agreement": asdict(agreement), "passed": ok}
    Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(f"token agreement ({args.precision}): first token {agreement.first_token:.2f} (>= {threshold.first_token}), "
          f"prefix {agreement.prefix:.2f} (>= {threshold.prefix}) -> {'PASS' if ok else 'FAIL'}; report {args.report}")
    if args.latency_cmd:
        command = args.latency_cmd.format(python=shlex.quote(sys.executable), url=shlex.quote(args.url))
        ok = subprocess.run(shlex.split(command)).returncode == 0 and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
