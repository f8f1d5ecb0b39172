"""Assemble the cpu profile's Triton model repository from the templates in model_repository/ and an ONNX export.

The templates are real, loadable config.pbtxt files. What varies per checkpoint (image size,
embedding dims, batch sizes, instance counts) is set here by parsing
each file against Triton's own schema (medgemma_triton.repository.config), editing the message and
writing it back; the `medgemma` model's inputs and outputs are rewritten from medgemma_triton.contract.
Every generated repository is validated (schema, contract and the pipeline's wiring) before it is put in place.

A built repository is self-contained and relocatable: each model's version directory holds what it
reads (the export's ONNX files, and the checkpoint's tokenizer, processor and config files in
`1/checkpoint/`, never its weights), hard-linked from the export cache and the checkpoint where the
filesystem allows (so nothing is duplicated), copied otherwise; config parameters name them relative
to the version directory (serving/triton_io.model_path). `cp -r` or `mv` it anywhere and serve it.
`medgemma-triton build` picks this builder or the gpu one in medgemma_triton.repository.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, fields
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from medgemma_triton import contract
from medgemma_triton.contract import VISION_INPUT, VISION_OUTPUT
from medgemma_triton.export.atomic import atomic_directory
from medgemma_triton.repository.config import (
    ALL_MODELS,
    CHECKPOINT_DIR,
    CHECKPOINT_SERVING_FILES,
    RepositoryError,
    contract_io,
    default_cache_dir,
    link_or_copy,
    load_configs,
    set_dims,
    set_parameter,
    tensor,
    validate_configs,
    write_config,
)
from medgemma_triton.serving.parameters import LlmParameters, MedgemmaParameters
from medgemma_triton.repository.templates import template_dir
from medgemma_triton.spec import ModelSpec

TEMPLATES = template_dir("model_repository")
CPU_PRECISIONS = contract.PRECISIONS["cpu"]
DECODER_ENGINES = ("llama.cpp", "onnxruntime")  # for int4/int8; fp32 is always the ONNX reference
SOURCE_CHECKPOINT = "source_checkpoint"  # llm parameter: where the build read the checkpoint (reports only)


@dataclass(frozen=True)
class CpuSettings:
    """What the cpu profile's builder may vary; defaults suit a small CPU host."""

    vision_max_batch_size: int = MedgemmaParameters.vision_max_batch_size
    # 0: no wait at low load; images that arrive while one is encoded still form the next batch
    vision_queue_delay_us: int = 0
    # the llm's parameters: serving/parameters.py says what each does
    max_active_requests: int = LlmParameters.max_active_requests
    decode_max_batch_size: int = LlmParameters.decode_max_batch_size
    stream_interval: int = LlmParameters.stream_interval
    prefill_chunk_tokens: int = LlmParameters.prefill_chunk_tokens
    intra_op_threads: int = LlmParameters.intra_op_threads
    preprocessing_instances: int = 1
    # int8 weight storage of int8/int4 exports: "unsigned" (every CPU) or "signed" (VNNI/AMX CPUs only;
    # faster there; the host check refuses it elsewhere): export/int4.py
    int8_weights: str = "unsigned"
    # int4 exports: the projections' block size (None: export/int4.py's BLOCK_SIZE, the quality-gated one)
    int4_block_size: int | None = None
    # int4/int8: what runs the decoder. "llama.cpp": a Q4_K_M / Q8_0 GGUF on llama.cpp's kernels
    # (export/gguf.py, runtime/llamacpp.py); "onnxruntime": the ONNX int4/int8 exports (export/int4.py, int8.py)
    decoder_engine: str = "llama.cpp"
    kv_cache_tokens: int = LlmParameters.kv_cache_tokens

    def __post_init__(self):
        self.llm_parameters()  # checks them
        MedgemmaParameters(vision_max_batch_size=self.vision_max_batch_size)  # checks it, as the model will
        if self.decoder_engine not in DECODER_ENGINES:
            raise ValueError(f"decoder_engine must be one of {', '.join(DECODER_ENGINES)}, got {self.decoder_engine!r}")
        if self.decoder_engine == "llama.cpp" and (self.int8_weights != "unsigned" or self.int4_block_size is not None):
            raise ValueError("int8_weights and int4_block_size set the onnxruntime decoder (decoder_engine onnxruntime)")

    def llm_parameters(self) -> LlmParameters:
        return LlmParameters(**{f.name: getattr(self, f.name) for f in fields(LlmParameters)})


