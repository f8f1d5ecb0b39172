"""The gpu profile's ModelOpt code against both shapes of ModelOpt's presets: 0.37 (what TensorRT-LLM pins;
quant_cfg is a dict of patterns) and 0.47 (quant_cfg is a list of entries, and the Gemma norm fold is fixed).

Every test here runs against whichever ModelOpt is importable. The main environment has 0.37;
test_the_same_tests_pass_under_modelopt_047 installs 0.47 beside it (its own folder on PYTHONPATH, reusing
the environment's torch and transformers) and runs this file again there.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
mtq = pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (pip install 'medgemma-triton[gpu-quantize]')")

import modelopt  # noqa: E402
from packaging.version import Version  # noqa: E402

from medgemma_triton.gpu import dequantize  # noqa: E402
from medgemma_triton.gpu.pins import MODELOPT_LIST_SHAPE  # noqa: E402  (also run under this ModelOpt)
from medgemma_triton.gpu.quantize import (  # noqa: E402
    EXCLUDED_MODULES,
    RECIPE_FILE,
    _is_entry_list,
    effective_setting,
    gemma_norm_fold,
    installed_quant_cfg_is_list,
    modelopt_quant_config,
    quantize_checkpoint,
    recipe_for,
)

INSTALLED = Version(modelopt.__version__)
# What ModelOpt's source says (modelopt/torch/export/quant_utils.py: fuse_prequant_layernorm): 0.37 writes
# w * s into every norm; 0.47 checks _layernorm_uses_weight_plus_one and writes (1 + w) * s - 1.
READ_NAIVE_FOLD = INSTALLED < Version("0.47")


@pytest.fixture(scope="module")
def tiny_spec(tiny_checkpoint):
    from medgemma_triton.spec import ModelSpec

    return ModelSpec.from_checkpoint(tiny_checkpoint)


def _gemma_norm(size: int, seed: int):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(seed)
    norm = Gemma3RMSNorm(size)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(size) * 0.5)
    return norm


def _fold_error(norm, scale, fixed: bool) -> tuple[float, dict]:
    """Fold `scale` into `norm` as ModelOpt's export calls it; max |folded norm(x) - norm(x) * s|."""
    from modelopt.torch.export import unified_export_hf

    x = torch.randn(5, norm.weight.shape[0])
    expected = norm(x) * scale
    module = SimpleNamespace(input_quantizer=SimpleNamespace(_pre_quant_scale=scale.clone()))
    with gemma_norm_fold(enabled=fixed) as verdicts:
        unified_export_hf.fuse_prequant_layernorm(norm, [module])
    assert not hasattr(module.input_quantizer, "_pre_quant_scale")  # consumed, so not exported twice
    return (norm(x) - expected).abs().max().item(), verdicts


def test_installed_presets_have_the_shape_read_in_its_source():
    """0.37's INT4_AWQ_CFG / FP8_DEFAULT_CFG / FP8_KV_CFG quant_cfg are dicts, 0.47's lists of entries."""
    shapes = {name: _is_entry_list(getattr(mtq, name)["quant_cfg"]) for name in ("INT4_AWQ_CFG", "FP8_DEFAULT_CFG", "FP8_KV_CFG")}
    assert set(shapes.values()) == {INSTALLED >= Version("0.47")}, shapes
    with pytest.raises(TypeError, match="unknown shape"):
        _is_entry_list([{"*weight_quantizer": {"num_bits": 4}}])  # neither shape: refused, not guessed


