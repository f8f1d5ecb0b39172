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

# The norm-fold unit tests live in tests/test_gpu_modelopt_shapes.py, which also runs under ModelOpt 0.47.


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp8", "int4_awq"])
def test_dev_export_agrees_with_modelopt_fake_quant(precision, quantized):
    """dev (real Gemma 3 270M weights): the exported checkpoint, read as TensorRT-LLM reads it, computes
    what ModelOpt's fake-quantized model computes, within EXPORT_AGREEMENT."""
    entry = quantized("dev", precision)
    logits = teacher_forced_logits(dequantize.load_dequantized(entry["fixed"]), entry["ids"])
    agreement = teacher_forced_agreement(entry["fake"], logits, entry["ids"])
    print(f"dev {precision} export vs fake-quant: {agreement}")
    assert export_agrees(agreement), agreement


@pytest.mark.slow
def test_dev_int4_awq_modelopt_norm_fold_is_caught(quantized):
    """ModelOpt 0.37's own export of the same calibration folds AWQ scales into Gemma's norms as
    weight * s: read back, it is far outside EXPORT_AGREEMENT (perplexity up by orders of magnitude)."""
    entry = quantized("dev", "int4_awq")
    logits = teacher_forced_logits(dequantize.load_dequantized(entry["modelopt"]), entry["ids"])
    agreement = teacher_forced_agreement(entry["fake"], logits, entry["ids"])
    print(f"dev int4_awq ModelOpt-fold export vs fake-quant: {agreement}")
    assert not export_agrees(agreement), agreement
    assert abs(math.log(agreement["perplexity_ratio"])) > 10 * EXPORT_AGREEMENT.max_log_ppl_ratio


@pytest.mark.slow
def test_gpu_check_script_runs_at_tiny_size_on_cpu(tiny_checkpoint, tmp_path):
    """benchmarks/studies/gpu_check.py (written for a lent GPU) runs every part on CPU at tiny size, the quality part
    a second time under list-shaped ModelOpt (0.47) in a child process."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from test_gpu_modelopt_shapes import list_shaped_modelopt

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "studies" / "gpu_check.py"
    output = tmp_path / "gpu_check.json"
    subprocess.run([sys.executable, str(script), "--geometry", "tiny", "--device", "cpu", "--calib-text", "2",
                    "--calib-image", "1", "--budget-s", "100000", "--checkpoints", str(tiny_checkpoint.parent),
                    "--modelopt-list-shape", str(list_shaped_modelopt()), "--output", str(output)], check=True)
    report = json.loads(output.read_text())
    assert report["skipped"] == []
    checks = {c["name"]: c for c in report["checks"]["checks"]}
    assert checks["one_bos"]["passed"] and checks["tied_lm_head"]["passed"] and checks["image_prompt_kl"]["passed"]
    assert report["checks"]["image_kl"]["bf16_causal_control"]["mean"] > report["checks"]["image_kl"]["bf16"]["mean"]
    assert report["modelopt"] == {"version": modelopt_version(), "quant_cfg": "dict"}
    list_shape = report["modelopt_list_shape"]
    assert list_shape["modelopt"] == {"version": "0.47.0", "quant_cfg": "list"}
    for run, corrected in ((report, True), (list_shape, False)):  # our fold on 0.37; ModelOpt's own on 0.47
        assert [q["precision"] for q in run["quality"]] == ["fp8", "int4_awq"]
        for quality in run["quality"]:
            assert quality["gemma_norm_fold_corrected"] == (corrected and quality["precision"] == "int4_awq")
            assert quality["exported"]["perplexity"] > 0 and 0 <= quality["greedy"]["first_token"] <= 1
            assert quality["peak_rss_gib"] > 0
            passed = {c["name"]: c["passed"] for c in quality["checks"]}
            # the KL control is decided on real weights (dev), not on tiny's random ones
            assert all(passed[name] for name in ("image_prompt_kl", "one_bos", "tied_lm_head", "quantized_linears")), passed
    assert [g["precision"] for g in report["geometry_4b"]] == ["fp8", "int4_awq"]
    assert all(g["exported_gib"] > 0 for g in report["geometry_4b"])
    assert [g["batch"] for g in report["generate"]] == [1, 8]
    assert all(g["output_tokens_per_s"] > 0 and g["output_tokens"] == 16 for g in report["generate"])


def modelopt_version() -> str:
    import modelopt

    return modelopt.__version__


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


@pytest.mark.slow  # ModelOpt quantization
@pytest.mark.parametrize("precision", ["fp8", "int4_awq"])
def test_tiny_export_carries_quantization_on_every_decoder_linear(precision, quantized):
    """Every attention and MLP Linear of ModelOpt's export is stored quantized with its scales and named by no
    exclude_modules pattern, and read back its lm_head is the embedding (verify.check_tied_lm_head)."""
    from medgemma_triton.gpu.verify import check_tied_lm_head

    entry = quantized("tiny", precision)
    tensors, fmt = dequantize.read_tensors(entry["fixed"]), dequantize.QuantFormat.read(entry["fixed"])
    assert dequantize.quantized_linear_faults(tensors, fmt) == []
    assert check_tied_lm_head(dequantize.load_dequantized(entry["fixed"])).passed


@pytest.mark.slow  # ModelOpt quantization
def test_fp8_mlp_linears_without_their_quantization_are_caught(quantized):
    """TensorRT-LLM PR #6499's fault, two ways: MLP linears whose scales are gone, and MLP linears an
    exclude_modules pattern leaves unquantized; both are named, and our reader refuses the first."""
    import dataclasses

    entry = quantized("tiny", "fp8")
    tensors, fmt = dequantize.read_tensors(entry["fixed"]), dequantize.QuantFormat.read(entry["fixed"])
    unscaled = {k: v for k, v in tensors.items() if not (".mlp." in k and k.endswith(("weight_scale", "input_scale")))}
    faults = dequantize.quantized_linear_faults(unscaled, fmt)
    assert faults and all(".mlp." in fault and "scale is missing" in fault for fault in faults)
    with pytest.raises(ValueError, match="without a weight_scale"):
        dequantize.dequantized_state(unscaled, fmt)
    excluded = dataclasses.replace(fmt, exclude_modules=fmt.exclude_modules + ("*mlp*",))
    faults = dequantize.quantized_linear_faults(tensors, excluded)
    layers = len({k.split(".layers.")[1].split(".")[0] for k in tensors if ".layers." in k and "language_model" in k})
    assert len(faults) == 3 * layers and all("'*mlp*'" in fault for fault in faults)
