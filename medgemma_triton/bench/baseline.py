"""The baseline users run today: MedGemma's model-card transformers path, in this process.

    processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=True, return_tensors="pt")
    model.generate(**inputs, max_new_tokens=..., do_sample=False)

one request at a time, on the same checkpoint and the same workload requests as the deployment.
A streamer stamps each generated token, so TTFT, ITL and E2E mean exactly what they mean for the
deployment (TTFT includes the chat template and image processing, as the served model's does).
Imports torch and transformers, so it is only ever loaded for --baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .. import contract
from .metrics import RequestRecord
from .workload import BenchRequest


@dataclass
class TransformersBaseline:
    checkpoint: str
    dtype: str = "auto"  # "auto": bfloat16 on CUDA (the model card's), float32 on CPU
    device: str = "auto"

    def __post_init__(self):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            self.dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        if self.dtype == "float16":
            raise ValueError("Gemma 3 overflows in float16 (empty or garbage output); use bfloat16 or float32")
        self.torch_dtype = getattr(torch, self.dtype)
        self.processor = AutoProcessor.from_pretrained(self.checkpoint)
        self.model = AutoModelForImageTextToText.from_pretrained(self.checkpoint, dtype=self.torch_dtype)
        self.model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])

    def describe(self) -> dict:
        return {"checkpoint": self.checkpoint, "dtype": self.dtype, "device": self.device, "path": "transformers generate"}

    def send(self, request: BenchRequest, index: int) -> RequestRecord:
        import torch
        from transformers.generation.streamers import BaseStreamer

        record = RequestRecord(index=index, start_s=time.perf_counter(), num_images=len(request.images))

        class TokenClock(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate() first hands the streamer the prompt ids
                    self.prompt_seen = True
                    return
                record.content_times_s.append(time.perf_counter())
                record.content_tokens.append(int(value.numel()))

            def end(self):
                pass

        try:
            inputs = self.processor.apply_chat_template(
                request.model_card_messages(),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
            ).to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self.torch_dtype)
            prompt_length = inputs["input_ids"].shape[-1]
            with torch.inference_mode():
                output = self.model.generate(
                    **inputs, max_new_tokens=request.max_tokens, do_sample=False, streamer=TokenClock()
                )
            generated = output[0, prompt_length:].tolist()
            record.input_tokens = int(prompt_length)
            record.output_tokens = len(generated)
            stopped = bool(generated) and generated[-1] in self.eos_ids
            record.finish_reason = contract.FINISH_STOP if stopped else contract.FINISH_LENGTH
        except Exception as exc:  # noqa: BLE001 - a failed request is recorded, the benchmark goes on
            record.error = f"{type(exc).__name__}: {exc}"
        record.end_s = time.perf_counter()
        return record

    def run(self, requests: list[BenchRequest], count: int, warmup: int = 1, on_done=lambda r: None) -> list[RequestRecord]:
        """`count` requests one after another (after `warmup` unmeasured ones), as the model card runs."""
        for k in range(warmup):
            self.send(requests[(len(requests) - 1 - k) % len(requests)], -1)
        records = []
        for index in range(count):
            record = self.send(requests[index % len(requests)], index)
            records.append(record)
            on_done(record)
        return records
