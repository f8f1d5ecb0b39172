"""The gpu profile, tested without a GPU: configs against Triton's schema, the TensorRT engine plan,
the TensorRT-LLM arguments against the pinned API surface (pins.py, captured from its source),
and ModelOpt PTQ run for real on CPU for the tiny checkpoint.

What these tests cannot check (TensorRT engine build, TensorRT-LLM loading and serving, the
embeddings patch) is listed in docs/gpu.md and checked by medgemma_triton/gpu/verify.py on a GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from medgemma_triton.gpu import pins, trt_vision
from medgemma_triton.gpu.llm_engine import (
    LLM_OUTPUTS,
    EngineSettings,
    ExecutorLoad,
    GemmaLLM,
    GenerationRequest,
    RequestLoop,
    finish_reason,
    llm_kwargs,
    prompt_inputs,
    sampling_kwargs,
    sequence_limits,
    waiting_requests,
)
from medgemma_triton.gpu.quantize import EXCLUDED_MODULES, recipe_for
from medgemma_triton.repository.gpu import (
    GPU_TEMPLATES,
    RepositoryError,
    write_gpu_configs,
)
from medgemma_triton.runtime.limits import InvalidRequest, Limits
from medgemma_triton.spec import CheckpointError, ModelSpec, medgemma_4b_config

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def spec_4b(tiny_checkpoint, tmp_path_factory) -> ModelSpec:
    """The 4B geometry with the tiny checkpoint's tokenizer files (no weights: spec only)."""
    root = tmp_path_factory.mktemp("medgemma-4b-geometry")
    published = medgemma_4b_config()  # google/medgemma-4b-it's config.json as published
    (root / "config.json").write_text(json.dumps(published))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tiny_checkpoint / name).exists():
            os.symlink(tiny_checkpoint / name, root / name)
    processor = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    size = published["vision_config"]["image_size"]
    processor["size"] = {"height": size, "width": size}
    (root / "preprocessor_config.json").write_text(json.dumps(processor))
    (root / "model.safetensors").write_bytes(b"")
    return ModelSpec.from_checkpoint(root)


@pytest.fixture(scope="session")
def tiny_spec(tiny_checkpoint) -> ModelSpec:
    return ModelSpec.from_checkpoint(tiny_checkpoint)


def _parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


# ---- config.pbtxt files ------------------------------------------------------------------------


def test_gpu_templates_parse_against_triton_schema():
    vision = _parse(GPU_TEMPLATES / "vision_encoder" / "config.pbtxt")
    llm = _parse(GPU_TEMPLATES / "llm" / "config.pbtxt")
    assert vision.platform == "tensorrt_plan" and vision.max_batch_size > 0
    assert vision.HasField("dynamic_batching")
    assert vision.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert llm.backend == "python" and llm.model_transaction_policy.decoupled
    assert set(llm.parameters) >= {"checkpoint", "engine_settings"}
    assert (GPU_TEMPLATES / "llm" / "1" / "model.py").is_file()


def _cpu_templates(tmp_path: Path) -> Path:
    """A copy of the cpu profile's templates (model_repository/), which the gpu build reads."""
    import shutil

    return Path(shutil.copytree(REPO_ROOT / "model_repository", tmp_path / "cpu"))


@pytest.mark.parametrize("geometry", ["tiny", "4b"])
def test_generated_gpu_repository_configs(geometry, tiny_spec, spec_4b, tiny_checkpoint, tmp_path):
    from medgemma_triton.repository.config import load_configs, validate_configs

    spec = tiny_spec if geometry == "tiny" else spec_4b
    plan = trt_vision.plan_vision_engine(spec, max_batch_size=8)
    settings = EngineSettings(kv_cache_dtype="fp8")
    repo = tmp_path / "repo"
    written = write_gpu_configs(spec, tiny_checkpoint, repo, settings, plan)
    assert set(written) == {"medgemma", "preprocessing", "vision_encoder", "llm"}

    configs = load_configs(repo)  # every file re-parsed against Triton's schema
    validate_configs(configs)  # as for the cpu profile: names, the pipeline's wiring, dtypes, the contract
    vision = configs["vision_encoder"]
    image = spec.vision.image_size
    assert vision.platform == "tensorrt_plan" and vision.max_batch_size == plan.max_batch == 8
    assert list(vision.input[0].dims) == [3, image, image]
    assert list(vision.output[0].dims) == [spec.mm_tokens_per_image, spec.text.hidden_size]
    assert list(vision.dynamic_batching.preferred_batch_size) == [plan.opt_batch, plan.max_batch]
    assert vision.input[0].data_type == model_config_pb2.TYPE_FP32

    llm, cpu_llm = configs["llm"], _parse(REPO_ROOT / "model_repository" / "llm" / "config.pbtxt")
    assert [t.name for t in llm.input] == [t.name for t in cpu_llm.input]
    assert [t.name for t in llm.output] == [t.name for t in cpu_llm.output] == list(LLM_OUTPUTS)
    embeddings = next(t for t in llm.input if t.name == "image_embeddings")
    assert list(embeddings.dims) == [-1, spec.mm_tokens_per_image, spec.text.hidden_size]
    assert configs["medgemma"].parameters["vision_max_batch_size"].string_value == "8"  # the plan's max batch
    assert llm.model_transaction_policy.decoupled and llm.backend == "python"
    assert EngineSettings.from_json(llm.parameters["engine_settings"].string_value) == settings
    for name in ("preprocessing", "medgemma"):  # relocatable: their checkpoint files are in the repository
        assert configs[name].parameters["checkpoint"].string_value == "checkpoint"
        assert (repo / name / "1" / "checkpoint" / "tokenizer.json").is_file()
    assert (repo / "llm" / "1" / "model.py").read_text() == (GPU_TEMPLATES / "llm" / "1" / "model.py").read_text()
    assert (repo / "preprocessing" / "1" / "model.py").is_file() and (repo / "vision_encoder" / "1").is_dir()


