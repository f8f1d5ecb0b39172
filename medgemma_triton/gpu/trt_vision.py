"""vision_encoder.onnx -> TensorRT plan for Triton's `tensorrt_plan` platform.

The plan (`VisionEnginePlan`) is a pure function of the checkpoint's spec and the serving limits,
so it is tested without TensorRT; `build_vision_engine` applies it with TensorRT's Python API.

Typing: the network is strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED): every tensor's
type comes from the ONNX graph, and no precision builder flag or per-layer precision is set. TensorRT
10.12+ builds strongly typed networks on request; TensorRT 11 removes weak typing (BuilderFlag.FP16/BF16,
OBEY_PRECISION_CONSTRAINTS) and accepts and ignores the flag. So one code path serves both (NVIDIA's
migration guide: TensorRT's `.agents/skills/trt-strong-typing-migration/SKILL.md`; Python API:
`tensorrt.NetworkDefinitionCreationFlag` in the 10.14 and 11.0 references).

Precision: bf16 by default, the dtype the reference model runs in (MedGemma's model card), written
into the graph by vision_typed.py (ModelOpt AutoCast): bf16 matmuls with LayerNorms, softmax,
reductions, pooling and the projector's RMSNorm in fp32. fp16 (same fp32 ops) exists for GPUs without
bf16 (Turing, Jetson Xavier); fp32 builds the exported graph as it is, the reference for debugging.
Inputs and outputs stay fp32 (`pixel_values` in, `image_embeddings` out), as in the cpu profile's graph.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from medgemma_triton.spec import CheckpointError, ModelSpec

INPUT_NAME = "pixel_values"  # the names export/vision.py gives the ONNX graph
OUTPUT_NAME = "image_embeddings"
CHANNELS = 3
PRECISIONS = ("bf16", "fp16", "fp32")

# TensorRT versions whose strongly typed build this was checked against (see the module docstring):
# from 10.12, where strong typing is complete, through 11.x; a version outside is refused.
TENSORRT_STRONGLY_TYPED = ((10, 12), (12, 0))  # [first, first not read)

DEFAULT_WORKSPACE_BYTES = 4 << 30


@dataclass(frozen=True)
class VisionEnginePlan:
    image_size: int
    mm_tokens_per_image: int
    text_hidden_size: int
    min_batch: int
    opt_batch: int
    max_batch: int
    precision: str
    workspace_bytes: int

    def input_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, CHANNELS, self.image_size, self.image_size)

    @property
    def profile(self) -> dict[str, tuple[int, int, int, int]]:
        """The optimization profile for `pixel_values`: TensorRT's (min, opt, max) shapes."""
        return {
            "min": self.input_shape(self.min_batch),
            "opt": self.input_shape(self.opt_batch),
            "max": self.input_shape(self.max_batch),
        }

    @property
    def output_shape(self) -> tuple[int, int]:
        """image_embeddings per image (Triton dims without the batch dimension)."""
        return (self.mm_tokens_per_image, self.text_hidden_size)

    @property
    def fp32_op_types(self) -> tuple[str, ...]:
        """ONNX op types the typed graph computes in fp32 (all of them for an fp32 plan)."""
        from medgemma_triton.gpu.vision_typed import FP32_OP_TYPES

        return FP32_OP_TYPES if self.precision != "fp32" else ("*",)

    def to_dict(self) -> dict:
        return {**asdict(self), "profile": self.profile, "output_shape": self.output_shape,
                "strongly_typed": True, "fp32_op_types": list(self.fp32_op_types)}


