"""Assemble a Triton model repository from the templates in model_repository/ and an ONNX export.

The templates are real, loadable config.pbtxt files. What varies per checkpoint (artifact and
checkpoint paths, image size, embedding dims, batch sizes, instance counts) is set here by parsing
each file against Triton's own schema (tritonclient's model_config_pb2), editing the message and
writing it back; the `medgemma` model's inputs and outputs are rewritten from medgemma_triton.contract.
Every generated repository is validated (schema, contract and the pipeline's wiring) before it is put in place.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from medgemma_triton import contract
from medgemma_triton.export.atomic import atomic_directory
from medgemma_triton.serving.templates import template_dir
from medgemma_triton.spec import ModelSpec

TEMPLATES = template_dir("model_repository")
PROFILES = ("cpu", "gpu")
CPU_PRECISIONS = ("fp32", "int4", "int8")
ALL_MODELS = (
    contract.PREPROCESSING_MODEL,
    contract.VISION_ENCODER_MODEL,
    contract.LLM_MODEL,
    contract.POSTPROCESSING_MODEL,
    contract.ENSEMBLE_MODEL,  # a Python (BLS) model on the cpu profile: see serving/pipeline.py
)


class RepositoryError(ValueError):
    """A model repository (template or generated) that Triton would refuse or wire wrongly."""


@dataclass(frozen=True)
class CpuSettings:
    """What the cpu profile's builder may vary; defaults suit a small CPU host."""

    vision_max_batch_size: int = 4
    # 0: no wait at low load; images that arrive while one is encoded still form the next batch
    vision_queue_delay_us: int = 0
    max_active_requests: int = 16
    decode_max_batch_size: int = 8  # sequences per batched decode call of the llm
    # Streamed tokens per response once one carried text (serving/engine.py). 4: the served overhead
    # (benchmarks/overhead.py, dev, 2 vCPU) was 4.6% / 0.6% (int4) and 3.1% / 3.4% (int8) in two runs each,
    # against 12.4% / 5.9% and 8.0% / 5.4% with 1 (every token); text still starts at the first token.
    stream_interval: int = 4
    intra_op_threads: int = 0  # 0: ONNX Runtime's choice
    preprocessing_instances: int = 1
    postprocessing_instances: int = 1
    detokenize: str = "pipeline"  # or "postprocessing": see serving/pipeline.py

    def __post_init__(self):
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1 (tokens per streamed response), got {self.stream_interval}")


# --- reading and writing config.pbtxt against Triton's schema ---


def read_config(path: str | Path) -> mc.ModelConfig:
    path = Path(path)
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())
    except text_format.ParseError as exc:
        raise RepositoryError(f"{path}: not a valid Triton model config: {exc}") from None


def write_config(config: mc.ModelConfig, path: str | Path) -> None:
    text = text_format.MessageToString(config)
    text_format.Parse(text, mc.ModelConfig())  # what we write must read back
    Path(path).write_text(text, encoding="utf-8")


def _data_type(triton_dtype: str) -> int:
    return mc.DataType.Value(f"TYPE_{triton_dtype}")


def _tensor(config: mc.ModelConfig, name: str, *, output: bool = False):
    for tensor in config.output if output else config.input:
        if tensor.name == name:
            return tensor
    kind = "output" if output else "input"
    raise RepositoryError(f"model {config.name!r} has no {kind} {name!r}")


def _set_dims(tensor, dims) -> None:
    del tensor.dims[:]
    tensor.dims.extend(int(d) for d in dims)


def _set_parameter(config: mc.ModelConfig, key: str, value) -> None:
    config.parameters[key].string_value = str(value)


def _set_instances(config: mc.ModelConfig, count: int) -> None:
    del config.instance_group[:]
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=int(count))


def contract_io(config: mc.ModelConfig) -> None:
    """Rewrite the `medgemma` model's inputs and outputs from the contract tables."""
    del config.input[:]
    del config.output[:]
    for t in contract.ENSEMBLE_INPUTS:
        config.input.add(name=t.name, data_type=_data_type(t.triton_dtype), dims=t.dims, optional=t.optional)
    for t in contract.ENSEMBLE_OUTPUTS:
        config.output.add(name=t.name, data_type=_data_type(t.triton_dtype), dims=t.dims)


# --- per-model edits ---


