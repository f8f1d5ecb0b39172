"""The cpu profile's int4 (Q4_K_M) and int8 (Q8_0) decoders on llama.cpp against the fp32 ONNX reference.

Teacher-forced on the dev checkpoint (real Gemma 3 270M weights) with benchmarks/int4_quality.py's
measures: the quantized decoder must predict what fp32 predicts, position by position, and not raise
perplexity much. Bounds: measured values in docs/quantization.md ("llama.cpp"), with slack for other CPU
classes' kernels; a broken conversion or quantization (wrong layer pattern, scale, or type) collapses
agreement and multiplies perplexity. The report names the ggml CPU variant that ran.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import quality_benchmark

from medgemma_triton.export.gguf import DECODER_GGUF

pytestmark = pytest.mark.slow  # uses the real-weight dev checkpoint

GATES = {  # name: (max perplexity ratio, min teacher-forced top-1 agreement)
    "Q4_K_M": (1.10, 0.85),
    "Q8_0": (1.03, 0.93),
}


@pytest.fixture(scope="module")
def report(dev_checkpoint, dev_onnx, dev_gguf_int4, dev_gguf_int8, tmp_path_factory):
    return quality_benchmark().run(
        dev_checkpoint, dev_onnx, None, variants=False, max_new_tokens=32, threads=None,
        workdir=tmp_path_factory.mktemp("quality"),
        ggufs={"Q4_K_M": dev_gguf_int4 / DECODER_GGUF, "Q8_0": dev_gguf_int8 / DECODER_GGUF},
    )


@pytest.mark.parametrize("name", sorted(GATES))
def test_quality_against_fp32(report, name):
    max_ratio, min_top1 = GATES[name]
    fp32, result = report["results"]["fp32"], report["results"][name]
    comparison = result["comparison"]
    print(name, result["cpu_kernels"], {k: comparison[k] for k in ("perplexity_ratio", "teacher_forced_top1_agreement",
                                                                   "prefilled_top1_agreement", "token_agreement")})
    assert np.isfinite(fp32["perplexity"]) and fp32["perplexity"] < 50
    assert result["cpu_kernels"], "llama.cpp reports the CPU variant it loaded"
    assert comparison["perplexity_ratio"] <= max_ratio
    assert comparison["teacher_forced_top1_agreement"] >= min_top1
    assert comparison["prefilled_top1_agreement"] >= min_top1
    assert all(len(tokens) > 0 for tokens in result["generated"])
