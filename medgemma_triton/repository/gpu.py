"""`medgemma-triton build gpu`: assemble the gpu profile's Triton model repository.

Layout written to `output`:

    medgemma/            Python (BLS) model: the cpu profile's, unchanged (one implementation)
    preprocessing/       Python model: the cpu profile's, unchanged
    vision_encoder/      config.pbtxt (tensorrt_plan) + 1/model.plan (+ model.json: the engine plan)
    llm/                 config.pbtxt (python, decoupled) + 1/model.py + 1/checkpoint/ (ModelOpt or bf16 HF checkpoint)

The gpu templates (gpu_model_repository/) hold only what differs from the cpu profile: platform,
instance groups, batching, parameters, the llm's model.py. The tensors of vision_encoder and llm are
taken from the cpu profile's config.pbtxt (model_repository/), so the top model and the shared models
talk to both profiles identically; dims and the checkpoint path are set from the checkpoint. Every
config is parsed against Triton's schema (tritonclient's model_config_pb2) and the four are checked
together with validate_configs (names, the pipeline's wiring, dtypes, the contract), shared with the cpu profile
through medgemma_triton.repository.config.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from medgemma_triton.contract import PRECISIONS as ALL_PRECISIONS
from medgemma_triton.contract import (
    LLM_MODEL,
    PREPROCESSING_MODEL,
    TOP_MODEL,
    VISION_ENCODER_MODEL,
    VISION_INPUT,
    VISION_OUTPUT,
)
from medgemma_triton.gpu import pins, trt_vision
from medgemma_triton.gpu.llm_engine import (
    LLM_INPUTS,
    LLM_OUTPUTS,
    LLM_REQUIRED_INPUTS,
    LLM_REQUIRED_OUTPUTS,
    EngineSettings,
)
from medgemma_triton.repository.config import (
    CHECKPOINT_DIR,
    CHECKPOINT_SERVING_FILES,
    RepositoryError,
    contract_io,
    default_cache_dir,
    link_or_copy,
    read_config,
    set_dims,
    set_parameter,
    tensor,
    validate_configs,
)
from medgemma_triton.repository.config import write_config as _write_config
from medgemma_triton.repository.templates import template_dir
from medgemma_triton.spec import ModelSpec

GPU_TEMPLATES = template_dir("gpu_model_repository")
CPU_TEMPLATES = template_dir("model_repository")
PRECISIONS = ALL_PRECISIONS["gpu"]
SHARED_MODELS = (TOP_MODEL, PREPROCESSING_MODEL)
PLAN_FILE = "model.plan"


def write_config(config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_config(config, path)


def _tensor_names(tensors) -> list[str]:
    return [t.name for t in tensors]


def vision_encoder_config(gpu_template, cpu_config, plan: trt_vision.VisionEnginePlan):
    """The gpu vision_encoder config: the template's platform/batching + the cpu config's tensors, dims from the plan."""
    config = type(gpu_template)()
    config.CopyFrom(gpu_template)
    inputs, outputs = _tensor_names(cpu_config.input), _tensor_names(cpu_config.output)
    if inputs != [trt_vision.INPUT_NAME] or outputs != [trt_vision.OUTPUT_NAME]:
        raise RepositoryError(
            f"cpu vision_encoder has tensors {inputs} -> {outputs}; the TensorRT plan has "
            f"[{trt_vision.INPUT_NAME!r}] -> [{trt_vision.OUTPUT_NAME!r}]"
        )
    del config.input[:]
    del config.output[:]
    config.input.extend(cpu_config.input)
    config.output.extend(cpu_config.output)
    # With max_batch_size > 0, Triton's dims exclude the batch dimension.
    config.input[0].ClearField("dims")
    config.input[0].dims.extend(plan.input_shape(1)[1:])
    config.output[0].ClearField("dims")
    config.output[0].dims.extend(plan.output_shape)
    config.max_batch_size = plan.max_batch
    batching = config.dynamic_batching
    del batching.preferred_batch_size[:]
    batching.preferred_batch_size.extend(sorted({plan.opt_batch, plan.max_batch}))
    return config


def llm_config(gpu_template, cpu_config, settings: EngineSettings, checkpoint_dir: str = CHECKPOINT_DIR):
    """The gpu llm config: the template's backend/parameters + the cpu llm's tensors and batch size."""
    config = type(gpu_template)()
    config.CopyFrom(gpu_template)
    inputs, outputs = _tensor_names(cpu_config.input), _tensor_names(cpu_config.output)
    problems = [f"input {n!r} missing" for n in LLM_REQUIRED_INPUTS if n not in inputs]
    problems += [f"output {n!r} missing" for n in LLM_REQUIRED_OUTPUTS if n not in outputs]
    problems += [f"input {n!r} unknown to the gpu llm" for n in inputs if n not in LLM_INPUTS]
    problems += [f"output {n!r} unknown to the gpu llm" for n in outputs if n not in LLM_OUTPUTS]
    if not cpu_config.model_transaction_policy.decoupled:
        problems.append("the cpu llm is not decoupled")
    if problems:
        raise RepositoryError(f"cpu llm config.pbtxt cannot be served by the gpu llm: {'; '.join(problems)}")
    del config.input[:]
    del config.output[:]
    config.input.extend(cpu_config.input)
    config.output.extend(cpu_config.output)
    config.max_batch_size = cpu_config.max_batch_size
    set_parameter(config, "checkpoint", checkpoint_dir)
    set_parameter(config, "engine_settings", settings.to_json())
    return config


def gpu_configs(
    spec: ModelSpec,
    checkpoint: Path,
    settings: EngineSettings,
    vision_plan: trt_vision.VisionEnginePlan,
    cpu_templates: Path = CPU_TEMPLATES,
    gpu_templates: Path = GPU_TEMPLATES,
) -> dict:
    """All four configs of the gpu repository, checked with validate_configs as the cpu profile's are."""
    configs = {name: read_config(cpu_templates / name / "config.pbtxt") for name in SHARED_MODELS}
    pixel_dims = (-1, 3, spec.vision.image_size, spec.vision.image_size)
    set_dims(tensor(configs[PREPROCESSING_MODEL], VISION_INPUT, output=True), pixel_dims)
    for name in SHARED_MODELS:  # their serving files are placed in 1/checkpoint by write_gpu_configs
        set_parameter(configs[name], "checkpoint", CHECKPOINT_DIR)
    set_parameter(configs[TOP_MODEL], "vision_max_batch_size", vision_plan.max_batch)
    contract_io(configs[TOP_MODEL])
    configs[VISION_ENCODER_MODEL] = vision_encoder_config(
        read_config(gpu_templates / VISION_ENCODER_MODEL / "config.pbtxt"),
        read_config(cpu_templates / VISION_ENCODER_MODEL / "config.pbtxt"),
        vision_plan,
    )
    llm = llm_config(
        read_config(gpu_templates / LLM_MODEL / "config.pbtxt"),
        read_config(cpu_templates / LLM_MODEL / "config.pbtxt"),
        settings,
    )
    set_dims(tensor(llm, VISION_OUTPUT), (-1, spec.mm_tokens_per_image, spec.text.hidden_size))
    configs[LLM_MODEL] = llm
    try:
        validate_configs(configs)
    except ValueError as exc:
        raise RepositoryError(f"gpu repository configs: {exc}") from None
    return configs