def configure(
    configs: dict[str, mc.ModelConfig],
    spec: ModelSpec,
    paths: dict[str, Path],
    settings: CpuSettings,
    served: dict[str, str],
):
    """Set everything that varies with the checkpoint and the host on parsed template configs.

    `served` (profile, precision, checkpoint_sha256) goes into the llm's parameters, so whoever
    talks to the server (benchmarks) can report what it serves.
    """
    image_size = spec.vision.image_size
    pixel_dims = (-1, 3, image_size, image_size)
    checkpoint = str(paths["checkpoint"])

    pre = configs[contract.PREPROCESSING_MODEL]
    _set_dims(_tensor(pre, "pixel_values", output=True), pixel_dims)
    _set_parameter(pre, "checkpoint", checkpoint)
    _set_instances(pre, settings.preprocessing_instances)

    vision = configs[contract.VISION_ENCODER_MODEL]
    vision.max_batch_size = settings.vision_max_batch_size
    _set_dims(_tensor(vision, "pixel_values"), (3, image_size, image_size))
    _set_dims(
        _tensor(vision, "image_embeddings", output=True), (spec.mm_tokens_per_image, spec.text.hidden_size)
    )
    vision.dynamic_batching.max_queue_delay_microseconds = settings.vision_queue_delay_us
    _set_parameter(vision, "checkpoint", checkpoint)
    _set_parameter(vision, "onnx_model", paths["vision_encoder"])
    _set_parameter(vision, "intra_op_threads", settings.intra_op_threads)

    llm = configs[contract.LLM_MODEL]
    _set_dims(_tensor(llm, "pixel_values"), pixel_dims)
    _set_parameter(llm, "checkpoint", checkpoint)
    _set_parameter(llm, "onnx_model", paths["decoder"])
    _set_parameter(llm, "intra_op_threads", settings.intra_op_threads)
    _set_parameter(llm, "max_active_requests", settings.max_active_requests)
    _set_parameter(llm, "decode_max_batch_size", settings.decode_max_batch_size)
    _set_parameter(llm, "stream_interval", settings.stream_interval)
    _set_parameter(llm, "vision_max_batch_size", settings.vision_max_batch_size)
    _set_instances(llm, 1)  # one scheduler owns every sequence
    for key, value in served.items():
        _set_parameter(llm, key, value)

    post = configs[contract.POSTPROCESSING_MODEL]
    _set_parameter(post, "checkpoint", checkpoint)
    _set_instances(post, settings.postprocessing_instances)

    ensemble = configs[contract.ENSEMBLE_MODEL]
    _set_parameter(ensemble, "checkpoint", checkpoint)
    _set_parameter(ensemble, "detokenize", settings.detokenize)
    contract_io(ensemble)


# --- validation ---


def _io(config: mc.ModelConfig):
    return {t.name: t for t in config.input}, {t.name: t for t in config.output}


def _check_contract(config: mc.ModelConfig, problems: list[str]) -> None:
    inputs, outputs = _io(config)
    for t in contract.ENSEMBLE_INPUTS:
        got = inputs.get(t.name)
        if got is None or got.data_type != _data_type(t.triton_dtype) or tuple(got.dims) != t.dims:
            problems.append(f"{config.name} input {t.name!r} does not match the contract")
        elif got.optional != t.optional:
            problems.append(f"{config.name} input {t.name!r}: optional must be {t.optional}")
    for t in contract.ENSEMBLE_OUTPUTS:
        got = outputs.get(t.name)
        if got is None or got.data_type != _data_type(t.triton_dtype) or tuple(got.dims) != t.dims:
            problems.append(f"{config.name} output {t.name!r} does not match the contract")
    extra = sorted(set(inputs) - {t.name for t in contract.ENSEMBLE_INPUTS})
    extra += sorted(set(outputs) - {t.name for t in contract.ENSEMBLE_OUTPUTS})
    if extra:
        problems.append(f"{config.name} has inputs/outputs outside the contract: {extra}")