def test_gpu_llm_refuses_cpu_llm_it_cannot_serve(tiny_spec, tiny_checkpoint, tmp_path):
    cpu = _cpu_templates(tmp_path)
    text = (cpu / "llm" / "config.pbtxt").read_text().replace('"input_ids"', '"token_ids"')
    (cpu / "llm" / "config.pbtxt").write_text(text)
    plan = trt_vision.plan_vision_engine(tiny_spec)
    with pytest.raises(RepositoryError, match="input 'input_ids' missing"):
        write_gpu_configs(tiny_spec, tiny_checkpoint, tmp_path / "repo", EngineSettings(), plan, cpu_templates=cpu)


# ---- TensorRT vision engine plan ---------------------------------------------------------------


def test_vision_plan_4b_geometry(spec_4b):
    plan = trt_vision.plan_vision_engine(spec_4b, max_batch_size=8)
    assert plan.profile == {"min": (1, 3, 896, 896), "opt": (4, 3, 896, 896), "max": (8, 3, 896, 896)}
    assert plan.output_shape == (256, 2560)
    assert plan.precision == "bf16"


def test_vision_plan_tiny_geometry(tiny_spec):
    plan = trt_vision.plan_vision_engine(tiny_spec, max_batch_size=3, opt_batch_size=1, precision="fp16")
    size = tiny_spec.vision.image_size
    assert plan.profile["min"] == (1, 3, size, size) and plan.profile["max"] == (3, 3, size, size)
    assert plan.output_shape == (tiny_spec.mm_tokens_per_image, tiny_spec.text.hidden_size)


def test_vision_plan_rejects_bad_settings(tiny_spec):
    with pytest.raises(ValueError, match="precision"):
        trt_vision.plan_vision_engine(tiny_spec, precision="int8")
    with pytest.raises(ValueError, match="opt_batch_size"):
        trt_vision.plan_vision_engine(tiny_spec, max_batch_size=2, opt_batch_size=4)
    with pytest.raises(CheckpointError, match="no vision tower"):
        trt_vision.plan_vision_engine(replace(tiny_spec, vision=None, architecture="Gemma3ForCausalLM"))


# ---- TensorRT-LLM arguments against the pinned API surface -------------------------------------


@pytest.mark.parametrize("geometry", ["tiny", "4b"])
@pytest.mark.parametrize("settings", [EngineSettings(), EngineSettings(kv_cache_dtype="fp8"), EngineSettings.edge()])
def test_llm_args_are_pinned_fields_and_gemma3_settings(geometry, settings, tiny_spec, spec_4b):
    spec = tiny_spec if geometry == "tiny" else spec_4b
    kwargs = llm_kwargs(spec, "/models/llm/1/checkpoint", settings)
    assert set(kwargs) <= pins.TORCH_LLM_ARGS_FIELDS, set(kwargs) - pins.TORCH_LLM_ARGS_FIELDS
    assert set(kwargs["kv_cache_config"]) <= pins.KV_CACHE_CONFIG_FIELDS
    assert kwargs["attn_backend"] == "FLASHINFER" and kwargs["attn_backend"] in pins.ATTENTION_BACKENDS
    assert kwargs["enable_chunked_prefill"] is False
    assert kwargs["kv_cache_config"]["enable_block_reuse"] is False
    assert kwargs["dtype"] == "bfloat16" and kwargs["backend"] == "pytorch"
    assert kwargs["max_num_tokens"] >= kwargs["max_input_len"]
    assert kwargs["max_seq_len"] <= spec.text.max_position_embeddings
    # FlashInfer's metadata cannot serve a per-layer (VSWA) KV cache, through 1.2.1 (docs/gpu.md)
    assert "max_attention_window" not in kwargs["kv_cache_config"]
    # the sampler is named, not left to "auto"; FlashInfer sampling stays on (greedy is an argmax either way)
    assert kwargs["sampler_type"] == "TorchSampler" and kwargs["sampler_type"] in pins.SAMPLER_TYPES
    assert "disable_flashinfer_sampling" not in kwargs
    # NVIDIA's Gemma 3 VLM recipe runs without CUDA graphs; TorchLlmArgs' default is a CudaGraphConfig
    assert "cuda_graph_config" in kwargs and kwargs["cuda_graph_config"] is None
    # the queue gauge reads iteration stats, which the PyTorch backend records only when asked
    assert kwargs["enable_iter_perf_stats"] is True


def test_cuda_graphs_only_when_asked(spec_4b):
    kwargs = llm_kwargs(spec_4b, "m", EngineSettings(cuda_graphs=True))
    assert "cuda_graph_config" not in kwargs  # TensorRT-LLM's default CudaGraphConfig
    with pytest.raises(ValueError, match="unknown engine settings"):
        EngineSettings.from_json('{"per_layer_windows": true}')


def test_sequence_limits_follow_request_limits(spec_4b):
    kwargs = llm_kwargs(spec_4b, "m", EngineSettings(), Limits(max_input_tokens=4096, max_new_tokens=1024))
    assert (kwargs["max_input_len"], kwargs["max_seq_len"]) == (4096, 5120)
    with pytest.raises(ValueError, match="cannot hold one image"):
        llm_kwargs(spec_4b, "m", EngineSettings(max_input_len=200, max_seq_len=400))


