"""The `llm` model's engine for the gpu profile: TensorRT-LLM's LLM API (PyTorch backend) for Gemma 3.

ASSUMPTIONS the correctness of this engine rests on (asserted in `llm_kwargs` and tested):
1) Chunked prefill is disabled: a prompt's image block must be prefilled in one step, because its
   tokens attend to each other bidirectionally (TensorRT-LLM's Gemma3ForCausalLM asserts
   cached_token_lens == 0 for context requests). So max_num_tokens >= max_input_len.
2) KV-cache block reuse is disabled: a partially matched image block would be wrong.
3) Attention backend FLASHINFER: the only PyTorch-backend attention that takes Gemma 3's custom
   (bidirectional image) mask in TensorRT-LLM 1.1's Gemma3VLM.
4) One KV-cache window for every layer (kv_cache_config.max_attention_window unset): with per-layer
   windows the KV cache manager is "VSWA", and FlashInfer's metadata asks it for block ids without a
   window size, which it refuses ("window_size must be provided for VSWA"; docs/gpu.md). Sliding
   layers still attend only within their window: Gemma3Attention passes it to the backend.
5) CUDA graphs off (cuda_graph_config=None), as in NVIDIA's Gemma 3 VLM recipe; `cuda_graphs=True`
   is a setting to measure, not a default.
6) Image embeddings come from our TensorRT vision engine through trtllm_gemma3.py's patch point;
   TensorRT-LLM's own SigLIP tower is never run (see docs/gpu.md for why). They are handed to the
   LLM API on the host: it turns the prompt's tensors into shared-tensor handles (CUDA IPC for GPU
   tensors), which the executor, in this same process, could not open.

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
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import AsyncIterator, Callable

from medgemma_triton.contract import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, FINISH_TIMEOUT
from medgemma_triton.runtime.limits import InvalidRequest, Limits
from medgemma_triton.runtime.sampling import SamplingParams
from medgemma_triton.serving.engine import Chunk, ResponseStream
from medgemma_triton.serving.stops import StopRegistry, request_id_or_new
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
    cuda_graphs: bool = False  # assumption 5

    @classmethod
    def edge(cls) -> "EngineSettings":
        """Jetson-class settings: few concurrent requests, shorter context, bf16 KV cache (no FP8 on Orin)."""
        return cls(max_batch_size=2, max_input_len=2048, max_seq_len=3072, kv_cache_dtype="auto",
                   free_gpu_memory_fraction=0.5)

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


def llm_kwargs(spec: ModelSpec, model_dir: str | Path, settings: EngineSettings, limits: Limits | None = None) -> dict:
    """Keyword arguments for tensorrt_llm.LLM (TorchLlmArgs); kv_cache_config as a dict of KvCacheConfig fields."""
    max_input, max_seq = sequence_limits(spec, settings, limits)
    kv_cache = {
        "enable_block_reuse": False,  # assumption 2
        "free_gpu_memory_fraction": settings.free_gpu_memory_fraction,
        "dtype": settings.kv_cache_dtype,
    }
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
        kwargs["cuda_graph_config"] = None  # TorchLlmArgs defaults to a CudaGraphConfig: off must be said
    assert kwargs["enable_chunked_prefill"] is False and kv_cache["enable_block_reuse"] is False
    assert "max_attention_window" not in kv_cache, "assumption 4: FlashInfer cannot serve per-layer windows"
    assert kwargs["max_num_tokens"] >= max_input, "without chunked prefill a whole prompt must fit in one step"
    return kwargs


@dataclass
class GenerationRequest:
    input_ids: list[int]
    sampling: SamplingParams  # the cpu profile's validated request options (serving/options.py)
    image_embeddings: object | None = None  # [images, mm_tokens, hidden]: numpy or torch, any device/dtype
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


def host_embeddings(image_embeddings):
    """[images, mm_tokens, hidden] as a torch tensor in host memory (assumption 6), from numpy or torch."""
    import numpy as np
    import torch

    if isinstance(image_embeddings, torch.Tensor):
        return image_embeddings.detach().to(device="cpu")
    return torch.tensor(np.asarray(image_embeddings))


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
            "image": [host_embeddings(request.image_embeddings)],
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
    stop_reason: Callable[[], str | None] = lambda: None,
) -> str:
    """Turn TensorRT-LLM's token steps into the cpu profile's responses (serving.engine.Chunk).

    Finish reasons and token counts follow serving/engine.py's rules, so `medgemma` sees the same
    responses from both profiles. Returns the finish reason. `abort` stops the TensorRT-LLM request;
    `stop_reason` says whether a `stop` request named this one (checked every step, as the cpu engine
    does): it ends like a cancelled one, closed without further data.
    """
    eos_ids = frozenset(int(t) for t in eos_ids)
    prompt_tokens, pending, generated = len(request.input_ids), [], 0
    async for new_ids, llm_reason in steps:
        stopped = stop_reason()
        if stopped is None and stream.is_cancelled():
            stopped = FINISH_CANCELLED
        if stopped is not None:
            abort()
            stream.close()
            return stopped
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

    def __init__(self, spec: ModelSpec, llm, sampling_params_cls, max_input_len: int, limits: Limits):
        """`llm` is a tensorrt_llm.LLM (see `load`); tests give a stand-in with the same generate_async."""
        self.spec, self.llm, self.limits = spec, llm, limits
        self._sampling_params = sampling_params_cls
        self.max_input_len = max_input_len

    @classmethod
    def load(cls, model_dir: str | Path, settings: EngineSettings, limits: Limits | None = None) -> "GemmaLLM":
        # The embeddings patch registers classes in this process; the executor must build the model here too.
        from medgemma_triton.gpu.pins import SINGLE_PROCESS_WORKER_ENV

        os.environ[SINGLE_PROCESS_WORKER_ENV] = "1"
        from medgemma_triton.gpu import trtllm_gemma3

        trtllm_gemma3.install()
        from tensorrt_llm import LLM
        from tensorrt_llm import SamplingParams as TrtllmSamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig

        spec = ModelSpec.from_checkpoint(model_dir)
        limits = limits or Limits.from_env()
        max_input_len, _ = sequence_limits(spec, settings, limits)
        kwargs = llm_kwargs(spec, model_dir, settings, limits)
        kwargs["kv_cache_config"] = KvCacheConfig(**kwargs["kv_cache_config"])
        return cls(spec, LLM(**kwargs), TrtllmSamplingParams, max_input_len, limits)

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


class RequestLoop:
    """The gpu `llm` model's request loop: an asyncio loop on its own thread serving GemmaLLM requests.

    Triton's execute() hands each request here and returns at once, so TensorRT-LLM's executor batches
    requests in flight. A `stop` request names its target by request id and is kept in a StopRegistry
    (shared rules with the cpu engine): a stop that comes before its request (still encoding its
    images in `medgemma`, say) ends that request as soon as it arrives, before TensorRT-LLM sees it.
    Requests without an id get a unique one, so they never share an abort handle.
    """

    def __init__(self, engine: GemmaLLM, stops: StopRegistry | None = None):
        self.engine = engine
        self.stops = stops or StopRegistry()
        self._aborts: dict[str, Callable[[], None]] = {}  # request id -> abort of its TensorRT-LLM request (loop thread only)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="llm-asyncio", daemon=True)
        self._thread.start()

    def submit(self, request_id: str | None, prepare: Callable[[], GenerationRequest], stream: ResponseStream):
        """Serve a request (from any thread). `prepare` parses it into a GenerationRequest on the loop
        thread and may raise InvalidRequest. Returns a concurrent.futures.Future of the finish reason."""
        request_id = request_id_or_new(request_id)
        return asyncio.run_coroutine_threadsafe(self._serve(request_id, prepare, stream), self.loop)

    def stop(self, request_id: str, reason: str = FINISH_CANCELLED) -> None:
        """Stop the request with this id (from any thread), whether it has started, or not yet arrived."""
        self.stops.stop(request_id, reason)
        self.loop.call_soon_threadsafe(self._abort_if_running, request_id)

    def _abort_if_running(self, request_id: str) -> None:
        abort = self._aborts.get(request_id)
        if abort is not None:
            abort()

    async def _serve(self, request_id: str, prepare, stream: ResponseStream) -> str | None:
        self.stops.forget_old()
        try:
            if self.stops.reason(request_id) is not None:  # stopped before it arrived
                stream.close()
                return self.stops.reason(request_id)
            generation = prepare()
            steps, abort = self.engine.start(generation)
            # No await between the check above and this line: a stop() from now on finds the abort.
            self._aborts[request_id] = abort
            return await respond(steps, generation, stream, self.engine.spec.tokens.eos, abort,
                                 stop_reason=lambda: self.stops.reason(request_id))
        except InvalidRequest as exc:
            stream.fail(str(exc), invalid_request=True)
        except Exception as exc:  # noqa: BLE001 - every request gets its final response
            stream.fail(f"llm: {exc}", invalid_request=False)
        finally:
            self._aborts.pop(request_id, None)
            self.stops.forget(request_id)
        return None

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=timeout_s)
