"""vision_encoder.onnx -> TensorRT plan for Triton's `tensorrt_plan` platform.

The plan (`VisionEnginePlan`) is a pure function of the checkpoint's spec and the serving limits,
so it is tested without TensorRT; `build_vision_engine` applies it with TensorRT's Python API
(TensorRT 10.13, the version in the pinned container; see pins.py).

Precision: bf16 by default, the dtype the reference model runs in (MedGemma's model card). The
vision tower is SigLIP, not Gemma: fp16 does not overflow in its matmuls the way Gemma 3's decoder
does, but the normalisations square and sum 1152 activations (SigLIP LayerNorm, the projector's
RMSNorm), which leaves fp16's range and loses bf16's precision. Those layers (normalisation,
reductions, pooling, and the element-wise/unary ops inside a norm) are pinned to fp32 with
OBEY_PRECISION_CONSTRAINTS. Softmax is left to TensorRT: its fused attention kernels accumulate in
fp32, and pinning the softmax layer would break that fusion. fp16 (same fp32 layers) exists for GPUs
without bf16 (Turing, Jetson Xavier); fp32 is the reference setting for debugging.
Inputs and outputs stay fp32 (`pixel_values` in, `image_embeddings` out), as in the ONNX graph.

Typing: the network is weakly typed (the precision comes from builder flags and per-layer pins, not
from the ONNX graph). TensorRT deprecated weak typing in 10.12 and removes it in 11, where the
precision must live in the graph (casts, e.g. from ModelOpt AutoCast) of a strongly typed network.
The pinned container has TensorRT 10.13, where weak typing still builds; a strongly typed build
would change the exported ONNX and could not be checked without a GPU. So builds are refused on any
TensorRT major other than pins.TENSORRT_MAJOR: moving to 11 means moving the precision into the graph.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from medgemma_triton.gpu.pins import TENSORRT_MAJOR
from medgemma_triton.spec import CheckpointError, ModelSpec

INPUT_NAME = "pixel_values"  # the names export/vision.py gives the ONNX graph
OUTPUT_NAME = "image_embeddings"
CHANNELS = 3
PRECISIONS = ("bf16", "fp16", "fp32")

# TensorRT LayerType names whose math must stay fp32 in bf16/fp16 engines (see module docstring).
FP32_LAYER_TYPES = ("NORMALIZATION", "REDUCE", "POOLING")
# Element-wise / unary layers are pinned only inside a norm (x*x, mean, +eps, rsqrt): matched by name.
FP32_NAMED_LAYER_TYPES = ("ELEMENTWISE", "UNARY")
NORM_NAME_MARKERS = ("norm", "layernorm", "layer_norm", "rmsnorm")

DEFAULT_WORKSPACE_BYTES = 4 << 30
WEAKLY_TYPED = 0  # create_network flags: no STRONGLY_TYPED (see the module docstring)


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
    fp32_layer_types: tuple[str, ...] = FP32_LAYER_TYPES
    fp32_named_layer_types: tuple[str, ...] = FP32_NAMED_LAYER_TYPES
    norm_name_markers: tuple[str, ...] = NORM_NAME_MARKERS

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

    def keeps_fp32(self, layer_type: str, layer_name: str) -> bool:
        """Whether a layer (TensorRT LayerType name, layer name) is pinned to fp32."""
        if self.precision == "fp32":
            return False
        if layer_type in self.fp32_layer_types:
            return True
        name = layer_name.lower()
        return layer_type in self.fp32_named_layer_types and any(m in name for m in self.norm_name_markers)

    def to_dict(self) -> dict:
        return {**asdict(self), "profile": self.profile, "output_shape": self.output_shape}


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
    log=print,
) -> Path:
    """Build and write the serialized engine; reuses and updates `timing_cache` when given."""
    import tensorrt as trt

    major = int(str(trt.__version__).split(".")[0])
    if major != TENSORRT_MAJOR:
        raise RuntimeError(
            f"the vision engine is built weakly typed, for TensorRT {TENSORRT_MAJOR}.x; found TensorRT "
            f"{trt.__version__}. Use the pinned container (medgemma_triton/gpu/pins.py) or move the "
            "precision into the ONNX graph for a strongly typed build (see trt_vision.py)"
        )
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(WEAKLY_TYPED)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves vision_encoder.onnx.data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    _check_io(network, plan)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    if plan.precision != "fp32":
        config.set_flag(trt.BuilderFlag.BF16 if plan.precision == "bf16" else trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = 0
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if plan.keeps_fp32(layer.type.name, layer.name):
                layer.precision = trt.float32
                for output in range(layer.num_outputs):
                    layer.set_output_type(output, trt.float32)
                pinned += 1
        log(f"vision engine: {plan.precision}, {pinned} of {network.num_layers} layers pinned to fp32")

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

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build the vision engine from {onnx_path} (see the log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    if cache_path:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    plan_path.with_suffix(".json").write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    return plan_path


def _check_io(network, plan: VisionEnginePlan) -> None:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    if [t.name for t in inputs] != [INPUT_NAME] or [t.name for t in outputs] != [OUTPUT_NAME]:
        raise RuntimeError(
            f"vision ONNX graph has inputs {[t.name for t in inputs]} and outputs {[t.name for t in outputs]}; "
            f"expected [{INPUT_NAME!r}] -> [{OUTPUT_NAME!r}] (re-export with `medgemma-triton export`)"
        )
    expected = tuple(plan.input_shape(-1)[1:])
    if tuple(inputs[0].shape)[1:] != expected:
        raise RuntimeError(f"vision ONNX input shape {tuple(inputs[0].shape)} does not match [-1, *{expected}] from the spec")