def _sampling(**values):
    from medgemma_triton.runtime.sampling import SamplingParams

    return SamplingParams(**values)


CT_SLICES = 85  # MedGemma 1.5's CT recipe: image, "SLICE k", ... then the question, in one user turn


def test_default_limits_admit_a_ct_volume_prompt_at_4b(spec_4b, tiny_checkpoint):
    """An 85-image volume prompt (about 22,000 tokens at 4B) plus the longest reply fits what llm_kwargs
    gives TensorRT-LLM from the default limits (upstream sources: docs/gpu.md, "Many images in one prompt")."""
    import numpy as np

    from medgemma_triton.runtime.chat import PromptBuilder

    limits = Limits()
    content = []
    for k in range(1, CT_SLICES + 1):
        content += [{"type": "image"}, {"type": "text", "text": f"SLICE {k}"}]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": "Any findings in this CT volume?"}]}]
    # the server's own prompt (chat template, image expansion, tokenizer); the 4B spec shares the tiny's tokenizer
    prompt = PromptBuilder(spec_4b, tiny_checkpoint, limits).build(messages, CT_SLICES)
    assert CT_SLICES <= limits.max_images

    # One bidirectional block per image: TensorRT-LLM's Gemma 3 mask gives each contiguous run of image
    # tokens its own block, so the images must be separated (by eoi/boi), never run together.
    is_image = np.concatenate([[False], prompt == spec_4b.tokens.image, [False]])
    starts, ends = np.flatnonzero(~is_image[:-1] & is_image[1:]), np.flatnonzero(is_image[:-1] & ~is_image[1:])
    assert len(starts) == CT_SLICES and set(ends - starts) == {spec_4b.mm_tokens_per_image}
    per_image = spec_4b.mm_tokens_per_image + 2  # + boi, eoi; the "\n\n" around them and "SLICE k" come on top
    assert int(np.count_nonzero(prompt == spec_4b.tokens.boi)) == CT_SLICES
    assert len(prompt) > CT_SLICES * per_image

    settings = EngineSettings()
    kwargs = llm_kwargs(spec_4b, "m", settings, limits)
    sampling = _sampling(max_tokens=limits.max_new_tokens)
    # LLM._check_arguments (PyTorch backend, chunked prefill off): the prompt must fit one step's max_num_tokens
    assert len(prompt) <= kwargs["max_input_len"] <= kwargs["max_num_tokens"]
    assert len(prompt) + sampling.max_tokens <= kwargs["max_seq_len"] <= spec_4b.text.max_position_embeddings
    # FlashInfer's custom-mask offsets are int32 (mask_indptr = empty_like(qo_indptr)): the sum of q_len * kv_len
    # over a step's context requests, at most max_num_tokens squared, must stay below 2**31
    assert kwargs["max_num_tokens"] ** 2 < 2**31

    # the gpu llm's own check, with embeddings shaped as the vision engine returns them (no memory behind them)
    embeddings = np.broadcast_to(np.float16(0), (CT_SLICES, spec_4b.mm_tokens_per_image, spec_4b.text.hidden_size))
    max_input_len, _ = sequence_limits(spec_4b, settings, limits)
    GenerationRequest(prompt.tolist(), sampling, image_embeddings=embeddings).validate(spec_4b, max_input_len)


# ---- the TensorRT-LLM version guard ---------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.2.1", "1.2.1+nv26.07"])
def test_tensorrt_llm_release_we_read_is_accepted(version):
    assert pins.CONTAINER_VERSIONS["tensorrt_llm"] in pins.TENSORRT_LLM_READ
    pins.check_tensorrt_llm_version(version)


UNREAD_RELEASES = ["1.1.0", "1.2.0", "1.2.1rc1", "1.2.1.post1", "1.2.2", "1.3.0rc14", "not-a-version"]


@pytest.mark.parametrize("version", UNREAD_RELEASES)
def test_tensorrt_llm_release_we_have_not_read_is_refused(version):
    expected = rf"TensorRT-LLM {re.escape(version)} is installed.*1\.2\.1.*TENSORRT_LLM_READ"
    with pytest.raises(pins.UnsupportedTensorRTLLM, match=expected):
        pins.check_tensorrt_llm_version(version)


class _UnreadTensorRTLLM(types.ModuleType):
    """Stands in for an installed tensorrt_llm of another release: the real one cannot be installed here.
    Any attribute beyond __version__ fails the test, so install() must refuse before touching internals."""

    def __getattr__(self, name):
        raise AssertionError(f"install() reached tensorrt_llm.{name} on an unread release")


def test_embeddings_patch_refuses_an_unread_tensorrt_llm(monkeypatch):
    from medgemma_triton.gpu import trtllm_gemma3

    stand_in = _UnreadTensorRTLLM("tensorrt_llm")
    stand_in.__version__ = "1.3.0"
    monkeypatch.setitem(sys.modules, "tensorrt_llm", stand_in)
    monkeypatch.setattr(trtllm_gemma3, "_installed", False)
    with pytest.raises(pins.UnsupportedTensorRTLLM, match="TensorRT-LLM 1.3.0 is installed"):
        trtllm_gemma3.install()


