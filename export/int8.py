"""int8 (W8A8) decoder for ONNX Runtime on CPU: int8 weights, activations quantized per call.

Every MatMul with a constant fp32 [K, N] weight (q/k/v/o, gate/up/down) and the tied LM head become a
com.microsoft DynamicQuantizeMatMul: weights int8, symmetric, one scale per output column; the
activation is quantized to uint8 on the fly (one scale and zero point per call) and the product runs
on MLAS's integer GEMM (AVX512-VNNI / AVX-VNNI / AMX where present). Norms, RoPE, attention, masks and
the KV cache stay fp32. The embedding Gather is int4 (GatherBlockQuantized, as in export/int4.py):
a Gather reads only the request's rows, and the table is most of a small model's weights.

Why, measured on this project's VM (2 vCPU Xeon, AVX512-VNNI, ONNX Runtime 1.31, dev checkpoint, one
session per process, 2 threads; int4 here is export/int4.py's: MatMulNBits projections, int8 head):
- prefill of 205 tokens: 89 ms, vs 253 ms int4 and 212 ms fp32. MatMulNBits unpacks 16-weight blocks
  per call and runs at fp32-GEMM speed for many rows; an integer GEMM does not.
- a decode step: batch 1 20.8 ms (int4 19.9), batch 4 26.8 ms (int4 28.7).
- quality against the fp32 export (benchmarks/int4_quality.py's measures): perplexity ratio 0.994
  and teacher-forced top-1 agreement 0.934, vs 1.134 / 0.770 for int4; after a 160-token prefill
  1.016 / 0.958 (int4 1.190 / 0.708).
- size: 403 MB vs int4 380 MB and fp32 1074 MB (a 270M model is mostly its 262k-row table; for the
  4B the layers dominate and int8 is about 1.2x int4's bytes: ~4.4 vs ~3.7 GB, estimated).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgemma_triton.export.int4 import (
    _dynamic_quantize_matmul,
    _gather_block_quantized,
    graph_settings,
    rewrite_decoder,
)

EMBEDDING_INT4 = True


def quantization_settings() -> dict:
    return {
        "method": "DynamicQuantizeMatMul: int8 weights per output column (symmetric), uint8 activations "
                  "quantized per call",
        "bits": 8,
        "lm_head": "int8",
        "embedding": "int4" if EMBEDDING_INT4 else "fp32",
        **graph_settings(),
    }


def quantize_decoder_int8(fp32_path: str | Path, out_path: str | Path, spec=None, progress=print,
                          **graph_options) -> Path:
    """Write an int8 (W8A8) copy of the fp32 decoder at fp32_path to out_path (+ out_path.data).
    graph_options: rewrite_decoder's merge_shared_input / fuse_norms."""

    def embedding(table, indices, output, name, prefix, node):
        return _gather_block_quantized(table, indices, output, name, prefix)

    return rewrite_decoder(
        fp32_path, out_path, "int8 (per-column weights, dynamic activations)",
        _dynamic_quantize_matmul, _dynamic_quantize_matmul,
        embedding if EMBEDDING_INT4 else None, progress, **graph_options,
    )
