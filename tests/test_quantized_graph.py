"""The quantized exports' graph rewrites (export/int4.py's rewrite_decoder, shared by int8): projections
reading one input merged into one product, and RMSNorms fused into ONNX Runtime's
SimplifiedLayerNormalization. On tiny, where graphs are small: the merge must not change a bit, the
fusion must match the unfused graph to fp32 rounding, and a graph whose norms it cannot all fuse must
fail the export and leave the file as it was."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from medgemma_triton.export.int4 import fuse_decoder_norms, quantize_decoder_int4
from medgemma_triton.export.int8 import quantize_decoder_int8
from medgemma_triton.runtime.decoder import OnnxDecoder
from medgemma_triton.spec import ModelSpec

NORMS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")


def _ops(path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node]


def _logits(path, spec: ModelSpec) -> np.ndarray:
    """A prefill and one decode step (a fixed next token, so both graphs see the same inputs)."""
    decoder = OnnxDecoder(path, spec, intra_op_threads=1)
    state = decoder.new_sequence(np.array([spec.tokens.bos, 100, 200, 300, 5, 17], dtype=np.int64))
    return np.stack([decoder.prefill(state), decoder.step(state, 7)])


def _copy_decoder(source_dir, tmp_path):
    """A copy of source_dir's decoder.onnx in tmp_path (ONNX Runtime refuses a symlinked .data)."""
    for name in ("decoder.onnx", "decoder.onnx.data"):
        shutil.copyfile(source_dir / name, tmp_path / name)
    return tmp_path / "decoder.onnx"


@pytest.mark.parametrize("quantize, op", [(quantize_decoder_int4, "MatMulNBits"),
                                          (quantize_decoder_int8, "DynamicQuantizeMatMul")], ids=["int4", "int8"])
def test_merged_projections_are_bit_identical(quantize, op, tiny_checkpoint, tiny_onnx, tmp_path):
    spec = ModelSpec.from_checkpoint(tiny_checkpoint)
    layers, quiet = spec.text.num_layers, (lambda _: None)
    separate = quantize(tiny_onnx / "decoder.onnx", tmp_path / "separate" / "decoder.onnx", progress=quiet,
                        merge_shared_input=False, fuse_norms=False)
    merged = quantize(tiny_onnx / "decoder.onnx", tmp_path / "merged" / "decoder.onnx", progress=quiet,
                      merge_shared_input=True, fuse_norms=False)
    head = 1  # int8's head is DynamicQuantizeMatMul, int4's an 8-bit MatMulNBits
    assert _ops(separate).count(op) == 7 * layers + head
    assert _ops(merged).count(op) == 4 * layers + head  # q/k/v and gate/up: one product each
    assert _ops(merged).count("Split") == _ops(separate).count("Split") + 2 * layers
    assert np.array_equal(_logits(merged, spec), _logits(separate, spec))


def test_norm_fusion_matches_the_unfused_graph(tiny_checkpoint, tiny_onnx, tmp_path):
    spec = ModelSpec.from_checkpoint(tiny_checkpoint)
    norms = 6 * spec.text.num_layers + 1  # input, post-attention, pre/post-feedforward, q, k; final
    assert "Pow" in _ops(tiny_onnx / "decoder.onnx")  # the fp32 reference is exported unfused
    fused = _copy_decoder(tiny_onnx, tmp_path)
    assert fuse_decoder_norms(fused) == norms
    ops = _ops(fused)
    assert sum(ops.count(op) for op in NORMS) == norms and "Pow" not in ops
    reference, result = _logits(tiny_onnx / "decoder.onnx", spec), _logits(fused, spec)
    np.testing.assert_allclose(result, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


def test_norm_fusion_refuses_a_graph_it_cannot_fully_fuse(tiny_onnx, tmp_path):
    graph = _copy_decoder(tiny_onnx, tmp_path)
    model = onnx.load(str(graph), load_external_data=False)
    reciprocal = next(node for node in model.graph.node if node.op_type == "Reciprocal")
    reciprocal.op_type = "Div"  # 1 / rms: the same norm, written in a form the rules do not match
    reciprocal.input.insert(0, "one")
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"))
    onnx.save(model, str(graph))
    before = graph.read_bytes()
    with pytest.raises(RuntimeError, match=r"fused \d+ of \d+ RMSNorms"):
        fuse_decoder_norms(graph)
    assert graph.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if ".fusing" in p.name] == []