def test_build_refuses_an_unread_tensorrt_llm_before_any_slow_step(monkeypatch):
    """require_gpu_toolchain reads the installed distribution's version (the container's metadata)."""
    import importlib.metadata
    import importlib.util

    from medgemma_triton.repository import gpu as repository

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # the three packages "present"
    monkeypatch.setattr(importlib.metadata, "version", lambda name: {"tensorrt_llm": "1.2.0"}[name])
    with pytest.raises(pins.UnsupportedTensorRTLLM, match="TensorRT-LLM 1.2.0 is installed"):
        repository.require_gpu_toolchain()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: {"tensorrt_llm": "1.2.1"}[name])
    repository.require_gpu_toolchain()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_sampling_params_are_pinned_fields(tiny_spec, temperature):
    kwargs = sampling_kwargs(tiny_spec, _sampling(temperature=temperature, top_k=0))
    assert set(kwargs) <= pins.SAMPLING_PARAMS_FIELDS
    assert kwargs["stop_token_ids"] == list(tiny_spec.tokens.eos) and kwargs["detokenize"] is False
    if temperature == 0:  # SamplingParams.params_imply_greedy_decoding: top_k == 1 is greedy
        assert kwargs["top_k"] == 1 and kwargs["top_p"] is None and "temperature" not in kwargs
    else:
        assert kwargs["temperature"] == 0.7 and kwargs["top_k"] is None


def test_prompt_inputs_use_llm_api_keys(tiny_spec):
    torch = pytest.importorskip("torch")
    text_only = prompt_inputs(GenerationRequest(input_ids=[2, 5, 7], sampling=_sampling()))
    assert set(text_only) == {"prompt_token_ids"}
    embeddings = torch.zeros(1, tiny_spec.mm_tokens_per_image, tiny_spec.text.hidden_size)
    with_image = prompt_inputs(GenerationRequest(input_ids=[2, 5], sampling=_sampling(), image_embeddings=embeddings))
    assert set(with_image) <= pins.TEXT_PROMPT_KEYS
    handed = with_image["multi_modal_embeddings"]["image"][0]
    assert handed.device.type == "cpu" and torch.equal(handed, embeddings)


def test_embeddings_reach_the_llm_api_in_host_memory(tiny_spec):
    """The LLM API turns the prompt's tensors into shared-tensor handles (CUDA IPC for GPU tensors),
    which the single-process executor cannot open: what we hand it must be a host tensor."""
    torch = pytest.importorskip("torch")
    import numpy as np

    from medgemma_triton.gpu.trtllm_gemma3 import attach_embeddings

    shape = (1, tiny_spec.mm_tokens_per_image, tiny_spec.text.hidden_size)
    from_triton = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)  # pb_utils' as_numpy()
    request = GenerationRequest([2, *[tiny_spec.tokens.image] * shape[1], 9], _sampling(), image_embeddings=from_triton)
    prompt = prompt_inputs(request)["multi_modal_embeddings"]
    (image,), (input_ids,) = prompt["image"], prompt["input_ids"]
    assert isinstance(image, torch.Tensor) and image.device.type == "cpu"
    assert np.array_equal(image.numpy(), from_triton)

    token_ids, extra = attach_embeddings(input_ids, [image], tiny_spec.tokens.image)  # the patched input processor
    pixel_values = extra["multimodal_data"]["image"]["pixel_values"]
    assert token_ids == request.input_ids
    assert pixel_values.device.type == "cpu" and pixel_values.dtype == torch.bfloat16 and pixel_values.shape == shape
    with pytest.raises(ValueError, match="image tokens"):
        attach_embeddings(input_ids[:-2], [image], tiny_spec.tokens.image)


def test_generation_request_validation(tiny_spec):
    torch = pytest.importorskip("torch")
    image_block = [tiny_spec.tokens.image] * tiny_spec.mm_tokens_per_image
    embeddings = torch.zeros(1, tiny_spec.mm_tokens_per_image, tiny_spec.text.hidden_size)
    GenerationRequest([2, *image_block, 9], _sampling(), image_embeddings=embeddings).validate(tiny_spec, 512)
    with pytest.raises(InvalidRequest, match="image tokens"):
        GenerationRequest([2, *image_block, 9], _sampling()).validate(tiny_spec, 512)
    with pytest.raises(InvalidRequest, match="at most 8"):
        GenerationRequest(list(range(9)), _sampling()).validate(tiny_spec, 8)


class _ListStream:
    """serving.engine.ResponseStream collecting responses in a list (stands in for Triton's sender)."""

    def __init__(self, cancel_after: int | None = None):
        self.sent, self.closed, self.cancel_after = [], False, cancel_after

    def send(self, chunk, final):
        self.sent.append((chunk, final))

    def fail(self, message, invalid_request):
        raise AssertionError(message)

    def close(self):
        self.closed = True

    def is_cancelled(self):
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after


def _respond(tiny_checkpoint, steps, stream, **sampling):
    """Drive llm_engine.respond with scripted TensorRT-LLM steps (the executor cannot run here)."""
    import asyncio

    from medgemma_triton.gpu.llm_engine import respond
    from medgemma_triton.runtime.tokenizer import load_tokenizer

    spec = ModelSpec.from_checkpoint(tiny_checkpoint)
    tokenizer = load_tokenizer(tiny_checkpoint)
    aborted = []

    async def scripted():
        for step in steps:
            yield step

    request = GenerationRequest([2, 100], _sampling(**sampling), stream=True)
    reason = asyncio.run(respond(scripted(), request, stream, spec.tokens.eos, lambda: aborted.append(1)))
    return reason, aborted, tokenizer


