"""ModelOpt post-training quantization of the language model (FP8 or INT4-AWQ) to a unified HF
checkpoint that TensorRT-LLM's PyTorch backend loads.

Only the language model is quantized: the SigLIP tower and the projector stay in the checkpoint's
dtype (TensorRT-LLM's Gemma3VLM loads the vision part without a quant config, and our vision engine
is built from the unquantized ONNX export anyway). lm_head stays unquantized (ModelOpt's default; it
is tied to the embedding in Gemma 3). The KV cache is FP8 by default for both recipes: ModelOpt then
calibrates per-layer k/v scales and TensorRT-LLM stores the cache in FP8.

INT4-AWQ and Gemma's norms: ModelOpt 0.37's export folds AWQ's per-channel pre-quant scale s of
q/k/v and gate/up into the norm before them as `weight * s`
(modelopt/torch/export/quant_utils.py: fuse_prequant_layernorm). Gemma's RMSNorm computes
x * (1 + weight), so the folded weight must be (1 + weight) * s - 1; the naive fold corrupts every
layer. NVIDIA/Model-Optimizer PR #793 fixed it upstream (0.47 writes (1 + w) * s - 1 for Gemma norms).
`gemma_norm_fold` corrects it during export, only where a probe shows the installed ModelOpt folds
naively into a norm that adds one, so it engages on 0.37 and stands aside on 0.47.

ModelOpt's preset configs changed shape at 0.47 (quant_cfg: a dict of patterns before, a list of
entries since); `modelopt_quant_config` builds ours in whichever shape the installed presets have.

Calibration uses calibration.py (medical text and image-conditioned chats) run through the
checkpoint's own processor (chat template, image processor), not ModelOpt's news dataset.
Written for nvidia-modelopt 0.37.0 (pins.MODELOPT_VERSION) and tested with 0.47.0 too; it runs on CPU for small checkpoints,
which is how CI tests it, and on CUDA inside the container for the real model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

from medgemma_triton.spec import ModelSpec

PRECISIONS = ("fp8", "int4_awq")
KV_CACHE_DTYPES = ("fp8", "auto")  # auto: the model dtype (bf16)

# Quantizer name patterns ModelOpt must leave alone (its wildcard syntax, matched against module names).
EXCLUDED_MODULES = ("*vision_tower*", "*multi_modal_projector*", "*lm_head*")

# Files the exported checkpoint needs besides config.json + weights: tokenizer, chat template, processor.
CHECKPOINT_SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)
RECIPE_FILE = "medgemma_quantization.json"


@dataclass(frozen=True)
class QuantRecipe:
    precision: str  # fp8 | int4_awq
    modelopt_config: str  # name of the ModelOpt config in modelopt.torch.quantization
    kv_cache: str = "fp8"
    kv_modelopt_config: str | None = "FP8_KV_CFG"
    excluded: tuple[str, ...] = EXCLUDED_MODULES
    awq_block_size: int | None = None  # INT4-AWQ group size along the input dimension
    calib_text: int = 64
    calib_image: int = 64
    calib_seed: int = 0
    expected_quant_algo: str = ""  # what hf_quant_config.json must say afterwards
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


def recipe_for(
    precision: str,
    spec: ModelSpec,
    kv_cache: str = "fp8",
    calib_text: int = 64,
    calib_image: int = 64,
    seed: int = 0,
    group_size: int | None = None,
) -> QuantRecipe:
    """The recipe for a precision: ModelOpt's FP8_DEFAULT_CFG / INT4_AWQ_CFG with the vision part excluded."""
    if precision not in PRECISIONS:
        raise ValueError(f"quantization precision {precision!r} is not one of {', '.join(PRECISIONS)} (bf16 needs none)")
    if kv_cache not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache={kv_cache!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    if calib_text < 0 or calib_image < 0 or calib_text + calib_image == 0:
        raise ValueError("calibration needs at least one chat")
    if calib_image and not spec.multimodal:
        calib_image = 0  # a text-only checkpoint has no image path to calibrate
    common = dict(
        precision=precision, kv_cache=kv_cache,
        kv_modelopt_config="FP8_KV_CFG" if kv_cache == "fp8" else None,
        calib_text=calib_text, calib_image=calib_image, calib_seed=seed,
    )
    if precision == "fp8":
        if group_size is not None:
            raise ValueError("group_size applies to int4_awq only (FP8 scales are per tensor)")
        return QuantRecipe(modelopt_config="FP8_DEFAULT_CFG", expected_quant_algo="FP8", **common)
    # AWQ groups of 128 input channels (ModelOpt's default) must tile every quantized Linear's input.
    inputs = (spec.text.hidden_size, spec.text.intermediate_size, spec.text.num_heads * spec.text.head_dim)
    if group_size is not None:
        if group_size < 1 or any(n % group_size for n in inputs):
            raise ValueError(f"AWQ group size {group_size} does not divide the quantized input dims {inputs}")
        block, notes = group_size, (f"AWQ group size {group_size} (asked for)",)
    else:
        block = 128
        while block > 1 and any(n % block for n in inputs):
            block //= 2
        notes = () if block == 128 else (f"AWQ group size {block}: input dims {inputs} are not multiples of 128",)
    return QuantRecipe(
        modelopt_config="INT4_AWQ_CFG", awq_block_size=block, expected_quant_algo="W4A16_AWQ", notes=notes, **common
    )


def _is_entry_list(quant_cfg) -> bool:
    """True for ModelOpt >= 0.47's quant_cfg (a list of {"quantizer_name": ...} entries applied in order,
    the last match winning: modelopt/torch/quantization/config.py, "Ordering and Precedence"); False for
    0.37's (a dict from pattern to attributes, "default" first). Decided by the preset itself, not a version."""
    if isinstance(quant_cfg, dict):
        return False
    if isinstance(quant_cfg, list) and all(isinstance(e, dict) and "quantizer_name" in e for e in quant_cfg):
        return True
    raise TypeError(f"ModelOpt quant_cfg of an unknown shape ({type(quant_cfg).__name__}): neither 0.37's "
                    "pattern -> attributes dict nor 0.47's list of quantizer_name entries")


def _add_settings(quant_cfg, more) -> None:
    """Put `more` after what quant_cfg holds, in its shape, so that it wins: a list's entries apply in
    order, a dict's later keys replace earlier ones."""
    if _is_entry_list(quant_cfg):
        quant_cfg.extend(more)
    else:
        quant_cfg.update(more)


def installed_quant_cfg_is_list() -> bool:
    """The shape the installed ModelOpt's own presets have (so the shape it expects back)."""
    import modelopt.torch.quantization as mtq

    return _is_entry_list(mtq.FP8_DEFAULT_CFG["quant_cfg"])


def quantizer_settings(settings: dict[str, dict], listed: bool | None = None):
    """{pattern: attributes} (e.g. {"*lm_head*": {"enable": False}}) as a quant_cfg of the installed shape."""
    listed = installed_quant_cfg_is_list() if listed is None else listed
    if not listed:
        return copy.deepcopy(settings)
    entries = []
    for pattern, attributes in settings.items():
        attributes = dict(attributes)
        entry = {"quantizer_name": pattern}
        if "enable" in attributes:
            entry["enable"] = attributes.pop("enable")
        if attributes:  # a cfg replaces every attribute of the matched quantizers (0.47's set_quantizer_by_cfg)
            entry["cfg"] = attributes
        entries.append(entry)
    return entries


def effective_setting(quant_cfg, pattern: str) -> dict:
    """The attributes a quant_cfg gives quantizers named by exactly `pattern`, in either shape (enable included).

    For the list shape this is ModelOpt's own rule (find_quant_cfg_entry_by_path: the last entry with that
    quantizer_name; an entry with cfg and no enable enables). KeyError if no entry names the pattern.
    """
    if not _is_entry_list(quant_cfg):
        attributes = quant_cfg[pattern]
        return dict(attributes[0] if isinstance(attributes, list) else attributes)
    entry = [e for e in quant_cfg if e["quantizer_name"] == pattern and "parent_class" not in e][-1:]
    if not entry:
        raise KeyError(f"no quant_cfg entry for {pattern!r}")
    cfg = entry[0].get("cfg") or {}
    cfg = cfg[0] if isinstance(cfg, list) else cfg
    return {**cfg, "enable": entry[0].get("enable", True if entry[0].get("cfg") else None)}


def modelopt_quant_config(recipe: QuantRecipe) -> dict:
    """ModelOpt's config for the recipe: a deep copy of its named preset, then our changes, in the preset's shape.

    Works with both shapes of ModelOpt's presets (see _is_entry_list). The changes: the KV-cache preset's
    entries after the model preset's (as 0.47's update_quant_cfg_with_kv_cache_quant appends them), the AWQ
    block size edited in place on the weight quantizer's own entry (appending a new cfg entry would re-enable
    the preset's later exclusions such as *lm_head*), and our exclusions last, so they win in both shapes.
    """
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, recipe.modelopt_config))
    quant_cfg = config["quant_cfg"]
    listed = _is_entry_list(quant_cfg)
    if recipe.kv_modelopt_config:
        kv_cfg = copy.deepcopy(getattr(mtq, recipe.kv_modelopt_config)["quant_cfg"])
        if _is_entry_list(kv_cfg) != listed:
            raise TypeError(f"{recipe.modelopt_config} and {recipe.kv_modelopt_config} have different quant_cfg shapes")
        _add_settings(quant_cfg, kv_cfg)
    if recipe.awq_block_size is not None:
        if listed:
            (entry,) = [e for e in quant_cfg if e["quantizer_name"] == "*weight_quantizer" and e.get("cfg")][-1:]
            weight = entry["cfg"]
        else:
            weight = quant_cfg["*weight_quantizer"]
        weight = weight[0] if isinstance(weight, list) else weight  # a sequential quantizer: the int4 stage first
        weight["block_sizes"] = {**weight.get("block_sizes", {}), -1: recipe.awq_block_size}
    _add_settings(quant_cfg, quantizer_settings({pattern: {"enable": False} for pattern in recipe.excluded}, listed))
    return config


