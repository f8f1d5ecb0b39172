"""The gpu profile's quantized checkpoints, proven on CPU: ModelOpt PTQ, its export read back by our
own dequantizer (gpu/dequantize.py, which reads the files as TensorRT-LLM does), and the INT4-AWQ
norm fold that ModelOpt 0.37 gets wrong for Gemma.

ModelOpt calibration runs once per (checkpoint, recipe) per session, with a small calibration set.
"""

from __future__ import annotations

import copy
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt==0.37.0 (pip install 'medgemma-triton[gpu-quantize]')")

from medgemma_triton.gpu import dequantize  # noqa: E402
from medgemma_triton.gpu.checkpoint_quality import (  # noqa: E402
    EXPORT_AGREEMENT,
    export_agrees,
    fake_quant_logits,
    teacher_forced_agreement,
    teacher_forced_logits,
    token_ids,
)
from medgemma_triton.gpu.quantize import gemma_norm_fold, quantize_checkpoint  # noqa: E402


def _rms_norms():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return Gemma3RMSNorm, LlamaRMSNorm


def _fold(norm, scale, fixed: bool):
    """Run ModelOpt's export-time fold on `norm` (as its export calls it), with or without our correction."""
    from types import SimpleNamespace

    from modelopt.torch.export import unified_export_hf

    module = SimpleNamespace(input_quantizer=SimpleNamespace(_pre_quant_scale=scale.clone()))
    with gemma_norm_fold(enabled=fixed):
        unified_export_hf.fuse_prequant_layernorm(norm, [module])
    assert not hasattr(module.input_quantizer, "_pre_quant_scale") and module.fused_with_layernorm


@pytest.mark.parametrize("fixed", [True, False])
def test_awq_scale_folded_into_a_gemma_norm(fixed):
    """norm(x) * s must equal the folded norm's output: true with our fold, false with ModelOpt 0.37's."""
    gemma_norm, _ = _rms_norms()
    torch.manual_seed(0)
    norm = gemma_norm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64) * 0.5)
    scale = torch.rand(64) * 2 + 0.25
    x = torch.randn(5, 64)
    expected = norm(x) * scale
    _fold(norm, scale, fixed)
    error = (norm(x) - expected).abs().max().item()
    if fixed:
        assert error < 1e-5
    else:
        assert error > 0.1  # weight * s: off by (s - 1) * normalized x


