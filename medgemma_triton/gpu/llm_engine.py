"""The `llm` model's engine for the gpu profile: TensorRT-LLM's LLM API (PyTorch backend) for Gemma 3.

ASSUMPTIONS the correctness of this engine rests on (asserted in `llm_kwargs` and tested):
1) Chunked prefill is disabled: a prompt's image block must be prefilled in one step, because its
   tokens attend to each other bidirectionally (TensorRT-LLM's Gemma3ForCausalLM asserts
   cached_token_lens == 0 for context requests). So max_num_tokens >= max_input_len.
2) KV-cache block reuse is disabled: a partially matched image block would be wrong.
3) Attention backend FLASHINFER: the only PyTorch-backend attention that takes Gemma 3's custom
   (bidirectional image) mask in TensorRT-LLM 1.1's Gemma3VLM.
4) Per-layer attention windows come from the spec (sliding_window on sliding layers, the full
   sequence on global layers), so the KV cache of sliding layers holds only their window.
5) Image embeddings come from our TensorRT vision engine through trtllm_gemma3.py's patch point;
   TensorRT-LLM's own SigLIP tower is never run (see docs/gpu.md for why).

Token ids and image embeddings in, the cpu profile's token responses out: preprocessing (chat
template, image processing), the vision encoder calls, detokenization and stop words belong to the
profile-independent `medgemma` model (serving/pipeline.py), which stops a request by id when a stop
word matched. The LLM API's tokenizer is loaded by its input processor but never detokenizes
(`detokenize=False`).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import AsyncIterator, Callable

from medgemma_triton.contract import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, FINISH_TIMEOUT
from medgemma_triton.runtime.limits import InvalidRequest, Limits
from medgemma_triton.runtime.sampling import SamplingParams
from medgemma_triton.serving.engine import Chunk, ResponseStream
from medgemma_triton.spec import ModelSpec

ATTENTION_BACKEND = "FLASHINFER"

# The llm model's tensors: the cpu profile's llm (model_repository/llm/config.pbtxt) takes token ids and
# image embeddings and answers with serving.triton_io.TritonResponseStream's tensors; the gpu llm does
# the same, so repository.py requires the cpu config to match these.
LLM_INPUTS = ("input_ids", "image_embeddings", "max_tokens", "temperature", "top_p", "top_k", "random_seed",
              "stream", "timeout_ms", "stop", "stop_reason")
LLM_REQUIRED_INPUTS = ("input_ids", "image_embeddings", "stop", "stop_reason")
LLM_OUTPUTS = ("output_ids", "finish_reason", "prompt_tokens", "completion_tokens")
LLM_REQUIRED_OUTPUTS = LLM_OUTPUTS


@dataclass(frozen=True)
class EngineSettings:
    """Serving knobs that are not in the checkpoint. None means: derive from the spec and limits."""

    max_batch_size: int = 32  # in-flight requests the executor schedules together
    max_input_len: int | None = None  # default: Limits.max_input_tokens
    max_seq_len: int | None = None  # default: max_input_len + Limits.max_new_tokens, capped by the config
    kv_cache_dtype: str = "auto"  # "fp8" or "auto" (the model dtype); repository.py sets it from the recipe
    free_gpu_memory_fraction: float = 0.8  # of the memory left after weights; the rest serves the vision engine
    per_layer_windows: bool = True
    cuda_graphs: bool = True

    @classmethod
    def edge(cls) -> "EngineSettings":
        """Jetson-class settings: few concurrent requests, shorter context, bf16 KV cache (no FP8 on Orin)."""
        return cls(max_batch_size=2, max_input_len=2048, max_seq_len=3072, kv_cache_dtype="auto",
                   free_gpu_memory_fraction=0.5, cuda_graphs=False)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EngineSettings":
        values = json.loads(text)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown engine settings {sorted(unknown)}")
        return cls(**values)


def sequence_limits(spec: ModelSpec, settings: EngineSettings, limits: Limits | None = None) -> tuple[int, int]:
    """(max_input_len, max_seq_len) from the settings, the request limits and the model's context."""
    limits = limits or Limits()
    context = spec.text.max_position_embeddings
    max_input = settings.max_input_len or limits.max_input_tokens
    max_seq = settings.max_seq_len or max_input + limits.max_new_tokens
    max_seq = min(max_seq, context)
    if max_input >= max_seq and settings.max_input_len is None:
        max_input = max_seq // 2  # a short-context model: split it between prompt and reply
    if max_input >= max_seq:
        raise ValueError(f"max_input_len={max_input} leaves no room to generate within max_seq_len={max_seq}")
    if spec.multimodal and max_input < spec.mm_tokens_per_image + 16:
        raise ValueError(f"max_input_len={max_input} cannot hold one image ({spec.mm_tokens_per_image} tokens)")
    return max_input, max_seq


