"""The exported vision encoder in ONNX Runtime (serving path: numpy + onnxruntime only).

pixel_values [B, 3, S, S] float32 (already resized/rescaled/normalized by the checkpoint's image
processor settings) -> image_embeddings [B, mm_tokens_per_image, text_hidden] float32.

The cpu profile serves `vision_encoder.ort.onnx`, whose attention is fused for ONNX Runtime's CPU
flash-attention kernel (export/vision_fusion.py); the plain `vision_encoder.onnx` loads here too, slower.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from medgemma_triton.spec import ModelSpec

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeddings"


class OnnxVisionEncoder:
    def __init__(self, model_path: str | Path, spec: ModelSpec, intra_op_threads: int | None = None):
        if spec.vision is None:
            raise ValueError(f"{spec.architecture} is text-only: it has no vision encoder")
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"vision encoder not found: {model_path} (run `medgemma-triton export`)")
        self.spec = spec
        self.image_size = spec.vision.image_size
        self.output_shape = (spec.vision.mm_tokens_per_image, spec.text.hidden_size)
        options = ort.SessionOptions()
        # Threads sleep instead of spinning between operators, leaving the cores to the decoder beside
        # it (docs/performance.md, "Settings chosen by measurement").
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if intra_op_threads is not None:
            options.intra_op_num_threads = int(intra_op_threads)
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise ValueError(
                f"{model_path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, found "
                f"inputs {sorted(inputs)} and outputs {sorted(outputs)}"
            )
        graph_size = inputs[INPUT_NAME].shape[2:]
        if list(graph_size) != [self.image_size, self.image_size]:
            raise ValueError(
                f"{model_path}: graph takes {graph_size} pixel images but the checkpoint's spec says "
                f"{self.image_size}x{self.image_size}: re-export it from this checkpoint"
            )

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """[B, 3, S, S] float32 -> [B, mm_tokens_per_image, hidden] float32."""
        pixel_values = np.asarray(pixel_values)
        expected = (3, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected or pixel_values.shape[0] < 1:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected "
                f"[batch >= 1, {expected[0]}, {expected[1]}, {expected[2]}]"
            )
        if pixel_values.dtype != np.float32:
            if not np.issubdtype(pixel_values.dtype, np.floating):
                raise ValueError(f"pixel_values has dtype {pixel_values.dtype}; expected float32")
            pixel_values = pixel_values.astype(np.float32)
        (image_embeddings,) = self.session.run(
            [OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(pixel_values)}
        )
        expected_out = (pixel_values.shape[0], *self.output_shape)
        if image_embeddings.shape != expected_out:
            raise RuntimeError(f"vision encoder returned {image_embeddings.shape}, expected {expected_out}")
        return image_embeddings