def _check_link(configs, source: str, target: str, names, problems: list[str], *, source_is_output=True) -> None:
    """Each name is an output (or input) of `source` and an input of `target`, with the same dtype."""
    src_inputs, src_outputs = _io(configs[source])
    tgt_inputs, _ = _io(configs[target])
    produced = src_outputs if source_is_output else src_inputs
    for name in names:
        if name not in produced:
            problems.append(f"{source} has no {'output' if source_is_output else 'input'} {name!r} for {target}")
        elif name not in tgt_inputs:
            problems.append(f"{target} has no input {name!r} (sent by {source})")
        elif produced[name].data_type != tgt_inputs[name].data_type:
            problems.append(f"{source}.{name} -> {target}.{name}: data types differ")
        elif not source_is_output and produced[name].optional and not tgt_inputs[name].optional:
            problems.append(f"{target}.{name} is required but {source}.{name} is optional")


def validate_configs(configs: dict[str, mc.ModelConfig]) -> None:
    """Check what a schema parse cannot: names, the contract, and the pipeline's wiring.

    The wiring is serving.pipeline's tables: which request inputs go to which model, and which
    outputs flow on. A missing or mistyped link fails here, not at the first request.
    """
    from medgemma_triton.serving import pipeline as p

    problems = []
    for name, config in configs.items():
        if config.name != name:
            problems.append(f"{name}/config.pbtxt says name: {config.name!r}")
    missing = [m for m in ALL_MODELS if m not in configs]
    if missing:
        raise RepositoryError(f"missing models: {', '.join(missing)}")
    top = configs[contract.ENSEMBLE_MODEL]
    _check_contract(top, problems)
    for name in (contract.ENSEMBLE_MODEL, contract.LLM_MODEL):
        if not configs[name].model_transaction_policy.decoupled:
            problems.append(f"{name} must be decoupled (it streams)")

    try:
        p.detokenize_setting({key: value.string_value for key, value in top.parameters.items()})
    except ValueError as exc:
        problems.append(str(exc))
    _check_link(configs, contract.ENSEMBLE_MODEL, contract.PREPROCESSING_MODEL, p.PREPROCESSING_INPUTS, problems, source_is_output=False)
    _check_link(configs, contract.ENSEMBLE_MODEL, contract.LLM_MODEL, p.LLM_REQUEST_INPUTS, problems, source_is_output=False)
    _check_link(configs, contract.PREPROCESSING_MODEL, contract.LLM_MODEL, p.PREPROCESSING_TO_LLM, problems)
    _check_link(configs, contract.LLM_MODEL, contract.POSTPROCESSING_MODEL, p.LLM_TO_POSTPROCESSING, problems)
    _, top_outputs = _io(top)
    for source, names in ((contract.LLM_MODEL, p.LLM_TO_CLIENT), (contract.POSTPROCESSING_MODEL, p.POSTPROCESSING_TO_CLIENT)):
        _, outputs = _io(configs[source])
        for name in names:
            if name not in outputs or name not in top_outputs:
                problems.append(f"{source}.{name} does not reach the client")
            elif outputs[name].data_type != top_outputs[name].data_type or tuple(outputs[name].dims) != tuple(top_outputs[name].dims):
                problems.append(f"{source}.{name} differs from {contract.ENSEMBLE_MODEL}.{name}")
    produced = set(p.LLM_TO_CLIENT) | set(p.POSTPROCESSING_TO_CLIENT)
    for t in contract.ENSEMBLE_OUTPUTS:
        if t.name not in produced:
            problems.append(f"contract output {t.name!r} is produced by no model")
    llm_inputs, _ = _io(configs[contract.LLM_MODEL])
    if p.LLM_STOP_INPUT not in llm_inputs:
        problems.append(f"llm has no {p.LLM_STOP_INPUT!r} input (cancellation needs it)")

    vision = configs[contract.VISION_ENCODER_MODEL]
    if vision.max_batch_size < 1:
        problems.append("vision_encoder needs max_batch_size >= 1 (it batches images dynamically)")
    if not vision.HasField("dynamic_batching"):
        problems.append("vision_encoder needs dynamic_batching (images of concurrent requests batch together)")
    pre_outputs = _io(configs[contract.PREPROCESSING_MODEL])[1]
    vision_inputs = _io(vision)[0]
    if "pixel_values" in pre_outputs and "pixel_values" in vision_inputs:
        if tuple(pre_outputs["pixel_values"].dims[1:]) != tuple(vision_inputs["pixel_values"].dims):
            problems.append("preprocessing's pixel_values rows differ from vision_encoder's input")
    if problems:
        raise RepositoryError("invalid model repository:\n  " + "\n  ".join(problems))


