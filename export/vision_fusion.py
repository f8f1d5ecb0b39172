"""vision_encoder.onnx -> vision_encoder.ort.onnx: each SigLIP self-attention as one ONNX Runtime
`com.microsoft.MultiHeadAttention`, so the cpu profile runs ORT's CPU flash-attention kernel.

The dynamo exporter decomposes scaled_dot_product_attention into MatMul -> Softmax -> MatMul, which
materialises [batch, heads, patches, patches] fp32 scores per layer (16 x 4096 x 4096 = 1 GiB per
896 px image) where torch runs a fused kernel. MultiHeadAttention without mask, attention bias or past
takes MlasFlashAttention on CPU instead.

Assumptions, checked below: the rewrite is onnxscript's own SDPA and MHA fusion rules (those that
`onnxscript.rewriter.ort_fusions.optimize_for_ort` applies to dynamo graphs) and nothing else, and it
fuses every layer. The projections, layer norms, gelu (tanh) and projector stay as exported, so the
fused graph reads the plain graph's `vision_encoder.onnx.data`: no second copy of the weights. Not used,
on purpose: ORT's transformers optimizer (its BiasGelu fusion turns Gelu(approximate="tanh") into the
erf gelu) and the packed-QKV `Attention` op (its CPU kernel materialises the scores).

TensorRT cannot parse com.microsoft ops: the gpu profile builds its plan from the plain graph.
"""

from __future__ import annotations

from pathlib import Path

VISION_ORT_ONNX = "vision_encoder.ort.onnx"
FUSED_ATTENTION = ("com.microsoft", "MultiHeadAttention")


def fuse_attention(plain: Path, fused: Path, num_layers: int) -> Path:
    """Write `fused` (beside `plain`, sharing its external data) with every attention fused; returns it."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa

    plain, fused = Path(plain), Path(fused)
    if fused.parent.resolve() != plain.parent.resolve():
        raise ValueError(f"{fused} must be beside {plain}: it refers to the same external data file")
    model = ir.load(plain)  # initializers stay references into the plain graph's data file
    fuse_sdpa(model)  # MatMul/Softmax/MatMul -> an onnxscript-internal SDPA op ...
    fuse_mha1(model)  # ... -> MultiHeadAttention (mha1 / mha2: the two layouts of q, k, v it accepts)
    fuse_mha2(model)
    RemoveUnusedNodesPass()(model)  # the head split/merge Reshapes and Transposes the fusion replaced
    counts = attention_op_counts((node.domain, node.op_type) for node in model.graph)
    if counts["fused"] != num_layers or counts["softmax"]:
        raise RuntimeError(
            f"fused {counts['fused']} of {num_layers} vision attention layers ({counts['softmax']} Softmax "
            "left): the exporter's attention pattern is not what onnxscript's fusion rules expect "
            "(a torch or onnxscript upgrade?)"
        )
    ir.save(model, fused)  # external tensors are written as references, not copied
    return fused


def attention_op_counts(ops) -> dict[str, int]:
    """{"fused": MultiHeadAttention nodes, "softmax": Softmax nodes} among (domain, op_type) pairs."""
    ops = [(domain or "", op_type) for domain, op_type in ops]
    return {"fused": ops.count(FUSED_ATTENTION), "softmax": ops.count(("", "Softmax"))}