def attention_windows(spec: ModelSpec, max_seq_len: int) -> list[int]:
    """KV-cache attention window per layer: the sliding window on sliding layers, else the whole sequence."""
    return [
        min(spec.text.sliding_window, max_seq_len) if spec.text.is_sliding(layer) else max_seq_len
        for layer in range(spec.text.num_layers)
    ]


def llm_kwargs(spec: ModelSpec, model_dir: str | Path, settings: EngineSettings, limits: Limits | None = None) -> dict:
    """Keyword arguments for tensorrt_llm.LLM (TorchLlmArgs); kv_cache_config as a dict of KvCacheConfig fields."""
    max_input, max_seq = sequence_limits(spec, settings, limits)
    kv_cache = {
        "enable_block_reuse": False,  # assumption 2
        "free_gpu_memory_fraction": settings.free_gpu_memory_fraction,
        "dtype": settings.kv_cache_dtype,
    }
    if settings.per_layer_windows:
        kv_cache["max_attention_window"] = attention_windows(spec, max_seq)
    kwargs = {
        "model": str(model_dir),
        "backend": "pytorch",
        "dtype": "bfloat16",  # Gemma 3 must not run in fp16
        "attn_backend": ATTENTION_BACKEND,  # assumption 3
        "enable_chunked_prefill": False,  # assumption 1
        "kv_cache_config": kv_cache,
        "max_batch_size": settings.max_batch_size,
        "max_input_len": max_input,
        "max_seq_len": max_seq,
        "max_num_tokens": max(max_input, settings.max_batch_size),  # one whole prompt per step, at least
        "trust_remote_code": False,
        "stream_interval": 1,
    }
    if not settings.cuda_graphs:
        kwargs["cuda_graph_config"] = None
    assert kwargs["enable_chunked_prefill"] is False and kv_cache["enable_block_reuse"] is False
    assert kwargs["max_num_tokens"] >= max_input, "without chunked prefill a whole prompt must fit in one step"
    return kwargs


@dataclass
class GenerationRequest:
    input_ids: list[int]
    sampling: SamplingParams  # the cpu profile's validated request options (serving/options.py)
    image_embeddings: object | None = None  # torch tensor [images, mm_tokens, hidden], any device/dtype
    stream: bool = False
    deadline: float | None = None  # time.monotonic() after which generation stops (FINISH_TIMEOUT)

    def validate(self, spec: ModelSpec, max_input_len: int) -> None:
        if not self.input_ids:
            raise InvalidRequest("input_ids is empty")
        if len(self.input_ids) > max_input_len:
            raise InvalidRequest(
                f"prompt is {len(self.input_ids)} tokens; this deployment takes at most {max_input_len} "
                f"(MEDGEMMA_MAX_INPUT_TOKENS / the engine's max_input_len)"
            )
        image_tokens = sum(1 for t in self.input_ids if t == spec.tokens.image)
        images = 0 if self.image_embeddings is None else int(self.image_embeddings.shape[0])
        if image_tokens != images * spec.mm_tokens_per_image:
            raise InvalidRequest(
                f"prompt has {image_tokens} image tokens but {images} image(s) of {spec.mm_tokens_per_image} embeddings"
            )
        if images and tuple(self.image_embeddings.shape[1:]) != (spec.mm_tokens_per_image, spec.text.hidden_size):
            raise InvalidRequest(
                f"image_embeddings shape {tuple(self.image_embeddings.shape)} is not [images, "
                f"{spec.mm_tokens_per_image}, {spec.text.hidden_size}]"
            )


def sampling_kwargs(spec: ModelSpec, sampling: SamplingParams) -> dict:
    """Keyword arguments for tensorrt_llm.SamplingParams. temperature 0 is greedy (the model card's setting).

    Stop words are not passed: `medgemma` applies them to the decoded text for both profiles and
    stops the request by id when one matches.
    """
    kwargs = {
        "max_tokens": sampling.max_tokens,
        "end_id": spec.tokens.eos[0],
        "pad_id": spec.tokens.pad,
        "stop_token_ids": list(spec.tokens.eos),  # eos and <end_of_turn>
        "detokenize": False,
    }
    if sampling.greedy:
        kwargs.update(top_k=1, top_p=None)  # SamplingParams._greedy_decoding: top_k in (None, 1), top_p in (None, 0)
    else:
        kwargs.update(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else None,
            seed=sampling.seed,
        )
    return kwargs


