"""int4 weight-only decoder: structure, and quality against the fp32 export on the dev checkpoint.

Bounds come from benchmarks/int4_quality.py on the dev checkpoint (real Gemma 3 270M weights),
measured values in the comments; each bound leaves room for ONNX Runtime/CPU-kernel differences
but fails on a broken quantization (wrong layout, lost zero points, wrong block size), which
collapses agreement and multiplies perplexity.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import onnx_graph, quality_benchmark

from medgemma_triton.export import int4
from medgemma_triton.spec import ModelSpec

pytestmark = pytest.mark.slow  # uses the real-weight dev checkpoint

# Measured on dev: perplexity ratio 1.142 on the 184-token paragraph, teacher-forced top-1 agreement
# 0.760 (int8 head, fused graph; 1.134 / 0.770 before the norm fusion). Block 32 instead of 16 for the
# projections measured 1.354 / 0.716, and an int4 head 1.201 / 0.710, so these bounds catch a wrong
# block size, layout or head, with ~7% slack for kernel and platform differences.
MAX_PERPLEXITY_RATIO = 1.20
MIN_TEACHER_FORCED_TOP1 = 0.72
# Greedy agreement is reported, not bounded: on this base 270M model the first generated token after
# the open prompts is a near-tie (top-2 margins 0.1-0.5 logits), so one flip changes all 32 tokens.


def test_int4_graph_structure(dev_onnx, dev_onnx_int4, dev_checkpoint):
    spec = ModelSpec.from_checkpoint(dev_checkpoint)
    fp32, quantized = onnx_graph(dev_onnx / "decoder.onnx"), onnx_graph(dev_onnx_int4 / "decoder.onnx")
    fp32_weights = {t.name for t in fp32.graph.initializer if len(t.dims) == 2}
    fp32_matmuls = [n for n in fp32.graph.node if n.op_type == "MatMul" and n.input[1] in fp32_weights]
    table = {t.name: t for t in quantized.graph.initializer}
    nbits = [n for n in quantized.graph.node if n.op_type == "MatMulNBits" and n.output[0] != "logits"]
    # every projection; q/k/v and gate/up as one product each (tests/test_quantized_graph.py)
    assert len(fp32_matmuls) == 7 * spec.text.num_layers and len(nbits) == 4 * spec.text.num_layers
    produced = {output for n in quantized.graph.node for output in n.output}
    assert {n.output[0] for n in fp32_matmuls} <= produced
    ops = [n.op_type for n in quantized.graph.node]  # every RMSNorm fused (export/int4.py FUSE_NORMS)
    assert ops.count("SimplifiedLayerNormalization") + ops.count("SkipSimplifiedLayerNormalization") == (
        6 * spec.text.num_layers + 1) and "Pow" not in ops
    assert not [n for n in quantized.graph.node if n.op_type == "Gemm"]
    for node in nbits:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["bits"] == 4 and attributes["block_size"] == int4.BLOCK_SIZE
        assert attributes["N"] != spec.text.vocab_size
    # the tied LM head is 8-bit in blocks of HEAD_BLOCK_SIZE (see export/int4.py for why)
    assert not [n for n in quantized.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    (head,) = [n for n in quantized.graph.node if n.output[0] == "logits"]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
    assert head.op_type == "MatMulNBits" and attributes["bits"] == 8 and attributes["block_size"] == int4.HEAD_BLOCK_SIZE
    assert (attributes["K"], attributes["N"]) == (spec.text.hidden_size, spec.text.vocab_size)
    assert attributes["accuracy_level"] == int4.ACCURACY_LEVEL
    blocks = -(-spec.text.hidden_size // int4.HEAD_BLOCK_SIZE)
    assert list(table[head.input[1]].dims) == [spec.text.vocab_size, blocks, int4.HEAD_BLOCK_SIZE]
    assert len(head.input) == 4  # asymmetric: zero points
    # the embedding lookup is int4 too (see export/int4.py for why); no fp32 copy of the table is left
    (embedding,) = [n for n in quantized.graph.node if n.op_type == "GatherBlockQuantized"]
    assert list(table[embedding.input[0]].dims) == [spec.text.vocab_size, spec.text.hidden_size]
    assert table[embedding.input[0]].data_type == onnx.TensorProto.UINT4
    assert not [t for t in quantized.graph.initializer
                if t.data_type == onnx.TensorProto.FLOAT
                and list(t.dims) in ([spec.text.vocab_size, spec.text.hidden_size],
                                     [spec.text.hidden_size, spec.text.vocab_size])]
    assert quantized.ir_version == int4.IR_VERSION
    assert {(o.domain, o.version) for o in quantized.opset_import} >= {("", 20), ("com.microsoft", 1)}
    assert (dev_onnx_int4 / "decoder.onnx.data").is_file()
    fp32_bytes = (dev_onnx / "decoder.onnx.data").stat().st_size
    int4_bytes = (dev_onnx_int4 / "decoder.onnx.data").stat().st_size
    assert int4_bytes < 0.4 * fp32_bytes  # measured 380 MB vs 1074 MB


def test_int4_manifest(dev_onnx_int4):
    manifest = json.loads((dev_onnx_int4 / "manifest.json").read_text())
    assert manifest["precision"] == "int4"
    assert manifest["quantization"] == int4.quantization_settings()
    assert manifest["quantization"]["lm_head"] == "int8-blocks" and manifest["quantization"]["embedding"] == "int4"


def test_int4_quality_against_fp32(dev_checkpoint, dev_onnx, dev_onnx_int4, tmp_path):
    benchmark = quality_benchmark()
    VARIANTS, run = benchmark.VARIANTS, benchmark.run
    report = run(dev_checkpoint, dev_onnx, dev_onnx_int4, variants=False, max_new_tokens=32, threads=None,
                 workdir=tmp_path)
    fp32 = report["results"]["fp32"]
    result = report["results"][VARIANTS[0][0]]
    comparison = result["comparison"]
    assert np.isfinite(fp32["perplexity"]) and fp32["perplexity"] < 50  # real weights: sensible English
    assert comparison["perplexity_ratio"] <= MAX_PERPLEXITY_RATIO
    assert comparison["teacher_forced_top1_agreement"] >= MIN_TEACHER_FORCED_TOP1
    assert 0.0 <= comparison["token_agreement"] <= 1.0
    assert all(len(tokens) > 0 for tokens in result["generated"])


def test_int4_block_size_is_a_build_option(tiny_checkpoint, tiny_onnx, tmp_path, capsys):
    """`--int4-block-size`: coarser blocks for the projections (the speed lever at 4B, docs/performance.md),
    recorded in the manifest, checked on this host at load, refused where it means nothing."""
    from medgemma_triton.cli import main
    from medgemma_triton.export.onnx_export import export_onnx
    from medgemma_triton.runtime import host_check

    export = export_onnx(tiny_checkpoint, tmp_path / "int4-b32", precision="int4", fp32_source=tiny_onnx,
                         int4_block_size=32, progress=lambda _: None)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["quantization"] == int4.quantization_settings(block_size=32)
    graph = onnx_graph(export / "decoder.onnx")
    blocks = {onnx.helper.get_attribute_value(a) for n in graph.graph.node if n.op_type == "MatMulNBits"
              and n.output[0] != "logits" for a in n.attribute if a.name == "block_size"}
    assert blocks == {32}
    assert set(host_check.check_decoder_export(export / "decoder.onnx").relative_errors) >= {"MatMulNBits"}
    with pytest.raises(ValueError, match="power of two"):
        export_onnx(tiny_checkpoint, tmp_path / "b24", precision="int4", int4_block_size=24)
    with pytest.raises(ValueError, match="int4 setting"):
        export_onnx(tiny_checkpoint, tmp_path / "int8", precision="int8", int4_block_size=32)
    base = ["build", "cpu", "--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "r"), "--int4-block-size", "32"]
    assert main([*base, "--precision", "int8"]) == 2
    assert "--int4-block-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: `build gpu` has no --int4-block-size
        main(["build", "gpu", *base[2:], "--precision", "int4_awq"])