def test_respond_streams_tokens_like_the_cpu_llm(tiny_checkpoint):
    from medgemma_triton.runtime.tokenizer import load_tokenizer

    stream = _ListStream()
    tokenizer = load_tokenizer(tiny_checkpoint)
    tokenizer_ids = tokenizer.encode("The lungs are clear.", add_special_tokens=False).ids
    end_of_turn = ModelSpec.from_checkpoint(tiny_checkpoint).tokens.end_of_turn
    steps = [(tokenizer_ids[:2], None), (tokenizer_ids[2:], None), ([end_of_turn], "stop")]
    reason, aborted, _ = _respond(tiny_checkpoint, steps, stream)
    assert reason == "stop" and not aborted
    assert [final for _, final in stream.sent] == [False, False, True]
    assert [chunk.output_ids for chunk, _ in stream.sent] == [tokenizer_ids[:2], tokenizer_ids[2:], [end_of_turn]]
    assert [chunk.completion_tokens for chunk, _ in stream.sent] == [2, len(tokenizer_ids), len(tokenizer_ids) + 1]
    last = stream.sent[-1][0]
    assert last.finish_reason == "stop" and last.completion_tokens == len(tokenizer_ids) + 1 and last.prompt_tokens == 2


def test_respond_eos_inside_a_step_aborts_and_cancellation_closes(tiny_checkpoint):
    from medgemma_triton.runtime.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_checkpoint)
    ids = tokenizer.encode("Findings: normal. Impression: none", add_special_tokens=False).ids
    eos = ModelSpec.from_checkpoint(tiny_checkpoint).tokens.eos[0]
    stream = _ListStream()
    reason, aborted, _ = _respond(tiny_checkpoint, [(ids[:3] + [eos] + ids[3:], None)], stream)
    assert reason == "stop" and aborted == [1]  # TensorRT-LLM had not reported the end itself
    assert [chunk.output_ids for chunk, _ in stream.sent] == [ids[:3] + [eos]]

    cancelled = _ListStream(cancel_after=1)
    reason, aborted, _ = _respond(tiny_checkpoint, [([t], None) for t in ids], cancelled)
    assert reason == "cancelled" and aborted == [1] and cancelled.closed and len(cancelled.sent) == 1


class _StandInLLM:
    """Stands in for tensorrt_llm.LLM, which cannot be installed here: generate_async's streaming
    result yields the scripted token ids one step at a time once `release` is set, and abort() ends it
    the way TensorRT-LLM does (a last output with finish_reason "cancelled")."""

    def __init__(self, token_ids):
        self.token_ids, self.prompts, self.aborted = list(token_ids), [], []

    def generate_async(self, inputs, sampling_params, streaming):
        import asyncio
        from types import SimpleNamespace

        assert streaming and set(inputs) <= pins.TEXT_PROMPT_KEYS | {"prompt_token_ids"}
        self.prompts.append(inputs)
        llm, state = self, {"aborted": False}

        class Result:
            def abort(self):
                state["aborted"] = True
                llm.aborted.append(len(llm.prompts))

            def __aiter__(self):
                return self._outputs()

            async def _outputs(self):
                for count in range(1, len(llm.token_ids) + 1):
                    await asyncio.sleep(0.01)
                    if state["aborted"]:
                        yield SimpleNamespace(finished=True, outputs=[SimpleNamespace(
                            token_ids=llm.token_ids[: count - 1], finish_reason="cancelled")])
                        return
                    done = count == len(llm.token_ids)
                    yield SimpleNamespace(finished=done, outputs=[SimpleNamespace(
                        token_ids=llm.token_ids[:count], finish_reason="length" if done else None)])
                raise AssertionError("the scripted result ended without finishing")

        return Result()

    def shutdown(self):
        pass


class _WaitingStream(_ListStream):
    def __init__(self):
        super().__init__()
        import threading

        self.done = threading.Event()

    def send(self, chunk, final):
        super().send(chunk, final)
        if final:
            self.done.set()

    def close(self):
        super().close()
        self.done.set()

    def fail(self, message, invalid_request):
        self.failed = (message, invalid_request)
        self.done.set()


def _request_loop(tiny_spec, token_ids):
    llm = _StandInLLM(token_ids)
    engine = GemmaLLM(tiny_spec, llm, dict, max_input_len=512, limits=Limits())  # dict: SamplingParams' kwargs
    return RequestLoop(engine), llm


def test_request_loop_serves_through_the_llm_api(tiny_spec):
    loop, llm = _request_loop(tiny_spec, [11, 12, 13])
    try:
        stream = _WaitingStream()
        reason = loop.submit("req-1", lambda: GenerationRequest([2, 5, 7], _sampling(max_tokens=3), stream=True),
                             stream).result(timeout=10)
        assert reason == "length" and not stream.closed and llm.aborted == []
        assert [chunk.output_ids for chunk, _ in stream.sent] == [[11], [12], [13]]
        assert llm.prompts == [{"prompt_token_ids": [2, 5, 7]}]
    finally:
        loop.shutdown()


def test_stop_before_the_request_arrives_is_honoured(tiny_spec):
    """medgemma can stop a request while its images are still encoding, before the llm has it."""
    loop, llm = _request_loop(tiny_spec, [11, 12, 13])
    try:
        loop.stop("req-early", "stop")
        stream = _WaitingStream()
        reason = loop.submit("req-early", lambda: GenerationRequest([2, 5, 7], _sampling()), stream).result(timeout=10)
        assert reason == "stop" and stream.closed and stream.sent == []
        assert llm.prompts == []  # TensorRT-LLM never saw it
        assert len(loop.stops) == 0  # the stop was used up with its request

        other = _WaitingStream()  # a stop names one request only
        assert loop.submit("req-other", lambda: GenerationRequest([2, 5], _sampling()), other).result(timeout=10) == "length"
    finally:
        loop.shutdown()