def test_fold_leaves_plain_rms_norms_to_modelopt():
    """A norm that computes x * weight (Llama's) keeps ModelOpt's weight * s, which is right for it."""
    _, llama_norm = _rms_norms()
    torch.manual_seed(1)
    norm = llama_norm(32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    scale = torch.rand(32) + 0.5
    x = torch.randn(3, 32)
    expected = norm(x) * scale
    _fold(norm, scale, fixed=True)
    assert (norm(x) - expected).abs().max().item() < 1e-5


def test_int4_unpacking_inverts_modelopt_packing():
    """Our reader against ModelOpt's writer (pack_int4_in_uint8): every int4 value and its group scale."""
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    torch.manual_seed(2)
    out_features, in_features, group = 6, 16, 4
    values = torch.randint(-8, 8, (out_features, in_features)).float()
    scales = torch.rand(out_features, in_features // group) + 0.1
    weight = values * scales.repeat_interleave(group, dim=1)
    packed = pack_int4_in_uint8(weight, scales)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (out_features // 2, in_features)
    assert torch.equal(dequantize.unpack_int4(packed).float(), values)
    assert torch.allclose(dequantize.dequantize_int4(packed, scales, group), weight)
    with pytest.raises(ValueError, match="does not match"):
        dequantize.dequantize_int4(packed, scales[:, :2], group)


def test_dequantizer_refuses_an_unfolded_fused_scale():
    """TensorRT-LLM's fused q/k/v loader drops pre_quant_scale; a checkpoint relying on it is refused."""
    fmt = dequantize.QuantFormat(dequantize.INT4_AWQ, 4, None)
    packed = torch.zeros(2, 8, dtype=torch.uint8)
    tensors = {}
    for name in ("q_proj", "k_proj", "v_proj"):
        prefix = f"language_model.model.layers.0.self_attn.{name}"
        tensors |= {prefix + ".weight": packed, prefix + ".weight_scale": torch.ones(4, 2)}
    tensors["language_model.model.layers.0.self_attn.q_proj.pre_quant_scale"] = torch.ones(8)
    with pytest.raises(ValueError, match="folded into the preceding norm"):
        dequantize.dequantized_state(tensors, fmt)


_CALIBRATION = {"tiny": (4, 1), "dev": (6, 2)}  # (text chats, image chats): enough to calibrate, quick on CPU


@pytest.fixture(scope="session")
def quantized(request, tmp_path_factory):
    """(checkpoint name, precision) -> exports and logits; ModelOpt runs once per pair per session."""
    results = {}

    def get(name: str, precision: str) -> dict:
        key = (name, precision)
        if key not in results:
            from transformers import AutoTokenizer

            from medgemma_triton.evaluation import MEDICAL_TEXT
            from modelopt.torch.export import export_hf_checkpoint

            checkpoint = request.getfixturevalue(f"{name}_checkpoint")
            ids = token_ids(AutoTokenizer.from_pretrained(checkpoint), MEDICAL_TEXT)
            out = tmp_path_factory.mktemp(f"{name}-{precision}")
            captured = {}

            def inspect(model):
                captured.update(fake_quant_logits(model, ids))
                captured["fake_weights"] = {
                    module_name: module.weight_quantizer(module.weight).detach().clone()
                    for module_name, module in model.named_modules()
                    if getattr(module, "weight_quantizer", None) is not None and module.weight_quantizer.is_enabled
                }
                if precision == "int4_awq":  # the same calibration, for ModelOpt's own export below
                    captured["model"] = copy.deepcopy(model)

            text, image = _CALIBRATION[name]
            quantize_checkpoint(checkpoint, out / "fixed", precision=precision, device="cpu", calib_text=text,
                                calib_image=image, inspect=inspect, log=lambda *a: None)
            entry = {"checkpoint": checkpoint, "ids": ids, "fake": captured["without_kv"], "fixed": out / "fixed",
                     "fake_weights": captured["fake_weights"]}
            if "model" in captured:
                with torch.inference_mode(), gemma_norm_fold(enabled=False):
                    export_hf_checkpoint(captured.pop("model"), dtype=torch.bfloat16, export_dir=out / "modelopt")
                entry["modelopt"] = out / "modelopt"
            results[key] = entry
        return results[key]

    return get


def test_tiny_fp8_export_reads_back_as_modelopt_fake_quant_weights(quantized):
    """tiny: every FP8 Linear of the export, dequantized by our reader, is ModelOpt's fake-quantized weight
    up to the export's own rounding (it divides by the scale in bf16 first: a few one-step flips)."""
    entry = quantized("tiny", "fp8")
    tensors = dequantize.read_tensors(entry["fixed"])
    weights, input_scales = dequantize.dequantized_state(tensors, dequantize.QuantFormat.read(entry["fixed"]), fuse=False)
    prefixes = [k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale")]
    assert len(prefixes) == len(entry["fake_weights"]) > 0
    for prefix in prefixes:
        fake = entry["fake_weights"][dequantize.transformers_key(prefix + ".weight")[: -len(".weight")]]
        ours, scale = weights[prefix + ".weight"], tensors[prefix + ".weight_scale"]
        # One e4m3 step at each value's magnitude (3 mantissa bits; subnormal below 2^-6).
        step = 2.0 ** (torch.floor(torch.log2((fake / scale).abs().clamp(min=2 ** -6))) - 3) * scale
        differs = (ours - fake).abs() > step / 2  # a flip, not fp32 rounding of the scale
        assert ((ours - fake).abs() <= step * 1.001).all(), prefix
        assert differs.float().mean() < 0.1, prefix  # bf16-then-e4m3 double rounding: about 1 in 16
        assert prefix in input_scales


def test_tiny_int4_awq_export_differs_from_modelopt_only_by_the_norm_fold(quantized, tiny_checkpoint):
    """Same calibration, two exports: ModelOpt's norms hold w * s, ours (1 + w) * s - 1, so their
    difference is s - 1 and ModelOpt's norm divided by the original w gives the same s."""
    from safetensors import safe_open

    entry = quantized("tiny", "int4_awq")
    ours, theirs = dequantize.read_tensors(entry["fixed"]), dequantize.read_tensors(entry["modelopt"])
    with safe_open(str(next(tiny_checkpoint.glob("*.safetensors"))), framework="pt") as handle:
        original = {k: handle.get_tensor(k) for k in handle.keys()}
    folded = [k for k in ours if k.endswith(("input_layernorm.weight", "pre_feedforward_layernorm.weight"))]
    assert folded and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k not in folded)
    for key in folded:
        scale = ours[key] - theirs[key] + 1  # (1 + w) s - 1 - w s = s - 1
        stored = original[key] if key in original else original[dequantize.transformers_key(key)]  # either layout
        w = stored.to(torch.bfloat16).float()  # quantize_checkpoint loads bf16
        assert (scale > 0).all()
        assert torch.allclose(theirs[key], w * scale, atol=1e-4), key
    model = dequantize.load_dequantized(entry["fixed"])
    assert torch.isfinite(teacher_forced_logits(model, entry["ids"])).all()


@pytest.mark.parametrize("precision", ["fp8", "int4_awq"])
def test_dev_export_agrees_with_modelopt_fake_quant(precision, quantized):
    """dev (real Gemma 3 270M weights): the exported checkpoint, read as TensorRT-LLM reads it, computes
    what ModelOpt's fake-quantized model computes, within EXPORT_AGREEMENT."""
    entry = quantized("dev", precision)
    logits = teacher_forced_logits(dequantize.load_dequantized(entry["fixed"]), entry["ids"])
    agreement = teacher_forced_agreement(entry["fake"], logits, entry["ids"])
    print(f"dev {precision} export vs fake-quant: {agreement}")
    assert export_agrees(agreement), agreement


def test_dev_int4_awq_modelopt_norm_fold_is_caught(quantized):
    """ModelOpt 0.37's own export of the same calibration folds AWQ scales into Gemma's norms as
    weight * s: read back, it is far outside EXPORT_AGREEMENT (perplexity up by orders of magnitude)."""
    entry = quantized("dev", "int4_awq")
    logits = teacher_forced_logits(dequantize.load_dequantized(entry["modelopt"]), entry["ids"])
    agreement = teacher_forced_agreement(entry["fake"], logits, entry["ids"])
    print(f"dev int4_awq ModelOpt-fold export vs fake-quant: {agreement}")
    assert not export_agrees(agreement), agreement
    assert abs(math.log(agreement["perplexity_ratio"])) > 10 * EXPORT_AGREEMENT.max_log_ppl_ratio


def test_gpu_check_script_runs_at_tiny_size_on_cpu(tiny_checkpoint, tmp_path):
    """benchmarks/gpu_check.py (written for a lent GPU) runs every part on CPU at tiny size."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    output = tmp_path / "gpu_check.json"
    subprocess.run([sys.executable, str(script), "--geometry", "tiny", "--device", "cpu", "--calib-text", "2",
                    "--calib-image", "1", "--budget-s", "100000", "--checkpoints", str(tiny_checkpoint.parent),
                    "--output", str(output)], check=True)
    report = json.loads(output.read_text())
    assert report["skipped"] == []
    assert [q["precision"] for q in report["quality"]] == ["fp8", "int4_awq"]
    for quality in report["quality"]:
        assert quality["gemma_norm_fold_corrected"] == (quality["precision"] == "int4_awq")
        assert quality["exported"]["perplexity"] > 0 and 0 <= quality["greedy"]["first_token"] <= 1
        assert quality["peak_rss_gib"] > 0
    assert [g["precision"] for g in report["geometry_4b"]] == ["fp8", "int4_awq"]
    assert all(g["exported_gib"] > 0 for g in report["geometry_4b"])
    assert [g["batch"] for g in report["generate"]] == [1, 8]
    assert all(g["output_tokens_per_s"] > 0 and g["output_tokens"] == 16 for g in report["generate"])


def test_verify_thresholds_come_from_the_committed_measurement():
    """verify.THRESHOLDS for fp8 and int4_awq are threshold_from the greedy agreement recorded in
    docs/results/gpu-checkpoint-quality-dev.json (the default recipes, our norm fold)."""
    import json
    from pathlib import Path

    from medgemma_triton.gpu.verify import THRESHOLDS, threshold_from

    results = Path(__file__).resolve().parents[1] / "docs" / "results" / "gpu-checkpoint-quality-dev.json"
    reports = json.loads(results.read_text())["reports"]
    for precision, group in (("fp8", None), ("int4_awq", 128)):
        (report,) = [r for r in reports if r["precision"] == precision and r["group_size"] == group
                     and (precision == "fp8" or r["gemma_norm_fold_corrected"])]
        greedy = report["greedy"]
        assert THRESHOLDS[precision] == threshold_from(greedy["first_token"], greedy["prefix"], greedy["prompts"])
        assert report["exported_agrees_with_fake"]
    (broken,) = [r for r in reports if r["precision"] == "int4_awq" and not r["gemma_norm_fold_corrected"]]
    assert not broken["exported_agrees_with_fake"]