def calibration_batches(checkpoint: str | Path, recipe: QuantRecipe, device: str = "cpu", max_length: int = 1024):
    """Model inputs (dicts of tensors, batch 1) for every calibration chat, via the checkpoint's processor."""
    from transformers import AutoProcessor

    from medgemma_triton.gpu.calibration import calibration_chats

    processor = AutoProcessor.from_pretrained(checkpoint)
    spec = ModelSpec.from_checkpoint(checkpoint)
    size = spec.vision.image_size if spec.vision else 224
    for chat in calibration_chats(recipe.calib_text, recipe.calib_image, image_size=size, seed=recipe.calib_seed):
        messages = copy.deepcopy(chat.messages)
        if chat.image is not None:
            for part in messages[-1]["content"]:
                if part["type"] == "image":
                    part["image"] = chat.image
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        if inputs["input_ids"].shape[-1] > max_length:  # never cut an image block: drop text from the front
            continue
        yield {k: v.to(device) for k, v in inputs.items()}


def _adds_one(norm) -> bool:
    """True for a norm that computes x * (1 + weight) (Gemma's): with weight 0 it passes the input through."""
    import torch

    probe = copy.deepcopy(norm)
    with torch.no_grad():
        probe.weight.zero_()
        out = probe(torch.ones(1, probe.weight.shape[-1], dtype=probe.weight.dtype, device=probe.weight.device))
    return bool(out.abs().max() > 0.5)