def test_stop_while_generating_aborts_that_request(tiny_spec):
    loop, llm = _request_loop(tiny_spec, list(range(1000, 1060)))
    try:
        stream = _WaitingStream()
        future = loop.submit("req-running", lambda: GenerationRequest([2, 5], _sampling(max_tokens=60), stream=True),
                             stream)
        for _ in range(500):  # until the first tokens are out
            if stream.sent:
                break
            time.sleep(0.01)
        loop.stop("req-running")
        assert future.result(timeout=10) == "cancelled"
        assert stream.closed and llm.aborted and set(llm.aborted) == {1} and len(stream.sent) < 60
    finally:
        loop.shutdown()


def test_requests_without_an_id_do_not_share_one(tiny_spec):
    from medgemma_triton.serving.stops import request_id_or_new

    assert request_id_or_new("abc") == "abc"
    assert request_id_or_new("") != request_id_or_new("") and request_id_or_new(None)
    loop, llm = _request_loop(tiny_spec, list(range(1000, 1030)))
    try:
        streams = [_WaitingStream() for _ in range(2)]
        futures = [loop.submit("", lambda: GenerationRequest([2, 5], _sampling(max_tokens=30), stream=True), s)
                   for s in streams]
        for _ in range(500):  # both generating
            if all(s.sent for s in streams):
                break
            time.sleep(0.01)
        loop.stop("", "cancelled")  # names no request: must not stop either unnamed one
        assert [f.result(timeout=10) for f in futures] == ["length", "length"]
        assert all(not s.closed and len(s.sent) == 30 for s in streams) and llm.aborted == []
    finally:
        loop.shutdown()


class _MockBatchingLLM:
    """A mock of tensorrt_llm.LLM, which cannot be installed here, as the queue gauge sees it.

    generate_async hands the request to a scripted in-flight-batching executor with `slots` slots,
    which runs one iteration every `iteration_s` as TensorRT-LLM's PyExecutor does (docs/gpu.md cites
    the source): it empties its request queue into its waiting queue, admits waiting requests in
    arrival order while slots are free, gives every admitted request one token, and writes one
    iteration record shaped like IterationStats.to_json_str(). get_stats_async behaves like the LLM
    API's IterationResult: it yields the records written since the last read, ends when `timeout`
    passes without one, and after that yields nothing until the next generate_async.
    """

    def __init__(self, tokens_per_request: int, slots: int, iteration_s: float = 0.005):
        self.tokens_per_request, self.slots, self.iteration_s = tokens_per_request, slots, iteration_s
        self.request_queue, self.waiting, self.active = [], [], []
        self.records, self.stats_paused, self.iteration, self._executor = None, False, 0, None

    def generate_async(self, inputs, sampling_params, streaming):
        import asyncio
        from types import SimpleNamespace

        if self._executor is None:  # the LLM API's first request creates its stats queue
            self.records = asyncio.Queue()
            self._executor = asyncio.get_running_loop().create_task(self._run())
        self.stats_paused = False  # IterationResult.mark_undone
        request = SimpleNamespace(generated=0, outputs=asyncio.Queue(), aborted=False)
        self.request_queue.append(request)
        llm = self

        class Result:
            def abort(self):
                request.aborted = True

            def __aiter__(self):
                return self._outputs()

            async def _outputs(self):
                while True:
                    count = await request.outputs.get()
                    done = count == llm.tokens_per_request
                    yield SimpleNamespace(finished=done, outputs=[SimpleNamespace(
                        token_ids=list(range(1000, 1000 + count)), finish_reason="length" if done else None)])
                    if done:
                        return

        return Result()

    async def _run(self):
        import asyncio

        while True:
            await asyncio.sleep(self.iteration_s)
            self.iteration += 1
            self.waiting += self.request_queue
            self.request_queue = []
            while self.waiting and len(self.active) < self.slots:
                self.active.append(self.waiting.pop(0))
            new_active = len(self.active)
            completed = 0
            for request in list(self.active):
                request.generated += 1
                request.outputs.put_nowait(request.generated)
                if request.generated == self.tokens_per_request or request.aborted:
                    self.active.remove(request)
                    completed += 1
            self.records.put_nowait(json.dumps({
                "timestamp": "", "iter": self.iteration, "iterLatencyMS": self.iteration_s * 1e3,
                "newActiveRequestsQueueLatencyMS": 0.0, "numNewActiveRequests": 0,
                "numActiveRequests": new_active, "numQueuedRequests": len(self.request_queue),
                "numCompletedRequests": completed, "maxNumActiveRequests": self.slots,
                "gpuMemUsage": 0, "cpuMemUsage": 0, "pinnedMemUsage": 0,
                "kvCacheStats": {"maxNumBlocks": 64, "freeNumBlocks": 64 - new_active, "usedNumBlocks": new_active,
                                 "tokensPerBlock": 32, "allocTotalBlocks": new_active, "allocNewBlocks": 0,
                                 "reusedBlocks": 0, "missedBlocks": 0, "cacheHitRate": 0.0},
                "staticBatchingStats": None,
                "inflightBatchingStats": {"numScheduledRequests": new_active, "numContextRequests": 0,
                                          "numGenRequests": new_active, "numPausedRequests": 0, "numCtxTokens": 0,
                                          "microBatchId": 0, "avgNumDecodedTokensPerIter": 1.0},
            }))

    def get_stats_async(self, timeout):
        import asyncio

        llm = self

        class IterationResult:
            def __aiter__(self):
                return self

            async def __anext__(self):
                if llm.records is None or llm.stats_paused:
                    raise StopAsyncIteration
                try:
                    return json.loads(await asyncio.wait_for(llm.records.get(), timeout))
                except asyncio.TimeoutError:
                    llm.stats_paused = True
                    raise StopAsyncIteration

        return IterationResult()

    def shutdown(self):
        import asyncio

        async def stop(executor):
            executor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await executor

        if self._executor is not None:
            asyncio.run_coroutine_threadsafe(stop(self._executor), self._executor.get_loop()).result(timeout=10)