def prompt_inputs(request: GenerationRequest) -> dict:
    """The LLM API prompt: token ids, plus precomputed image embeddings for the trtllm_gemma3 patch."""
    if request.image_embeddings is None:
        return {"prompt_token_ids": list(request.input_ids)}
    import torch

    # TextPrompt dispatches on "multi_modal_embeddings" to the input processor's
    # attach_multimodal_embeddings, which (patched) takes our ids instead of re-tokenizing `prompt`.
    return {
        "prompt": "",
        "multi_modal_embeddings": {
            "image": [request.image_embeddings],
            "input_ids": [torch.as_tensor(request.input_ids, dtype=torch.int32)],
        },
    }


def finish_reason(llm_reason: str | None, aborted: bool = False) -> str:
    """The contract's finish reason for TensorRT-LLM's CompletionOutput.finish_reason."""
    if aborted or llm_reason == "cancelled":
        return FINISH_CANCELLED
    if llm_reason == "length":
        return FINISH_LENGTH
    return FINISH_STOP


async def respond(
    steps: AsyncIterator[tuple[list[int], str | None]],
    request: GenerationRequest,
    stream: ResponseStream,
    eos_ids,
    abort: Callable[[], None],
) -> str:
    """Turn TensorRT-LLM's token steps into the cpu profile's responses (serving.engine.Chunk).

    Finish reasons and token counts follow serving/engine.py's rules, so `medgemma` sees the same
    responses from both profiles. Returns the finish reason. `abort` stops the TensorRT-LLM request.
    """
    eos_ids = frozenset(int(t) for t in eos_ids)
    prompt_tokens, pending, generated = len(request.input_ids), [], 0
    async for new_ids, llm_reason in steps:
        if stream.is_cancelled():
            abort()
            stream.close()
            return FINISH_CANCELLED
        if request.deadline is not None and time.monotonic() >= request.deadline:
            abort()
            stream.send(Chunk(pending, FINISH_TIMEOUT, prompt_tokens, generated), final=True)
            return FINISH_TIMEOUT
        reason = ""
        for token in new_ids:
            pending.append(int(token))
            generated += 1
            if int(token) in eos_ids:
                reason = FINISH_STOP
                break
        if not reason and llm_reason is not None:
            reason = finish_reason(llm_reason)
        if reason and llm_reason is None:  # ended here before TensorRT-LLM said so: stop it
            abort()
        if reason or request.stream:
            stream.send(Chunk(pending, reason, prompt_tokens, generated), final=bool(reason))
            pending = []
        if reason:
            return reason
    raise RuntimeError("TensorRT-LLM ended a request without a finish reason")


class GemmaLLM:
    """One TensorRT-LLM LLM for the `llm` Triton model."""

    def __init__(self, model_dir: str | Path, settings: EngineSettings, limits: Limits | None = None):
        # The embeddings patch registers classes in this process; the executor must build the model here too.
        from medgemma_triton.gpu.pins import SINGLE_PROCESS_WORKER_ENV

        os.environ[SINGLE_PROCESS_WORKER_ENV] = "1"
        from medgemma_triton.gpu import trtllm_gemma3

        trtllm_gemma3.install()
        from tensorrt_llm import LLM
        from tensorrt_llm import SamplingParams as TrtllmSamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig

        self.spec = ModelSpec.from_checkpoint(model_dir)
        self.limits = limits or Limits.from_env()
        self.max_input_len, _ = sequence_limits(self.spec, settings, self.limits)
        kwargs = llm_kwargs(self.spec, model_dir, settings, self.limits)
        kwargs["kv_cache_config"] = KvCacheConfig(**kwargs["kv_cache_config"])
        self._sampling_params = TrtllmSamplingParams
        self.llm = LLM(**kwargs)

    def start(self, request: GenerationRequest):
        """Submit a request; returns (steps, abort): an async iterator of (new token ids, finish reason or None)."""
        request.validate(self.spec, self.max_input_len)
        sampling = self._sampling_params(**sampling_kwargs(self.spec, request.sampling))
        result = self.llm.generate_async(prompt_inputs(request), sampling_params=sampling, streaming=True)

        async def steps():
            sent = 0
            try:
                async for output in result:
                    completion = output.outputs[0]
                    new_ids = list(completion.token_ids[sent:])
                    sent = len(completion.token_ids)
                    yield new_ids, (completion.finish_reason or FINISH_STOP) if output.finished else None
                    if output.finished:
                        return
            except asyncio.CancelledError:
                result.abort()
                raise

        return steps(), result.abort

    def shutdown(self) -> None:
        self.llm.shutdown()