def load_configs(repository: str | Path) -> dict[str, mc.ModelConfig]:
    repository = Path(repository)
    configs = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        configs[path.parent.name] = read_config(path)
    if not configs:
        raise RepositoryError(f"{repository}: no */config.pbtxt files")
    return configs


def validate_repository(repository: str | Path) -> dict[str, mc.ModelConfig]:
    repository = Path(repository)
    configs = load_configs(repository)
    missing = [m for m in ALL_MODELS if m not in configs]
    if missing:
        raise RepositoryError(f"{repository}: missing models {', '.join(missing)}")
    for name in ALL_MODELS:
        if configs[name].backend != "python":
            raise RepositoryError(f"{name}: backend is {configs[name].backend!r}; the cpu profile is Python-backend only")
        if not (repository / name / "1" / "model.py").is_file():
            raise RepositoryError(f"{repository / name}: missing 1/model.py")
    validate_configs(configs)
    return configs


# --- the build ---


def default_cache_dir(output: Path) -> Path:
    return output.parent / f"{output.name}.artifacts"


def build_repository(
    checkpoint,
    output,
    profile: str = "cpu",
    precision: str = "fp32",
    cache_dir=None,
    settings: CpuSettings | None = None,
    onnx_dir=None,
) -> Path:
    """Export (cached) and write a complete model repository to `output` (replaced atomically).

    The export goes to `onnx_dir` if given, else `<cache_dir>/onnx-<precision>` (cache_dir defaults
    to `<output>.artifacts` beside the output); an up-to-date export there is reused as is. The
    repository refers to the export and the checkpoint by absolute path: keep both in place.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    if profile == "gpu":  # inside NVIDIA's Triton TensorRT-LLM container (docs/gpu.md)
        from medgemma_triton.gpu.repository import build_gpu_repository

        return build_gpu_repository(checkpoint, output, precision=precision, cache_dir=cache_dir)
    if precision not in CPU_PRECISIONS:
        raise ValueError(f"precision {precision!r} is not available on the cpu profile (choose {', '.join(CPU_PRECISIONS)})")
    checkpoint = Path(checkpoint).absolute()
    output = Path(output).absolute()
    spec = ModelSpec.from_checkpoint(checkpoint)
    if not spec.multimodal:
        raise NotImplementedError(
            f"{checkpoint} is a text-only {spec.architecture}; the serving repository needs "
            "Gemma3ForConditionalGeneration (text-only checkpoints are a later issue)"
        )
    settings = settings or CpuSettings()
    validate_repository(TEMPLATES)  # a broken template fails here, not at server start

    from medgemma_triton.export.manifest import read_manifest
    from medgemma_triton.export.vision_fusion import VISION_ORT_ONNX
    from medgemma_triton.export.onnx_export import DECODER_ONNX, export_onnx

    fp32_source = None
    if onnx_dir is None:
        cache_dir = Path(cache_dir).absolute() if cache_dir else default_cache_dir(output)
        onnx_dir = cache_dir / f"onnx-{precision}"
        fp32_source = cache_dir / "onnx-fp32"  # quantized from it when it is an up-to-date fp32 export
    artifacts = Path(export_onnx(checkpoint, Path(onnx_dir).absolute(), precision=precision,
                                 fp32_source=fp32_source)).absolute()
    paths = {
        "checkpoint": checkpoint,
        "vision_encoder": artifacts / VISION_ORT_ONNX,  # attention fused for ORT's CPU flash kernel
        "decoder": artifacts / DECODER_ONNX,
    }
    for key in ("vision_encoder", "decoder"):
        if not paths[key].is_file():
            raise RepositoryError(f"the export at {artifacts} has no {paths[key].name}")

    manifest = read_manifest(artifacts) or {}
    served = {
        "profile": profile,
        "precision": manifest.get("precision", precision),
        "checkpoint_sha256": manifest.get("source_checkpoint", {}).get("sha256", ""),
    }
    configs = load_configs(TEMPLATES)
    configure(configs, spec, paths, settings, served)
    validate_configs(configs)
    with atomic_directory(output) as staging:
        for name in ALL_MODELS:
            shutil.copytree(
                TEMPLATES / name, staging / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
            write_config(configs[name], staging / name / "config.pbtxt")
        validate_repository(staging)
    return output