@pytest.mark.parametrize("precision", ["fp8", "int4_awq"])
def test_quant_config_takes_effect_in_the_installed_modelopt(precision, tiny_checkpoint, tiny_spec):
    """The config is applied by the installed ModelOpt's own mtq.quantize (no calibration) to the tiny
    model, and the quantizers it leaves are what the recipe asks for: language-model linears quantized
    (int4 in groups of the recipe's block size, or fp8 weights and activations), FP8 K/V quantizers on,
    vision tower, projector and lm_head off."""
    from transformers import AutoModelForImageTextToText

    recipe = recipe_for(precision, tiny_spec)
    config = modelopt_quant_config(recipe)
    assert _is_entry_list(config["quant_cfg"]) == installed_quant_cfg_is_list()
    assert effective_setting(config["quant_cfg"], "*lm_head*")["enable"] is False
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    model = mtq.quantize(model, {**config, "algorithm": None})  # None: apply quant_cfg, calibrate nothing

    quantizers = {name: q for name, q in model.named_modules() if type(q).__name__ == "TensorQuantizer"}
    language = {n: q for n, q in quantizers.items() if ".language_model." in n}
    linears = {n: q for n, q in language.items() if n.endswith("_proj.weight_quantizer")}
    assert len(linears) == 7 * tiny_spec.text.num_layers
    for name, quantizer in linears.items():
        assert quantizer.is_enabled, name
        if precision == "int4_awq":
            assert quantizer.num_bits == 4 and quantizer.block_sizes[-1] == recipe.awq_block_size, name
        else:
            assert quantizer.num_bits == (4, 3), name
            assert quantizers[name.replace("weight_quantizer", "input_quantizer")].is_enabled, name
    kv = [q for n, q in language.items() if n.endswith(("k_bmm_quantizer", "v_bmm_quantizer"))]
    assert len(kv) == 2 * tiny_spec.text.num_layers and all(q.is_enabled and q.num_bits == (4, 3) for q in kv)
    elsewhere = {n: q for n, q in quantizers.items() if ".language_model." not in n}
    assert elsewhere and not any(q.is_enabled for q in elsewhere.values()), [n for n, q in elsewhere.items() if q.is_enabled]

    # checkpoint_quality turns the KV quantizers off for a while the same way, in the installed shape
    from modelopt.torch.quantization.conversion import set_quantizer_by_cfg_context

    from medgemma_triton.gpu.quantize import quantizer_settings

    with set_quantizer_by_cfg_context(model, quantizer_settings({"*[kv]_bmm_quantizer": {"enable": False}})):
        assert not any(q.is_enabled for q in kv) and all(q.is_enabled for q in linears.values())
    assert all(q.is_enabled for q in kv)


def test_a_weight_entry_appended_after_the_exclusions_would_quantize_lm_head(tiny_spec):
    """Why the AWQ block size is edited in place: with list-shaped presets an appended *weight_quantizer
    entry carrying a cfg comes after the preset's *lm_head* exclusion and re-enables it."""
    config = modelopt_quant_config(recipe_for("int4_awq", tiny_spec))
    quant_cfg = config["quant_cfg"]
    if not _is_entry_list(quant_cfg):
        pytest.skip("dict-shaped presets (ModelOpt < 0.47) keep one setting per pattern; nothing is appended")
    from torch import nn

    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(64, 64))  # ModelOpt 0.47 refuses a config that quantizes no weight
    model.add_module("lm_head", nn.Linear(64, 64))
    weight = effective_setting(quant_cfg, "*weight_quantizer")
    appended = quant_cfg[:-len(EXCLUDED_MODULES)] + [{"quantizer_name": "*weight_quantizer",
                                                      "cfg": {k: v for k, v in weight.items() if k != "enable"}}]
    for cfg, enabled in ((quant_cfg, False), (appended, True)):
        quantized = mtq.quantize(copy.deepcopy(model), {**config, "quant_cfg": cfg, "algorithm": None})
        assert quantized.q_proj.weight_quantizer.is_enabled
        assert quantized.lm_head.weight_quantizer.is_enabled is enabled


def test_installed_fold_is_naive_exactly_where_its_source_says():
    """ModelOpt's own fold, without our correction: wrong for a Gemma norm on 0.37, right on 0.47."""
    norm = _gemma_norm(64, seed=0)
    error, verdicts = _fold_error(norm, torch.rand(64) * 2 + 0.25, fixed=False)
    assert (error > 0.1) == READ_NAIVE_FOLD, error  # w * s is off by (s - 1) * normalized x
    assert verdicts == {}  # not engaged


