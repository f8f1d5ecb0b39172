"""SigLIP vision tower + Gemma 3 multimodal projector -> `vision_encoder.onnx` (+ `vision_encoder.ort.onnx`).

pixel_values [B, 3, S, S] float32 -> image_embeddings [B, mm_tokens_per_image, text_hidden] float32,
batch dynamic. The graph is exactly transformers' `Gemma3Model.get_image_features(...).pooler_output`
(transformers 5.23): the SigLIP tower's last_hidden_state (no attention-pooling head), then the
projector (avg-pool to mm_tokens_per_image, RMSNorm, matmul). The modules are transformers' own
classes; only the weights are loaded by hand, so the language model (most of the checkpoint) is never
read. The weights go to `vision_encoder.onnx.data` (the real tower is ~1.7 GB in fp32).

`vision_encoder.onnx` is plain ONNX (what TensorRT builds the gpu profile's plan from);
`vision_encoder.ort.onnx` is the same graph with ONNX Runtime's fused attention (what the cpu profile
serves; export/vision_fusion.py) and reads the same `.data` file.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from medgemma_triton.export.vision_fusion import VISION_ORT_ONNX, fuse_attention
from medgemma_triton.spec import CheckpointError, ModelSpec

VISION_ONNX = "vision_encoder.onnx"
OPSET = 20
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeddings"

# Checkpoint key layouts seen in the wild: transformers 5.x saves `vision_tower.*` /
# `multi_modal_projector.*` (optionally under `model.`); transformers 4.x (google/medgemma-4b-it)
# saves `vision_tower.vision_model.*`.
_VISION_KEY = re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(?P<name>.+)$")
_PROJECTOR_KEY = re.compile(r"^(?:model\.)?multi_modal_projector\.(?P<name>.+)$")


def build_vision_encoder(config):
    """transformers' SigLIP tower + Gemma 3 projector for a Gemma3Config, fp32, randomly initialised."""
    import torch
    from transformers import AutoModel
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    class VisionEncoder(torch.nn.Module):
        """Gemma3Model.get_image_features(pixel_values).pooler_output as a module."""

        def __init__(self, config):
            super().__init__()
            self.vision_tower = AutoModel.from_config(config.vision_config)
            self.multi_modal_projector = Gemma3MultiModalProjector(config)

        def forward(self, pixel_values):
            hidden = self.vision_tower(pixel_values=pixel_values, return_dict=True).last_hidden_state
            return self.multi_modal_projector(hidden)

    config.vision_config._attn_implementation = "sdpa"
    return VisionEncoder(config).to(torch.float32).eval()


def _vision_encoder_module(checkpoint: Path):
    """The vision encoder with the checkpoint's weights; the language model's tensors are never read."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    module = build_vision_encoder(AutoConfig.from_pretrained(checkpoint))  # every weight is replaced below
    tower_state, projector_state = {}, {}
    for weights in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(weights, framework="pt") as f:
            for key in f.keys():
                if match := _VISION_KEY.match(key):
                    tower_state[match["name"]] = f.get_tensor(key).to(torch.float32)
                elif match := _PROJECTOR_KEY.match(key):
                    projector_state[match["name"]] = f.get_tensor(key).to(torch.float32)
    for part, state in (("vision_tower", tower_state), ("multi_modal_projector", projector_state)):
        expected = set(getattr(module, part).state_dict())
        missing = sorted(expected - set(state))
        if missing:
            raise CheckpointError(
                f"{checkpoint}: weights lack {len(missing)} {part} tensors (e.g. {missing[0]!r})"
            )
        # assign=True takes the loaded tensors instead of copying them (no second copy of the weights)
        getattr(module, part).load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    return module.eval()


def load_vision_encoder(checkpoint: str | Path):
    """The torch reference module of what gets exported (tests and benchmarks compare against it)."""
    return _vision_encoder_module(Path(checkpoint))


def export_vision_module(module, spec: ModelSpec, out_dir: Path, progress=print) -> Path:
    """Export an already-built vision encoder module (see load_vision_encoder) to out_dir; returns the
    plain graph's path (the ORT-fused one is beside it, named VISION_ORT_ONNX)."""
    import torch

    vision = spec.vision
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / VISION_ONNX
    # Batch 2 for tracing, so the exporter never specialises the batch dimension to 1.
    example = torch.zeros(2, 3, vision.image_size, vision.image_size, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=1024)
    started = time.perf_counter()
    progress(f"exporting the vision encoder ({vision.num_layers} SigLIP layers, {vision.image_size} px)")
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"pixel_values": {0: batch}},
            optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=True)
    _check_vision_graph(path, spec)
    _check_vision_graph(fuse_attention(path, out_dir / VISION_ORT_ONNX, vision.num_layers), spec)
    progress(f"vision encoder written: {path.name}, {VISION_ORT_ONNX} ({time.perf_counter() - started:.1f} s)")
    return path


def export_vision_encoder(checkpoint: str | Path, spec: ModelSpec, out_dir: str | Path, progress=print) -> Path:
    """Export the checkpoint's vision encoder to out_dir/vision_encoder.onnx (+ .data, + the ORT-fused
    vision_encoder.ort.onnx); returns the plain graph's path."""
    if not spec.multimodal:
        raise CheckpointError(f"{checkpoint}: {spec.architecture} has no vision tower to export")
    progress("loading the vision tower and projector weights")
    module = _vision_encoder_module(Path(checkpoint))
    return export_vision_module(module, spec, Path(out_dir), progress)


def _check_vision_graph(path: Path, spec: ModelSpec) -> None:
    """The saved graph has the contract's names and shapes (catches exporter surprises early)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    (graph_input,) = model.graph.input
    (graph_output,) = model.graph.output

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    size, tokens = spec.vision.image_size, spec.vision.mm_tokens_per_image
    expected_in = ["batch", 3, size, size]
    expected_out = ["batch", tokens, spec.text.hidden_size]
    got_in, got_out = dims(graph_input), dims(graph_output)
    if (graph_input.name, graph_output.name) != (INPUT_NAME, OUTPUT_NAME) or not (
        isinstance(got_in[0], str) and got_in[1:] == expected_in[1:]
        and isinstance(got_out[0], str) and got_out[1:] == expected_out[1:]
    ):
        raise RuntimeError(
            f"exported vision graph is {graph_input.name}{got_in} -> {graph_output.name}{got_out}, "
            f"expected {INPUT_NAME}{expected_in} -> {OUTPUT_NAME}{expected_out}"
        )