class _GaugeRecorder:
    """serving.engine.Counters keeping every value the two gauges were set to (Triton's metrics stand-in)."""

    def __init__(self):
        self.queued_values, self.active_values, self.tokens, self.finished_reasons = [], [], 0, []

    def queued(self, n):
        self.queued_values.append(n)

    def active(self, n):
        self.active_values.append(n)

    def generated_tokens(self, n):
        self.tokens += n

    def cancelled(self):
        pass

    def refused(self):
        pass

    def finished(self, reason):
        self.finished_reasons.append(reason)


def test_queue_gauge_counts_what_tensorrt_llm_holds_without_a_slot():
    assert waiting_requests(6, ExecutorLoad(active=2, queued=0, max_active=2), max_active=32) == 4
    # new arrivals still in its request queue are waiting too, and counted once
    assert waiting_requests(6, ExecutorLoad(active=1, queued=3, max_active=2), max_active=32) == 5
    # a record older than our count (requests finished since) never makes the queue negative
    assert waiting_requests(1, ExecutorLoad(active=2, queued=0, max_active=2), max_active=2) == 0
    # no record since the last look: the executor fills its slots every iteration while requests wait
    assert waiting_requests(7, None, max_active=2) == 5 and waiting_requests(2, None, max_active=2) == 0


def test_queue_gauge_follows_tensorrt_llm_queue(tiny_spec):
    """Six requests on an executor with two slots: the gauge rises to the four without a slot and falls
    to zero as they are served. The engine is told it has 32 slots (EngineSettings' default), so only the
    executor's own records (maxNumActiveRequests, numActiveRequests) can give 4."""
    llm = _MockBatchingLLM(tokens_per_request=40, slots=2)
    gauges = _GaugeRecorder()
    engine = GemmaLLM(tiny_spec, llm, dict, max_input_len=512, limits=Limits())
    assert engine.max_active_requests == 32
    loop = RequestLoop(engine, counters=gauges, queue_sample_s=0.02)
    try:
        streams = [_WaitingStream() for _ in range(6)]
        futures = [loop.submit(f"req-{i}", lambda: GenerationRequest([2, 5], _sampling(max_tokens=40), stream=True), s)
                   for i, s in enumerate(streams)]
        assert [f.result(timeout=30) for f in futures] == ["length"] * 6
        time.sleep(0.1)  # a few more samples after the last request finished
        assert max(gauges.queued_values) == 4 and 4 in gauges.queued_values
        assert max(gauges.active_values) == 2
        assert gauges.queued_values[-1] == 0 and gauges.active_values[-1] == 0
        # it fell step by step as the executor admitted the waiting requests two at a time
        assert 2 in gauges.queued_values[gauges.queued_values.index(4):]
        assert gauges.tokens == 6 * 40 and gauges.finished_reasons == ["length"] * 6
    finally:
        loop.shutdown()


def test_queue_gauge_counts_requests_not_yet_handed_over(tiny_spec):
    """Requests accepted by the loop but still being prepared are waiting too; before any request the
    gauge reads no stats (the LLM API would only print that it has none)."""
    import threading

    llm = _MockBatchingLLM(tokens_per_request=5, slots=2)
    gauges = _GaugeRecorder()
    loop = RequestLoop(GemmaLLM(tiny_spec, llm, dict, max_input_len=512, limits=Limits()), counters=gauges,
                       queue_sample_s=0.02)
    try:
        time.sleep(0.1)
        assert gauges.queued_values and set(gauges.queued_values) == {0} and llm.records is None
        release = threading.Event()

        def slow_prepare():
            release.wait(timeout=10)
            return GenerationRequest([2, 5], _sampling(max_tokens=5))

        blocked = loop.submit("slow", slow_prepare, _WaitingStream())  # holds the loop thread
        others = [loop.submit(f"r{i}", lambda: GenerationRequest([2, 5], _sampling(max_tokens=5)), _WaitingStream())
                  for i in range(3)]
        assert loop.queued_requests(None) == 4  # all four accepted, none handed to TensorRT-LLM
        release.set()
        assert [f.result(timeout=30) for f in [blocked, *others]] == ["length"] * 4
        assert loop.queued_requests(None) == 0
    finally:
        loop.shutdown()


def test_stop_registry_keeps_early_stops_for_a_while():
    from medgemma_triton.serving.stops import StopRegistry

    now = [100.0]
    stops = StopRegistry(max_age_s=60, clock=lambda: now[0])
    stops.stop("a", "stop")
    stops.stop("", "stop")
    assert stops.reason("a") == "stop" and stops.reason("") is None and stops.reason("b") is None
    now[0] += 59
    stops.forget_old()
    assert stops.reason("a") == "stop"
    now[0] += 2
    stops.forget_old()
    assert stops.reason("a") is None and len(stops) == 0


def test_finish_reasons_map_to_contract():
    assert finish_reason("stop") == "stop" and finish_reason("length") == "length"
    assert finish_reason(None, aborted=True) == "cancelled"


