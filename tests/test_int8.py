"""int8 (W8A8) decoder: structure, the export path on tiny, and quality against fp32 on the dev checkpoint.

Bounds come from benchmarks/int4_quality.py on the dev checkpoint (the measured values, per CPU class,
are in docs/quantization.md), with slack for kernel and CPU differences; a broken quantization (transposed weights, a wrong scale
axis, lost signs) collapses agreement and multiplies perplexity far past them.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import onnx_graph, quality_benchmark

from medgemma_triton.export import int8
from medgemma_triton.spec import ModelSpec

MAX_PERPLEXITY_RATIO = 1.05
MIN_TEACHER_FORCED_TOP1 = 0.88
# After a 160-token prefill (BOS alone, then one call whose activations share one scale; the paragraph's
# last 24 tokens predicted).
MAX_PREFILLED_PERPLEXITY_RATIO = 1.08
MIN_PREFILLED_TOP1 = 0.85
PREFILL_TOKENS = 160


def test_int8_export_of_tiny(tiny_checkpoint, tiny_onnx, tiny_onnx_int8):
    """`export --precision int8`: every weight MatMul and the tied head become DynamicQuantizeMatMul with
    int8 [K, N] weights (stored as uint8, zero point 128) and one scale per output column; the manifest
    says so; the graph runs."""
    from medgemma_triton.runtime.decoder import OnnxDecoder

    spec = ModelSpec.from_checkpoint(tiny_checkpoint)
    out = tiny_onnx_int8
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["quantization"] == int8.quantization_settings()

    fp32, quantized = onnx_graph(tiny_onnx / "decoder.onnx"), onnx_graph(out / "decoder.onnx")
    fp32_weights = {t.name: t for t in fp32.graph.initializer if len(t.dims) == 2}
    fp32_matmuls = [n for n in fp32.graph.node if n.op_type == "MatMul" and n.input[1] in fp32_weights]
    dynamic = [n for n in quantized.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    # every projection (q/k/v and gate/up as one product each), plus the LM head
    assert len(fp32_matmuls) == 7 * spec.text.num_layers and len(dynamic) == 4 * spec.text.num_layers + 1
    assert not [n for n in quantized.graph.node if n.op_type in ("Gemm", "MatMulNBits")]
    initializers = {t.name: t for t in quantized.graph.initializer}
    for node in dynamic:
        weights, scales = initializers[node.input[1]], initializers[node.input[2]]
        assert weights.data_type == onnx.TensorProto.UINT8 and list(scales.dims) == [weights.dims[1]]
    (head,) = [n for n in dynamic if n.output[0] == "logits"]
    assert list(initializers[head.input[1]].dims) == [spec.text.hidden_size, spec.text.vocab_size]

    decoder = OnnxDecoder(out / "decoder.onnx", spec, intra_op_threads=1)
    assert decoder.first_token_alone  # activations quantized per call: BOS is prefilled on its own
    assert not OnnxDecoder(tiny_onnx / "decoder.onnx", spec).first_token_alone  # fp32: one call, as exported
    logits = decoder.prefill(decoder.new_sequence(np.array([spec.tokens.bos, 100, 200], dtype=np.int64)))
    assert logits.shape == (spec.text.vocab_size,) and np.isfinite(logits).all()


@pytest.mark.slow  # uses the real-weight dev checkpoint
def test_int8_quality_against_fp32(dev_checkpoint, dev_onnx, dev_decoder_int8, tmp_path):
    benchmark = quality_benchmark()
    report = benchmark.run(dev_checkpoint, dev_onnx, None, variants=False, max_new_tokens=32, threads=None,
                           workdir=tmp_path, int8_dir=dev_decoder_int8)
    fp32 = report["results"]["fp32"]
    comparison = report["results"][benchmark.INT8]["comparison"]
    assert np.isfinite(fp32["perplexity"]) and fp32["perplexity"] < 50
    assert comparison["perplexity_ratio"] <= MAX_PERPLEXITY_RATIO
    assert comparison["teacher_forced_top1_agreement"] >= MIN_TEACHER_FORCED_TOP1


@pytest.mark.slow
def test_int8_quality_after_a_long_prefill(dev_checkpoint, dev_onnx, dev_decoder_int8):
    """A prefill quantizes all its rows' activations with one scale: the cache it leaves must still
    predict the rest of the paragraph as fp32's does."""
    from medgemma_triton.runtime.decoder import OnnxDecoder
    from medgemma_triton.runtime.tokenizer import load_tokenizer

    benchmark = quality_benchmark()
    spec = ModelSpec.from_checkpoint(dev_checkpoint)
    ids = np.array(load_tokenizer(dev_checkpoint).encode(benchmark.MEDICAL_TEXT).ids, dtype=np.int64)
    assert len(ids) > PREFILL_TOKENS + 16

    def continuation(path):
        log_probs, predictions = benchmark.teacher_forced(OnnxDecoder(path, spec), ids, PREFILL_TOKENS)
        return float(np.exp(-np.mean(log_probs))), predictions

    fp32_perplexity, fp32_predictions = continuation(dev_onnx / "decoder.onnx")
    int8_perplexity, int8_predictions = continuation(dev_decoder_int8 / "decoder.onnx")
    assert int8_perplexity / fp32_perplexity <= MAX_PREFILLED_PERPLEXITY_RATIO
    assert np.mean(int8_predictions == fp32_predictions) >= MIN_PREFILLED_TOP1