def plan_vision_engine(
    spec: ModelSpec,
    max_batch_size: int = 8,
    opt_batch_size: int | None = None,
    precision: str = "bf16",
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> VisionEnginePlan:
    """The engine plan for a checkpoint: image size, tokens and hidden size come from its config.

    `max_batch_size` is the most images one engine call takes (Triton's dynamic batcher never forms
    a larger batch: repository.py writes the same number into config.pbtxt); `opt_batch_size`
    (default: half of it, rounded up) is the shape TensorRT tunes its kernels for.
    """
    if spec.vision is None:
        raise CheckpointError(f"{spec.architecture} has no vision tower: the gpu profile's vision_encoder needs one")
    if precision not in PRECISIONS:
        raise ValueError(f"vision engine precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size} must be at least 1")
    opt = opt_batch_size if opt_batch_size is not None else (max_batch_size + 1) // 2
    if not 1 <= opt <= max_batch_size:
        raise ValueError(f"opt_batch_size={opt} must be between 1 and max_batch_size={max_batch_size}")
    if spec.image_processing and (spec.image_processing.height, spec.image_processing.width) != (
        spec.vision.image_size,
        spec.vision.image_size,
    ):
        raise CheckpointError(
            f"image processor resizes to {spec.image_processing.height}x{spec.image_processing.width} but the "
            f"vision tower takes {spec.vision.image_size}x{spec.vision.image_size}"
        )
    return VisionEnginePlan(
        image_size=spec.vision.image_size,
        mm_tokens_per_image=spec.vision.mm_tokens_per_image,
        text_hidden_size=spec.text.hidden_size,
        min_batch=1,
        opt_batch=opt,
        max_batch=max_batch_size,
        precision=precision,
        workspace_bytes=workspace_bytes,
    )


def build_vision_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    plan: VisionEnginePlan,
    timing_cache: str | Path | None = None,
    typed_dir: str | Path | None = None,
    log=print,
) -> Path:
    """Build and write the serialized engine from the fp32 vision_encoder.onnx; reuses and updates
    `timing_cache` when given. For bf16/fp16 the typed graph (vision_typed.py) is written to typed_dir
    (default: a temporary directory, removed after the build) and the engine is built from it."""
    import tensorrt as trt

    check_tensorrt_version(trt.__version__)
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    with tempfile.TemporaryDirectory(prefix="vision-typed-") as scratch:
        source = onnx_path
        if plan.precision != "fp32":
            from medgemma_triton.gpu.vision_typed import type_vision_graph

            source = type_vision_graph(onnx_path, Path(typed_dir or scratch), plan.precision, log=log)
        serialized, config = _build(trt, source, plan, timing_cache, log)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if timing_cache:
        cache_path = Path(timing_cache)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    plan_path.with_suffix(".json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return plan_path


def check_tensorrt_version(version: str) -> None:
    """Refuse a TensorRT outside TENSORRT_STRONGLY_TYPED, with what to do."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    first, beyond = TENSORRT_STRONGLY_TYPED
    if match is None or not first <= (int(match[1]), int(match[2])) < beyond:
        raise RuntimeError(
            f"the vision engine is built strongly typed for TensorRT {first[0]}.{first[1]} up to "
            f"{beyond[0] - 1}.x; found TensorRT {version}. Use the pinned container (medgemma_triton/gpu/pins.py)"
        )


def _build(trt, source: Path, plan: VisionEnginePlan, timing_cache, log):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Required on TensorRT 10.x, accepted and ignored on 11 (always strongly typed).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):  # resolves the graph's .data file beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {source}: {errors}")
    _check_io(network, plan, trt.float32)

    config = builder.create_builder_config()  # no precision flag: the types are the graph's
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    profile = builder.create_optimization_profile()
    shapes = plan.profile
    profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False):
        if not cache_bytes:
            raise RuntimeError("TensorRT refused a new, empty timing cache (see the log above)")
        log(f"timing cache {cache_path} was written by another TensorRT version or GPU; starting a new one")
        if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            raise RuntimeError("TensorRT refused a new, empty timing cache (see the log above)")

    log(f"vision engine: strongly typed {plan.precision} network, {network.num_layers} layers")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build the vision engine from {source} (see the log above)")
    return serialized, config


def _check_io(network, plan: VisionEnginePlan, float32) -> None:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    if [t.name for t in inputs] != [INPUT_NAME] or [t.name for t in outputs] != [OUTPUT_NAME]:
        raise RuntimeError(
            f"vision ONNX graph has inputs {[t.name for t in inputs]} and outputs {[t.name for t in outputs]}; "
            f"expected [{INPUT_NAME!r}] -> [{OUTPUT_NAME!r}] (re-export with `medgemma-triton export`)"
        )
    wrong = [t.name for t in (*inputs, *outputs) if t.dtype != float32]
    if wrong:
        raise RuntimeError(f"vision network tensors {wrong} are not fp32: the typed graph must keep fp32 inputs and outputs")
    expected = tuple(plan.input_shape(-1)[1:])
    if tuple(inputs[0].shape)[1:] != expected:
        raise RuntimeError(f"vision ONNX input shape {tuple(inputs[0].shape)} does not match [-1, *{expected}] from the spec")
