"""int8 (W8A8) decoder for ONNX Runtime on CPU: int8 weights, activations quantized per call.

Every MatMul with a constant fp32 [K, N] weight (q/k/v/o, gate/up/down) and the tied LM head become a
com.microsoft DynamicQuantizeMatMul: weights int8, symmetric, one scale per output column, stored as
uint8 with zero point 128 so that MLAS runs its u8u8 GEMM, which no CPU's kernel can saturate (see
medgemma_triton/runtime/host_check.py); the activation is quantized to uint8 on the fly (one scale and
zero point per call). Norms, RoPE, attention, masks and the KV cache stay fp32. The embedding Gather is
int4 (GatherBlockQuantized, as in export/int4.py): a Gather reads only the request's rows, and the table
is most of a small model's weights.

Why int8 beside int4: an integer GEMM prefills many rows far faster than ONNX Runtime's x86 MatMulNBits,
at nearly fp32's quality on dev. Measurements, with the CPU each ran on: docs/quantization.md.
"""

from __future__ import annotations

from pathlib import Path

from medgemma_triton.export.int4 import (
    _dynamic_quantize_matmul,
    _gather_block_quantized,
    graph_settings,
    rewrite_decoder,
    stores_unsigned,
)
from medgemma_triton.runtime.decoder import PREFILL_FIRST_TOKEN_ALONE

EMBEDDING_INT4 = True


def quantization_settings(int8_weights: str = "unsigned") -> dict:
    return {
        "method": "DynamicQuantizeMatMul: int8 weights per output column (symmetric, stored as uint8 with "
                  "zero point 128), uint8 activations quantized per call",
        "bits": 8,
        "lm_head": "int8",
        "embedding": "int4" if EMBEDDING_INT4 else "fp32",
        **graph_settings(int8_weights),
    }


def quantize_decoder_int8(fp32_path: str | Path, out_path: str | Path, spec=None, progress=print,
                          int8_weights: str = "unsigned", **graph_options) -> Path:
    """Write an int8 (W8A8) copy of the fp32 decoder at fp32_path to out_path (+ out_path.data).
    int8_weights: "unsigned" or "signed" storage (see INT8_STORAGES); graph_options: rewrite_decoder's
    merge_shared_input / fuse_norms."""
    unsigned = stores_unsigned(int8_weights)

    def product(weights_kn, a_input, output, name, prefix, node):
        return _dynamic_quantize_matmul(weights_kn, a_input, output, name, prefix, node, unsigned=unsigned)

    def embedding(table, indices, output, name, prefix, node):
        return _gather_block_quantized(table, indices, output, name, prefix)

    return rewrite_decoder(
        fp32_path, out_path, "int8 (per-column weights, dynamic activations)",
        product, product,
        embedding if EMBEDDING_INT4 else None, progress,
        metadata={PREFILL_FIRST_TOKEN_ALONE: "1"},  # every projection quantizes its activation per call
        **graph_options,
    )