def _set_instances(config: mc.ModelConfig, count: int) -> None:
    del config.instance_group[:]
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=int(count))


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
    checkpoint = CHECKPOINT_DIR  # relative to each model's version directory: see place_files

    pre = configs[contract.PREPROCESSING_MODEL]
    set_dims(tensor(pre, VISION_INPUT, output=True), pixel_dims)
    set_parameter(pre, "checkpoint", checkpoint)
    _set_instances(pre, settings.preprocessing_instances)

    vision = configs[contract.VISION_ENCODER_MODEL]
    vision.max_batch_size = settings.vision_max_batch_size
    set_dims(tensor(vision, VISION_INPUT), (3, image_size, image_size))
    set_dims(tensor(vision, VISION_OUTPUT, output=True), (spec.mm_tokens_per_image, spec.text.hidden_size))
    vision.dynamic_batching.max_queue_delay_microseconds = settings.vision_queue_delay_us
    set_parameter(vision, "checkpoint", checkpoint)
    set_parameter(vision, "onnx_model", paths["vision_encoder"].name)
    set_parameter(vision, "intra_op_threads", settings.intra_op_threads)

    llm = configs[contract.LLM_MODEL]
    set_dims(tensor(llm, VISION_OUTPUT), (-1, spec.mm_tokens_per_image, spec.text.hidden_size))
    set_parameter(llm, "checkpoint", checkpoint)
    gguf = paths["decoder"].suffix == ".gguf"
    set_parameter(llm, "gguf_model" if gguf else "onnx_model", paths["decoder"].name)
    set_parameter(llm, SOURCE_CHECKPOINT, paths["checkpoint"])
    for name, value in vars(settings.llm_parameters()).items():
        set_parameter(llm, name, value)
    _set_instances(llm, 1)  # one scheduler owns every sequence
    for key, value in served.items():
        set_parameter(llm, key, value)

    top = configs[contract.TOP_MODEL]
    set_parameter(top, "checkpoint", checkpoint)
    set_parameter(top, "vision_max_batch_size", settings.vision_max_batch_size)
    contract_io(top)


def place_files(repository: Path, checkpoint: Path, paths: dict[str, Path]) -> None:
    """Put what each model reads into its version directory: the checkpoint's serving files (in
    CHECKPOINT_DIR) for all four, the decoder's export files for the llm, the vision encoder's for
    vision_encoder (an ONNX file and its external data, and the export's manifest and host check)."""
    serving_files = [checkpoint / name for name in CHECKPOINT_SERVING_FILES if (checkpoint / name).is_file()]
    for name in ALL_MODELS:
        for source in serving_files:
            link_or_copy(source, repository / name / "1" / CHECKPOINT_DIR / source.name)
    for model, key in ((contract.LLM_MODEL, "decoder"), (contract.VISION_ENCODER_MODEL, "vision_encoder")):
        export = paths[key].parent
        stem = paths[key].name.split(".", 1)[0]  # decoder.onnx -> decoder*, vision_encoder.ort.onnx -> vision_encoder*
        for source in sorted(export.iterdir()):
            if source.is_file() and (source.name.startswith(stem) or source.name == "manifest.json"):
                link_or_copy(source, repository / model / "1" / source.name)


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


def build_cpu_repository(
    checkpoint,
    output,
    precision: str = "fp32",
    cache_dir=None,
    settings: CpuSettings | None = None,
    onnx_dir=None,
) -> Path:
    """Export (cached) and write a complete cpu model repository to `output` (replaced atomically).

    The export goes to `onnx_dir` if given, else `<cache_dir>/onnx-<precision>` (cache_dir defaults
    to `<output>.artifacts` beside the output); an up-to-date export there is reused as is. The
    repository holds (hard links to) the files it serves: it can be moved, and the export and the
    checkpoint can go.
    """
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
    from medgemma_triton.export.onnx_export import DECODER_ONNX, export_onnx
    from medgemma_triton.export.vision_fusion import VISION_ORT_ONNX

    cache_dir = Path(cache_dir).absolute() if cache_dir else default_cache_dir(output)
    if precision != "fp32" and settings.decoder_engine == "llama.cpp":
        from medgemma_triton.export.gguf import DECODER_GGUF, export_gguf

        if onnx_dir is not None:
            raise ValueError("onnx_dir is an ONNX export; the llama.cpp decoder is built from the checkpoint "
                             "(use CpuSettings(decoder_engine='onnxruntime') to serve an ONNX int4/int8 export)")
        artifacts = Path(export_gguf(checkpoint, cache_dir / f"gguf-{precision}",
                                     precision, vision_source=cache_dir / "onnx-fp32"))
        decoder = artifacts / DECODER_GGUF
    else:
        fp32_source = None
        if onnx_dir is None:
            suffix = "-signed" if precision != "fp32" and settings.int8_weights == "signed" else ""
            if precision == "int4" and settings.int4_block_size is not None:
                suffix += f"-block{settings.int4_block_size}"
            onnx_dir = cache_dir / f"onnx-{precision}{suffix}"
            fp32_source = cache_dir / "onnx-fp32"  # quantized from it when it is an up-to-date fp32 export
        artifacts = Path(export_onnx(checkpoint, Path(onnx_dir).absolute(), precision=precision,
                                     fp32_source=fp32_source, int8_weights=settings.int8_weights,
                                     int4_block_size=settings.int4_block_size if precision == "int4" else None)).absolute()
        decoder = artifacts / DECODER_ONNX
    paths = {
        "checkpoint": checkpoint,
        "vision_encoder": artifacts / VISION_ORT_ONNX,  # attention fused for ORT's CPU flash kernel
        "decoder": decoder,
    }
    for key in ("vision_encoder", "decoder"):
        if not paths[key].is_file():
            raise RepositoryError(f"the export at {artifacts} has no {paths[key].name}")

    manifest = read_manifest(artifacts) or {}
    served = {
        "profile": "cpu",
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
        place_files(staging, checkpoint, paths)
        validate_repository(staging)
    return output