def test_our_fold_engages_only_on_a_naive_modelopt_and_is_right_on_both():
    """With gemma_norm_fold the folded Gemma norm computes norm(x) * s on either version; it corrected
    the fold only where the installed ModelOpt folds naively."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = _gemma_norm(64, seed=1)
    error, verdicts = _fold_error(norm, torch.rand(64) * 2 + 0.25, fixed=True)
    assert error < 1e-5
    assert verdicts == {Gemma3RMSNorm: READ_NAIVE_FOLD}


def test_plain_rms_norms_are_left_to_modelopt():
    """A norm that computes x * weight (Llama's) keeps ModelOpt's weight * s, which is right for it."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(1)
    norm = LlamaRMSNorm(32)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    error, verdicts = _fold_error(norm, torch.rand(32) + 0.5, fixed=True)
    assert error < 1e-5 and verdicts == {LlamaRMSNorm: False}


def test_a_fold_we_have_not_read_is_refused():
    """The probe refuses a fold that is neither w * s nor (1 + w) * s - 1 (a stand-in fold, named so)."""
    from modelopt.torch.export import unified_export_hf

    def stand_in_fold(layernorm, modules):  # e.g. a future fold that also shifts the weight
        layernorm.weight = torch.nn.Parameter(layernorm.weight * modules[0].input_quantizer._pre_quant_scale + 0.5)

    module = SimpleNamespace(input_quantizer=SimpleNamespace(_pre_quant_scale=torch.full((8,), 2.0)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(unified_export_hf, "fuse_prequant_layernorm", stand_in_fold)
        with gemma_norm_fold(), pytest.raises(RuntimeError, match="neither w \\* s"):
            unified_export_hf.fuse_prequant_layernorm(_gemma_norm(8, seed=2), [module])


@pytest.mark.slow
def test_tiny_int4_awq_export_writes_gemma_norms_as_one_plus_w_times_s_minus_one(tiny_checkpoint, tiny_spec, tmp_path):
    """The whole export on tiny with the installed ModelOpt: every norm an AWQ scale was folded into holds
    (1 + w) * s - 1 (s as ModelOpt handed it to the fold, w the checkpoint's bf16 weight), never w * s; the
    recipe records whether our correction did it (0.37) or ModelOpt itself (0.47)."""
    import json

    from modelopt.torch.export import unified_export_hf
    from safetensors import safe_open

    folded = {}
    real_fold = unified_export_hf.fuse_prequant_layernorm

    def spy(layernorm, modules):  # records the scale ModelOpt folds, then runs the real fold
        folded[layernorm.name] = modules[0].input_quantizer._pre_quant_scale.detach().float().clone()  # export names modules
        return real_fold(layernorm, modules)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(unified_export_hf, "fuse_prequant_layernorm", spy)  # gemma_norm_fold wraps the spy
        out = quantize_checkpoint(tiny_checkpoint, tmp_path / "q", precision="int4_awq", device="cpu",
                                  calib_text=2, calib_image=0, log=lambda *a: None)
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["modelopt"] == modelopt.__version__
    assert recipe["gemma_norm_fold_corrected"] == READ_NAIVE_FOLD
    assert len(folded) == 2 * tiny_spec.text.num_layers  # input_layernorm and pre_feedforward_layernorm
    tensors = {dequantize.transformers_key(k): v for k, v in dequantize.read_tensors(out).items()}
    with safe_open(str(next(tiny_checkpoint.glob("*.safetensors"))), framework="pt") as handle:
        original = {dequantize.transformers_key(k) if not k.startswith("model.") else k: handle.get_tensor(k)
                    for k in handle.keys()}
    for name, scale in folded.items():
        assert name.endswith(("input_layernorm", "pre_feedforward_layernorm")), name
        w = original[name + ".weight"].to(torch.bfloat16).float()
        written = tensors[name + ".weight"].float()
        assert torch.allclose(written, (1 + w) * scale - 1, rtol=1e-2, atol=1e-2), name
        assert not torch.allclose(written, w * scale, rtol=1e-2, atol=1e-2), name


def list_shaped_modelopt() -> Path:
    """A folder holding ModelOpt 0.47 and the two packages it needs beyond this environment, installed once into
    the test cache with pip --no-deps --target (this environment's torch and transformers serve it)."""
    from conftest import CACHE

    target = CACHE / "modelopt-list-shape"
    if not (target / "modelopt" / "__init__.py").is_file():
        partial = target.with_name(target.name + ".partial")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                        "--target", str(partial), *MODELOPT_LIST_SHAPE], check=True)
        partial.rename(target)
    return target


@pytest.mark.slow
def test_the_same_tests_pass_under_modelopt_047(tmp_path):
    """Runs this file again under ModelOpt 0.47 (list_shaped_modelopt on PYTHONPATH): every test must pass
    there, this one aside."""
    if INSTALLED >= Version("0.47"):
        pytest.skip("already running under list-shaped ModelOpt")
    target = list_shaped_modelopt()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    report = tmp_path / "junit.xml"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                          __file__], env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    print(run.stdout[-4000:], run.stderr[-2000:])
    cases = {case.get("name"): [child.tag for child in case] for case in ElementTree.parse(report).iter("testcase")}
    version = subprocess.run([sys.executable, "-c", "import modelopt; print(modelopt.__version__)"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == MODELOPT_LIST_SHAPE[0].split("==")[1]
    failed = {name: tags for name, tags in cases.items() if "failure" in tags or "error" in tags}
    skipped = {name for name, tags in cases.items() if "skipped" in tags}
    assert not failed and run.returncode == 0, failed
    assert skipped == {"test_the_same_tests_pass_under_modelopt_047"}, skipped
