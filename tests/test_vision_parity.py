"""The exported vision encoder in ONNX Runtime matches transformers' image features (fp32)."""

from __future__ import annotations

import numpy as np
import pytest

from medgemma_triton.runtime.vision import OnnxVisionEncoder
from medgemma_triton.spec import ModelSpec

TOLERANCE = 1e-4  # fp32; measured 4e-7 (tiny) and 3e-6 (dev)


@pytest.fixture(scope="module", params=["tiny", "dev"])
def exported(request):
    """(checkpoint, spec, ONNX vision encoder, transformers reference model) per checkpoint."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    checkpoint = request.getfixturevalue(f"{request.param}_checkpoint")
    onnx_dir = request.getfixturevalue(f"{request.param}_onnx")
    spec = ModelSpec.from_checkpoint(checkpoint)
    encoder = OnnxVisionEncoder(onnx_dir / "vision_encoder.onnx", spec)
    reference = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    yield spec, encoder, reference
    del reference


@pytest.mark.parametrize("batch", [1, 3])
def test_image_features_match_transformers(exported, batch):
    import torch

    spec, encoder, reference = exported
    size = spec.vision.image_size
    pixel_values = np.random.default_rng(batch).uniform(-1.0, 1.0, (batch, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        expected = reference.get_image_features(torch.from_numpy(pixel_values)).pooler_output.numpy()
    image_embeddings = encoder.encode(pixel_values)
    assert image_embeddings.shape == (batch, spec.mm_tokens_per_image, spec.text.hidden_size)
    assert image_embeddings.dtype == np.float32
    assert np.abs(expected).max() > 0.1, "reference image features are ~0: the projector was not randomised"
    assert np.abs(image_embeddings - expected).max() <= TOLERANCE


def test_images_in_a_batch_are_independent(exported):
    spec, encoder, _ = exported
    size = spec.vision.image_size
    pixel_values = np.random.default_rng(7).uniform(-1.0, 1.0, (2, 3, size, size)).astype(np.float32)
    together = encoder.encode(pixel_values)
    alone = encoder.encode(pixel_values[1:])
    assert np.abs(together[1:] - alone).max() <= TOLERANCE


def test_wrong_shapes_are_refused_clearly(tiny_onnx, tiny_checkpoint):
    spec = ModelSpec.from_checkpoint(tiny_checkpoint)
    encoder = OnnxVisionEncoder(tiny_onnx / "vision_encoder.onnx", spec)
    size = spec.vision.image_size
    with pytest.raises(ValueError, match=rf"expected \[batch >= 1, 3, {size}, {size}\]"):
        encoder.encode(np.zeros((1, 3, size + 1, size), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        encoder.encode(np.zeros((3, size, size), dtype=np.float32))
    with pytest.raises(ValueError, match="dtype"):
        encoder.encode(np.zeros((1, 3, size, size), dtype=np.uint8))
    # float64 is accepted and converted
    assert encoder.encode(np.zeros((1, 3, size, size))).dtype == np.float32
