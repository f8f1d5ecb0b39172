"""The exported vision encoder in ONNX Runtime matches transformers' image features (fp32): both the
served graph with fused attention (vision_encoder.ort.onnx) and the plain graph TensorRT reads."""

from __future__ import annotations

import numpy as np
import pytest

from medgemma_triton.export.vision import VISION_ONNX
from medgemma_triton.export.vision_fusion import VISION_ORT_ONNX, attention_op_counts
from medgemma_triton.runtime.vision import OnnxVisionEncoder
from medgemma_triton.spec import ModelSpec

TOLERANCE = 1e-4  # fp32; measured 4e-7 (tiny) and 3e-6 (dev)
GRAPHS = [VISION_ORT_ONNX, VISION_ONNX]


@pytest.fixture(scope="module", params=["tiny", "dev"])
def exported(request):
    """(spec, export directory, transformers reference model) per checkpoint."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    checkpoint = request.getfixturevalue(f"{request.param}_checkpoint")
    onnx_dir = request.getfixturevalue(f"{request.param}_onnx")
    spec = ModelSpec.from_checkpoint(checkpoint)
    reference = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    yield spec, onnx_dir, reference
    del reference


@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("batch", [1, 3])
def test_image_features_match_transformers(exported, graph, batch):
    import torch

    spec, onnx_dir, reference = exported
    encoder = OnnxVisionEncoder(onnx_dir / graph, spec)
    size = spec.vision.image_size
    pixel_values = np.random.default_rng(batch).uniform(-1.0, 1.0, (batch, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = reference.get_image_features(torch.from_numpy(pixel_values)).pooler_output.numpy()
    image_embeddings = encoder.encode(pixel_values)
    assert image_embeddings.shape == (batch, spec.mm_tokens_per_image, spec.text.hidden_size)
    assert image_embeddings.dtype == np.float32
    assert np.abs(expected).max() > 0.1, "reference image features are ~0: the projector was not randomised"
    assert np.abs(image_embeddings - expected).max() <= TOLERANCE


@pytest.mark.parametrize("graph", GRAPHS)
def test_images_in_a_batch_are_independent(exported, graph):
    spec, onnx_dir, _ = exported
    encoder = OnnxVisionEncoder(onnx_dir / graph, spec)
    size = spec.vision.image_size
    pixel_values = np.random.default_rng(7).uniform(-1.0, 1.0, (2, 3, size, size)).astype(np.float32)
    together = encoder.encode(pixel_values)
    alone = encoder.encode(pixel_values[1:])
    assert np.abs(together[1:] - alone).max() <= TOLERANCE


def test_served_graph_fuses_every_attention_and_shares_the_weights(exported):
    """A fall back to the decomposed MatMul/Softmax/MatMul attention (~1.5x slower at 896 px) fails here."""
    import onnx

    spec, onnx_dir, _ = exported
    fused = onnx.load(str(onnx_dir / VISION_ORT_ONNX), load_external_data=False)
    plain = onnx.load(str(onnx_dir / VISION_ONNX), load_external_data=False)
    ops = [(node.domain, node.op_type) for node in fused.graph.node]
    assert attention_op_counts(ops) == {"fused": spec.vision.num_layers, "softmax": 0}
    external_files = {
        entry.value for tensor in fused.graph.initializer for entry in tensor.external_data if entry.key == "location"
    }
    assert external_files == {VISION_ONNX + ".data"}  # no second copy of the weights
    # the plain graph stays standard ONNX, which TensorRT's parser needs (the gpu profile)
    assert {node.domain for node in plain.graph.node} <= {"", "ai.onnx"}
    assert attention_op_counts((node.domain, node.op_type) for node in plain.graph.node)["fused"] == 0


def test_wrong_shapes_are_refused_clearly(tiny_onnx, tiny_checkpoint):
    spec = ModelSpec.from_checkpoint(tiny_checkpoint)
    encoder = OnnxVisionEncoder(tiny_onnx / VISION_ORT_ONNX, spec)
    size = spec.vision.image_size
    with pytest.raises(ValueError, match=rf"expected \[batch >= 1, 3, {size}, {size}\]"):
        encoder.encode(np.zeros((1, 3, size + 1, size), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        encoder.encode(np.zeros((3, size, size), dtype=np.float32))
    with pytest.raises(ValueError, match="dtype"):
        encoder.encode(np.zeros((1, 3, size, size), dtype=np.uint8))
    # float64 is accepted and converted
    assert encoder.encode(np.zeros((1, 3, size, size))).dtype == np.float32