def write_gpu_configs(
    spec: ModelSpec,
    checkpoint: Path,
    output: Path,
    settings: EngineSettings,
    vision_plan: trt_vision.VisionEnginePlan,
    cpu_templates: Path = CPU_TEMPLATES,
    gpu_templates: Path = GPU_TEMPLATES,
) -> dict[str, Path]:
    """Write the four models' config.pbtxt and Python files (not the plan or the LLM checkpoint)."""
    configs = gpu_configs(spec, checkpoint, settings, vision_plan, cpu_templates, gpu_templates)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "config.pbtxt")
    for name in SHARED_MODELS:
        shutil.copytree(cpu_templates / name, output / name, dirs_exist_ok=True, ignore=ignore)
    shutil.copytree(gpu_templates / LLM_MODEL, output / LLM_MODEL, dirs_exist_ok=True, ignore=ignore)
    (output / VISION_ENCODER_MODEL / "1").mkdir(parents=True, exist_ok=True)
    written = {}
    for name, config in configs.items():
        written[name] = output / name / "config.pbtxt"
        write_config(config, written[name])
    for name in SHARED_MODELS:
        for file in CHECKPOINT_SERVING_FILES:
            if (Path(checkpoint) / file).is_file():
                link_or_copy(Path(checkpoint) / file, output / name / "1" / CHECKPOINT_DIR / file)
    return written