def _folds_naively(fold, norm) -> bool:
    """Whether ModelOpt's `fold` writes weight * s into this kind of norm, probed on a copy (weight 0, s 2).

    True: 0.37's fold (quant_utils.fuse_prequant_layernorm writes weight * s for every norm). False: a fold
    that knows x * (1 + weight), as 0.47's does (it checks _layernorm_uses_weight_plus_one, PR #793) and
    writes (1 + 0) * 2 - 1 = 1. Any other result is a fold we have not read, refused rather than guessed at.
    """
    import torch

    probe = copy.deepcopy(norm)
    with torch.no_grad():
        probe.weight.zero_()
    scale = torch.full_like(probe.weight, 2.0)
    fold(probe, [SimpleNamespace(input_quantizer=SimpleNamespace(_pre_quant_scale=scale))])
    folded = probe.weight.detach().to(torch.float32)
    if bool((folded == 0).all()):
        return True
    if bool((folded == 1).all()):
        return False
    raise RuntimeError(f"the installed ModelOpt folds an AWQ scale of 2 into a zero {type(norm).__name__} weight as "
                       f"{folded.flatten()[:4].tolist()}, neither w * s (0) nor (1 + w) * s - 1 (1); check its "
                       "fuse_prequant_layernorm before exporting INT4-AWQ")