def test_engine_settings_round_trip():
    settings = EngineSettings.edge()
    assert EngineSettings.from_json(settings.to_json()) == settings
    with pytest.raises(ValueError, match="unknown engine settings"):
        EngineSettings.from_json('{"max_batch": 2}')


def test_gpu_modules_import_without_gpu_libraries():
    code = (
        "import sys\n"
        "import medgemma_triton.repository.gpu, medgemma_triton.gpu.llm_engine, medgemma_triton.gpu.quantize\n"
        "import medgemma_triton.gpu.trtllm_gemma3, medgemma_triton.gpu.verify, medgemma_triton.gpu.trt_vision\n"
        "bad = [m for m in ('tensorrt', 'tensorrt_llm', 'modelopt', 'torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


# ---- ModelOpt quantization ---------------------------------------------------------------------


def test_quant_recipes_structure(tiny_spec, spec_4b):
    fp8 = recipe_for("fp8", spec_4b)
    assert (fp8.modelopt_config, fp8.kv_modelopt_config, fp8.expected_quant_algo) == ("FP8_DEFAULT_CFG", "FP8_KV_CFG", "FP8")
    awq = recipe_for("int4_awq", spec_4b, kv_cache="auto")
    assert (awq.modelopt_config, awq.awq_block_size, awq.kv_modelopt_config) == ("INT4_AWQ_CFG", 128, None)
    assert recipe_for("int4_awq", tiny_spec).awq_block_size == 64  # tiny hidden size 64
    assert set(fp8.excluded) == set(EXCLUDED_MODULES) and "*vision_tower*" in fp8.excluded
    assert fp8.calib_text + fp8.calib_image == 128
    with pytest.raises(ValueError, match="bf16 needs none"):
        recipe_for("bf16", spec_4b)


def test_modelopt_config_excludes_vision(tiny_spec):
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt==0.37.0 (pip install 'medgemma-triton[gpu-quantize]')")
    from medgemma_triton.gpu.quantize import modelopt_quant_config

    config = modelopt_quant_config(recipe_for("int4_awq", tiny_spec))
    quant_cfg = config["quant_cfg"]
    for pattern in EXCLUDED_MODULES:
        assert quant_cfg[pattern] == {"enable": False}
    assert quant_cfg["*weight_quantizer"]["block_sizes"][-1] == 64
    assert "*[kv]_bmm_quantizer" in quant_cfg  # FP8 KV cache


def test_calibration_set_is_small_deterministic_and_medical():
    from medgemma_triton.gpu.calibration import MEDICAL_TEXTS, calibration_chats

    chats = calibration_chats(num_text=6, num_image=4, image_size=64, seed=3)
    again = calibration_chats(num_text=6, num_image=4, image_size=64, seed=3)
    assert len(chats) == 10 and len(MEDICAL_TEXTS) >= 40
    assert sum(c.image is not None for c in chats) == 4
    assert [c.messages for c in chats] == [c.messages for c in again]
    assert chats[-1].image.tobytes() == again[-1].image.tobytes() and chats[-1].image.size == (64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("precision,algo", [("fp8", "FP8"), ("int4_awq", "W4A16_AWQ")])
def test_modelopt_ptq_runs_on_cpu_for_tiny(precision, algo, tiny_checkpoint, tmp_path):
    """Real ModelOpt PTQ (CPU) on the tiny checkpoint: language model quantized, vision tower untouched."""
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt==0.37.0 (pip install 'medgemma-triton[gpu-quantize]')")
    from safetensors import safe_open

    from medgemma_triton.gpu.quantize import RECIPE_FILE, quantize_checkpoint

    out = quantize_checkpoint(tiny_checkpoint, tmp_path / "q", precision=precision, device="cpu",
                              calib_text=2, calib_image=2, log=lambda *_: None)
    quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == algo and quant["kv_cache_quant_algo"] == "FP8"
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["calibration_chats"] == 4 and recipe["modelopt"] == pins.MODELOPT_VERSION
    ModelSpec.from_checkpoint(out)  # tokenizer, template and processor travelled with it
    with safe_open(out / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
        q_proj = next(k for k in keys if "language_model" in k and k.endswith("layers.0.self_attn.q_proj.weight"))
        vision = next(k for k in keys if "vision_tower" in k and k.endswith("q_proj.weight"))
        expected = "float8_e4m3fn" if precision == "fp8" else "uint8"  # int4 packed two per byte
        assert str(weights.get_tensor(q_proj).dtype).endswith(expected)
        assert weights.get_tensor(vision).is_floating_point() and "float8" not in str(weights.get_tensor(vision).dtype)
        assert any(k.endswith("k_proj.k_scale") for k in keys)


# ---- acceptance ---------------------------------------------------------------------------------


def test_acceptance_thresholds_and_agreement():
    from medgemma_triton.gpu.verify import ACCEPTANCE_PROMPTS, THRESHOLDS, compare

    assert THRESHOLDS["bf16"].prefix > THRESHOLDS["fp8"].prefix > THRESHOLDS["int4_awq"].prefix
    assert any(kind for *_, kind in ACCEPTANCE_PROMPTS) and any(kind is None for *_, kind in ACCEPTANCE_PROMPTS)
    report = compare([[5, 6, 7, 8], [1, 2]], [[5, 6, 9], [1, 2]])
    assert report.first_token == 1.0 and report.prefix == pytest.approx((2 / 4 + 1) / 2)
    assert report.passes(THRESHOLDS["fp8"]) and not report.passes(THRESHOLDS["bf16"])