class ToolchainMissing(RuntimeError):
    """The gpu profile is built inside NVIDIA's container; this machine lacks part of it."""


def require_gpu_toolchain() -> None:
    """Fail before any slow step (calibration, export) when TensorRT / TensorRT-LLM / ModelOpt are absent,
    or when the TensorRT-LLM that would serve the repository is a release we have not read."""
    import importlib.metadata
    import importlib.util

    missing = [name for name in ("tensorrt", "tensorrt_llm", "modelopt") if importlib.util.find_spec(name) is None]
    if missing:
        raise ToolchainMissing(
            f"the gpu profile needs {', '.join(missing)} (not installed here): run `medgemma-triton build "
            f"gpu` inside {pins.CONTAINER_TAG} (docs/gpu.md), or use `build cpu`"
        )
    # The installed distribution's metadata: `import tensorrt_llm` would load its CUDA and MPI bindings.
    pins.check_tensorrt_llm_version(importlib.metadata.version("tensorrt_llm"))


def build_gpu_repository(
    checkpoint: str | Path,
    output: str | Path,
    precision: str = "fp8",
    *,
    kv_cache: str | None = None,
    engine_settings: EngineSettings | None = None,
    vision_max_batch: int = 8,
    vision_precision: str = "bf16",
    vision_onnx: str | Path | None = None,
    cache_dir: str | Path | None = None,
    calib_text: int = 64,
    calib_image: int = 64,
    cpu_templates: str | Path = CPU_TEMPLATES,
    log=print,
) -> Path:
    """Build the gpu profile's repository (run inside the pinned container: see docs/gpu.md).

    precision: "fp8" | "int4_awq" (ModelOpt PTQ of the language model) | "bf16" (the checkpoint as is).
    kv_cache: "fp8" | "auto"; default fp8 for the quantized recipes, auto (bf16) for bf16.
    vision_onnx: an existing vision_encoder.onnx - the plain graph, not vision_encoder.ort.onnx, whose
    com.microsoft MultiHeadAttention TensorRT does not parse; default: export it into cache_dir with export/vision.py.
    Every model keeps what it reads in its version directory (as the cpu profile's): the repository
    can be moved, and the checkpoint can go.
    """
    from dataclasses import replace

    from medgemma_triton.gpu.quantize import quantize_checkpoint

    if precision not in PRECISIONS:
        raise ValueError(f"gpu precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    require_gpu_toolchain()
    checkpoint, output, cpu_templates = Path(checkpoint).absolute(), Path(output).absolute(), Path(cpu_templates)
    spec = ModelSpec.from_checkpoint(checkpoint)
    if not spec.multimodal:
        raise NotImplementedError(f"{checkpoint} is a text-only {spec.architecture}; the gpu profile serves Gemma3ForConditionalGeneration")
    kv_cache = kv_cache or ("auto" if precision == "bf16" else "fp8")
    settings = replace(engine_settings or EngineSettings(), kv_cache_dtype=kv_cache)
    plan = trt_vision.plan_vision_engine(spec, vision_max_batch, precision=vision_precision)
    cache = Path(cache_dir) if cache_dir else default_cache_dir(output)

    output.mkdir(parents=True, exist_ok=True)
    write_gpu_configs(spec, checkpoint, output, settings, plan, cpu_templates=cpu_templates)

    llm_checkpoint = output / LLM_MODEL / "1" / CHECKPOINT_DIR
    if precision == "bf16":
        shutil.copytree(checkpoint, llm_checkpoint, dirs_exist_ok=True)
    else:
        quantize_checkpoint(checkpoint, llm_checkpoint, precision=precision, kv_cache=kv_cache,
                            calib_text=calib_text, calib_image=calib_image, log=log)

    if vision_onnx is None:
        from medgemma_triton.export.vision import export_vision_encoder

        vision_onnx = export_vision_encoder(checkpoint, spec, cache / "vision", progress=log)
    trt_vision.build_vision_engine(
        vision_onnx, output / VISION_ENCODER_MODEL / "1" / PLAN_FILE, plan,
        timing_cache=cache / "vision.timing_cache", log=log,
    )
    log(f"gpu repository ({precision}, kv cache {kv_cache}) written to {output}")
    return output