@contextlib.contextmanager
def gemma_norm_fold(enabled: bool = True):
    """During ModelOpt's HF export, fold AWQ pre-quant scales into Gemma norms as (1 + w) * s - 1.

    Wraps modelopt.torch.export.unified_export_hf.fuse_prequant_layernorm: for a norm that adds one
    and an installed fold that does not know it, the weight is first set to (1 + w) - 1/s in fp32,
    so ModelOpt's own `weight * s` (and its bookkeeping of the fused scales) yields (1 + w) * s - 1.
    """
    from unittest import mock

    import torch
    from modelopt.torch.export import unified_export_hf

    original = unified_export_hf.fuse_prequant_layernorm
    verdicts: dict[type, bool] = {}

    def fold(layernorm_module, modules):
        kind = type(layernorm_module)
        if kind not in verdicts:
            verdicts[kind] = _adds_one(layernorm_module) and _folds_naively(original, layernorm_module)
        if not verdicts[kind]:
            return original(layernorm_module, modules)
        scale = modules[0].input_quantizer._pre_quant_scale.to(torch.float32)
        if not bool((scale > 0).all()):
            raise ValueError(f"{getattr(layernorm_module, 'name', kind.__name__)}: AWQ pre-quant scale is not positive")
        dtype = layernorm_module.weight.dtype
        weight = layernorm_module.weight.detach().to(torch.float32)
        layernorm_module.weight = torch.nn.Parameter(1.0 + weight - 1.0 / scale)
        original(layernorm_module, modules)
        layernorm_module.weight = torch.nn.Parameter(layernorm_module.weight.detach().to(dtype))

    if not enabled:
        yield verdicts
        return
    with mock.patch.object(unified_export_hf, "fuse_prequant_layernorm", fold):
        yield verdicts


def quantize_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    precision: str = "fp8",
    kv_cache: str = "fp8",
    device: str | None = None,
    calib_text: int = 64,
    calib_image: int = 64,
    seed: int = 0,
    log=print,
    inspect=None,
    fix_gemma_norms: bool = True,
    group_size: int | None = None,
) -> Path:
    """Quantize `checkpoint`'s language model and write a unified HF checkpoint to `output`.

    device: "cuda" inside the container (default when CUDA is available), "cpu" for small
    checkpoints (CI). Weights load in bf16 (the reference dtype); on CPU they compute in fp32.
    inspect: called with the calibrated (fake-quantized) model before export, which changes it.
    fix_gemma_norms: False exports with ModelOpt's own norm fold (to show its fault; never for serving).
    """
    import modelopt
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForImageTextToText, AutoModelForCausalLM

    checkpoint, output = Path(checkpoint), Path(output)
    spec = ModelSpec.from_checkpoint(checkpoint)
    recipe = recipe_for(precision, spec, kv_cache=kv_cache, calib_text=calib_text, calib_image=calib_image, seed=seed,
                        group_size=group_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loader = AutoModelForImageTextToText if spec.multimodal else AutoModelForCausalLM
    # bf16 weights, as served; on CPU computed in fp32. Export quantizes weight.to(bfloat16), so
    # calibrating on bf16-representable weights keeps the fake-quantized model and the export alike.
    model = loader.from_pretrained(checkpoint, dtype=torch.bfloat16)
    model = (model if device.startswith("cuda") else model.float()).to(device).eval()
    batches = list(calibration_batches(checkpoint, recipe, device=device))

    def forward_loop(m):
        with torch.no_grad():
            for batch in batches:
                m(**batch)

    started = time.monotonic()
    model = mtq.quantize(model, modelopt_quant_config(recipe), forward_loop=forward_loop)
    calib_s = time.monotonic() - started
    log(f"quantized {precision} on {device} with {len(batches)} calibration chats in {calib_s:.1f} s")
    if inspect is not None:
        inspect(model)

    tmp = output.with_name(output.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.inference_mode(), gemma_norm_fold(enabled=fix_gemma_norms) as corrected:
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=tmp)
    for name in CHECKPOINT_SIDE_FILES:  # export writes config + weights; the processor needs the rest
        if (checkpoint / name).is_file() and not (tmp / name).exists():
            shutil.copy2(checkpoint / name, tmp / name)
    written = json.loads((tmp / "hf_quant_config.json").read_text())["quantization"]
    if written.get("quant_algo") != recipe.expected_quant_algo:
        raise RuntimeError(f"ModelOpt exported quant_algo={written.get('quant_algo')!r}, expected {recipe.expected_quant_algo!r}")
    (tmp / RECIPE_FILE).write_text(json.dumps({
        "recipe": recipe.to_dict(),
        "calibration_chats": len(batches),
        "calibration_seconds": round(calib_s, 1),
        "device": device,
        "modelopt": modelopt.__version__,
        "source_checkpoint": str(checkpoint),
        "exported": written,
        # True where AWQ scales were folded into Gemma norms as (1 + w) * s - 1 by gemma_norm_fold
        "gemma_norm_fold_corrected": any(corrected.values()),
    }, indent=2) + "\n")
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)
    return output
