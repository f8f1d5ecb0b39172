"""The `llm` model's engine for the gpu profile: TensorRT-LLM's LLM API (PyTorch backend) for Gemma 3.

ASSUMPTIONS the correctness of this engine rests on (asserted in `llm_kwargs` and tested):
1) Chunked prefill is disabled: a prompt's image block must be prefilled in one step, because its
   tokens attend to each other bidirectionally (TensorRT-LLM's Gemma3ForCausalLM asserts
   cached_token_lens == 0 for context requests). So max_num_tokens >= max_input_len.
2) KV-cache block reuse is disabled: a partially matched image block would be wrong.
3) Attention backend FLASHINFER: the only PyTorch-backend attention that takes Gemma 3's custom
   (bidirectional image) mask; Gemma3VLM forces it on its text model (1.1 through 1.2.1).
4) One KV-cache window for every layer (kv_cache_config.max_attention_window unset): with per-layer
   windows the KV cache manager is "VSWA", and FlashInfer's metadata asks it for block ids without a
   window size, which it refuses ("layer_idx or window_size must be provided for VSWA"; docs/gpu.md). Sliding
   layers still attend only within their window: Gemma3Attention passes it to the backend.
5) CUDA graphs off (cuda_graph_config=None), as in NVIDIA's Gemma 3 VLM recipe; `cuda_graphs=True`
   is a setting to measure, not a default.
6) Image embeddings come from our TensorRT vision engine through trtllm_gemma3.py's patch point;
   TensorRT-LLM's own SigLIP tower is never run (see docs/gpu.md for why). They are handed to the
   LLM API on the host: it turns the prompt's tensors into shared-tensor handles (CUDA IPC for GPU
   tensors), which the executor, in this same process, could not open.

7) The queue gauge (`medgemma_queued_requests`, the autoscaler's signal) reads TensorRT-LLM's iteration
   statistics, which the PyTorch backend records only with `enable_iter_perf_stats` (`llm_kwargs`).
   Their `numQueuedRequests` counts the executor's request queue alone, which it empties into its
   waiting queue every iteration; the requests waiting for one of its `maxNumActiveRequests` slots are
   what we hand it minus its `numActiveRequests` (`waiting_requests`; sources in docs/gpu.md).
8) Sampler named: TorchSampler (`sampler_type`), not left to "auto", whose rule has moved between
   releases. Since 1.2 TorchSampler uses FlashInfer's sampling kernels by default, but a greedy request
   (top_k=1, `sampling_kwargs`) is resolved to its greedy strategy, an argmax over the logits that
   FlashInfer does not touch, so greedy output stays transformers' greedy output. Sampled requests do
   use FlashInfer's kernels: the same distributions, a different random stream for a given seed.
   `disable_flashinfer_sampling` is not passed: upstream marks it for removal (docs/gpu.md).

Token ids and image embeddings in, the cpu profile's token responses out: preprocessing (chat
template, image processing), the vision encoder calls, detokenization and stop words belong to the
profile-independent `medgemma` model (serving/pipeline.py), which stops a request by id when a stop
word matched. The LLM API's tokenizer is loaded by its input processor but never detokenizes
(`detokenize=False`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import AsyncIterator, Callable

from medgemma_triton import contract
from medgemma_triton.contract import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, FINISH_TIMEOUT
from medgemma_triton.runtime.limits import InvalidRequest, Limits
from medgemma_triton.runtime.sampling import SamplingParams
from medgemma_triton.serving.engine import Chunk, Counters, NoCounters, ResponseStream
from medgemma_triton.serving.stops import StopRegistry, request_id_or_new
from medgemma_triton.spec import ModelSpec

ATTENTION_BACKEND = "FLASHINFER"
SAMPLER_TYPE = "TorchSampler"  # assumption 8
QUEUE_SAMPLE_S = 1.0  # how often the llm reads TensorRT-LLM's iteration statistics for its queue gauge
STATS_WAIT_S = 0.05  # how long one read waits for a further record before it takes what it has

# The llm model's tensors: the cpu profile's llm (model_repository/llm/config.pbtxt) takes token ids and
# image embeddings and answers with serving.triton_io.TritonResponseStream's tensors; the gpu llm does
# the same, so repository.py requires the cpu config to match these.
LLM_INPUTS = contract.LLM_INPUTS + contract.LLM_CONTROL_INPUTS
LLM_REQUIRED_INPUTS = contract.GPU_LLM_REQUIRED_INPUTS
LLM_OUTPUTS = contract.LLM_OUTPUTS
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
        """Small-GPU settings (L4-class, 24 GB): few concurrent requests, shorter context, bf16 KV cache.

        Not for Jetson: public TensorRT-LLM does not run there (docs/gpu.md, "The edge")."""
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
        "sampler_type": SAMPLER_TYPE,  # assumption 8
        "enable_chunked_prefill": False,  # assumption 1
        "kv_cache_config": kv_cache,
        "max_batch_size": settings.max_batch_size,
        "max_input_len": max_input,
        "max_seq_len": max_seq,
        "max_num_tokens": max(max_input, settings.max_batch_size),  # one whole prompt per step, at least
        "trust_remote_code": False,
        "stream_interval": 1,
        "enable_iter_perf_stats": True,  # assumption 7: off by default, and the queue gauge reads them
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
        kwargs.update(top_k=1, top_p=None)  # SamplingParams.params_imply_greedy_decoding: top_k == 1 is greedy
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


@dataclass(frozen=True)
class ExecutorLoad:
    """The fields of one TensorRT-LLM iteration-stats record the queue gauge reads.

    A record is `IterationStats.to_json_str()` parsed back into a dict, as `LLM.get_stats_async` yields
    it; the executor writes one per iteration (PyExecutor._update_iter_stats).
    """

    active: int  # numActiveRequests: requests it has admitted, each holding one of its slots
    queued: int  # numQueuedRequests: requests still in its request queue, not yet in its waiting queue
    max_active: int  # maxNumActiveRequests: its slots (max_batch_size for one pipeline stage)

    @classmethod
    def from_record(cls, record: dict) -> "ExecutorLoad":
        return cls(int(record["numActiveRequests"]), int(record["numQueuedRequests"]),
                   int(record["maxNumActiveRequests"]))


def waiting_requests(in_executor: int, load: ExecutorLoad | None, max_active: int) -> int:
    """Requests handed to TensorRT-LLM that it has not admitted yet (its request and waiting queues).

    `in_executor`: requests generate_async has taken and that have not finished (our own count, live).
    `load`: the newest iteration record, or None when none came since the last look: LLM.get_stats_async
    yields nothing after one of its reads has timed out until the next generate_async, so under a steady
    backlog with no arrivals the records pause. Then the executor is taken to have filled its
    `max_active` slots (the last record's maxNumActiveRequests), as it does every iteration while
    requests wait.
    """
    if load is None:
        return max(0, in_executor - max_active)
    return min(in_executor, max(0, load.queued, in_executor - load.active))


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

    def __init__(self, spec: ModelSpec, llm, sampling_params_cls, max_input_len: int, limits: Limits,
                 max_active_requests: int = EngineSettings.max_batch_size):
        """`llm` is a tensorrt_llm.LLM (see `load`); tests give a stand-in with the same generate_async
        and get_stats_async. `max_active_requests`: the executor's slots (EngineSettings.max_batch_size)."""
        self.spec, self.llm, self.limits = spec, llm, limits
        self._sampling_params = sampling_params_cls
        self.max_input_len = max_input_len
        self.max_active_requests = max_active_requests

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
        return cls(spec, LLM(**kwargs), TrtllmSamplingParams, max_input_len, limits, settings.max_batch_size)

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

    async def latest_load(self, wait_s: float = STATS_WAIT_S) -> ExecutorLoad | None:
        """The newest iteration record TensorRT-LLM wrote since the last call (read for at most about
        `wait_s`), or None when none came within `wait_s`.

        Must run on the loop that called generate_async: the LLM API made its stats queue there.
        """
        loop = asyncio.get_running_loop()
        stop_at, newest = loop.time() + wait_s, None
        async for record in self.llm.get_stats_async(timeout=wait_s):
            newest = record
            if loop.time() >= stop_at:
                break  # a busy executor writes a record every iteration, so the stream never runs dry
        return None if newest is None else ExecutorLoad.from_record(newest)

    def shutdown(self) -> None:
        self.llm.shutdown()


class _CountedStream:
    """A ResponseStream that counts the tokens it sends (medgemma_generated_tokens_total, as the cpu llm)."""

    def __init__(self, stream: ResponseStream, counters: Counters):
        self._stream, self._counters = stream, counters

    def send(self, chunk: Chunk, final: bool) -> None:
        self._counters.generated_tokens(len(chunk.output_ids))
        self._stream.send(chunk, final)

    def fail(self, message: str, invalid_request: bool) -> None:
        self._stream.fail(message, invalid_request)

    def close(self) -> None:
        self._stream.close()

    def is_cancelled(self) -> bool:
        return self._stream.is_cancelled()


class RequestLoop:
    """The gpu `llm` model's request loop: an asyncio loop on its own thread serving GemmaLLM requests.

    Triton's execute() hands each request here and returns at once, so TensorRT-LLM's executor batches
    requests in flight. A `stop` request names its target by request id and is kept in a StopRegistry
    (shared rules with the cpu engine): a stop that comes before its request (still encoding its
    images in `medgemma`, say) ends that request as soon as it arrives, before TensorRT-LLM sees it.
    Requests without an id get a unique one, so they never share an abort handle.

    Every `queue_sample_s` the loop sets `counters.queued` (medgemma_queued_requests, the autoscaler's
    signal) to the requests waiting for a slot: those accepted here and not yet handed to TensorRT-LLM,
    plus those it holds without a slot (`waiting_requests`); and `counters.active` to those in a slot.
    """

    def __init__(self, engine: GemmaLLM, stops: StopRegistry | None = None, counters: Counters | None = None,
                 queue_sample_s: float = QUEUE_SAMPLE_S):
        self.engine = engine
        self.stops = stops or StopRegistry()
        self.counters = counters or NoCounters()
        self._aborts: dict[str, Callable[[], None]] = {}  # request id -> abort of its TensorRT-LLM request (loop thread only)
        self._not_started = 0  # submitted, not yet handed to generate_async (any thread: under _count_lock)
        self._count_lock = threading.Lock()
        self._in_executor = 0  # handed to generate_async, not finished (loop thread only)
        self._handed_over = False  # before the first generate_async the LLM API has no stats to read
        self._max_active = engine.max_active_requests  # the executor's slots, as its last record said (loop thread)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="llm-asyncio", daemon=True)
        self._thread.start()
        self._sampler = asyncio.run_coroutine_threadsafe(self._start_sampler(queue_sample_s), self.loop).result()

    def submit(self, request_id: str | None, prepare: Callable[[], GenerationRequest], stream: ResponseStream):
        """Serve a request (from any thread). `prepare` parses it into a GenerationRequest on the loop
        thread and may raise InvalidRequest. Returns a concurrent.futures.Future of the finish reason."""
        request_id = request_id_or_new(request_id)
        with self._count_lock:
            self._not_started += 1
        return asyncio.run_coroutine_threadsafe(self._serve(request_id, prepare, stream), self.loop)

    def stop(self, request_id: str, reason: str = FINISH_CANCELLED) -> None:
        """Stop the request with this id (from any thread), whether it has started, or not yet arrived."""
        self.stops.stop(request_id, reason)
        self.loop.call_soon_threadsafe(self._abort_if_running, request_id)

    def _abort_if_running(self, request_id: str) -> None:
        abort = self._aborts.get(request_id)
        if abort is not None:
            abort()

    def _started(self, in_executor: int) -> None:
        with self._count_lock:
            self._not_started -= 1
        self._in_executor += in_executor

    async def _serve(self, request_id: str, prepare, stream: ResponseStream) -> str | None:
        self.stops.forget_old()
        in_executor = 0
        try:
            if self.stops.reason(request_id) is not None:  # stopped before it arrived
                self._started(0)
                stream.close()
                return self.stops.reason(request_id)
            try:
                generation = prepare()
                steps, abort = self.engine.start(generation)
            except BaseException:
                self._started(0)
                raise
            in_executor, self._handed_over = 1, True
            self._started(in_executor)
            # No await between the check above and this line: a stop() from now on finds the abort.
            self._aborts[request_id] = abort
            reason = await respond(steps, generation, _CountedStream(stream, self.counters),
                                   self.engine.spec.tokens.eos, abort, stop_reason=lambda: self.stops.reason(request_id))
            if reason == FINISH_CANCELLED:
                self.counters.cancelled()
            self.counters.finished(reason)
            return reason
        except InvalidRequest as exc:
            stream.fail(str(exc), invalid_request=True)
        except Exception as exc:  # noqa: BLE001 - every request gets its final response
            stream.fail(f"llm: {exc}", invalid_request=False)
        finally:
            self._in_executor -= in_executor
            self._aborts.pop(request_id, None)
            self.stops.forget(request_id)
        return None

    def queued_requests(self, load: ExecutorLoad | None) -> int:
        """medgemma_queued_requests (loop thread): not yet handed over, plus held by TensorRT-LLM without a slot."""
        with self._count_lock:
            not_started = self._not_started
        return not_started + waiting_requests(self._in_executor, load, self._max_active)

    async def _start_sampler(self, period_s: float) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(self._sample_queue(period_s), name="llm-queue-gauge")

    async def _stop_sampler(self) -> None:
        self._sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._sampler

    async def _sample_queue(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            load = None
            if self._handed_over:  # before that, get_stats_async only prints that it has nothing
                try:
                    load = await self.engine.latest_load()
                except Exception:  # noqa: BLE001 - a stats hiccup must not stop the gauge; next period retries
                    load = None
            if load is not None:
                self._max_active = load.max_active
            self.counters.queued(self.queued_requests(load))
            active = self._in_executor if load is None else load.active
            self.counters.active(min(active, self._in_executor, self._max_active))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        asyncio.run_coroutine_threadsafe(self._stop_sampler(), self.loop).result(timeout=timeout_s)
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=timeout_s)
