"""Read a quantized unified HF checkpoint the way TensorRT-LLM receives it, and rebuild it as a
transformers `Gemma3ForConditionalGeneration` with dequantized weights.

This is our own reader, written from the file format, not ModelOpt's: it is how we check what
ModelOpt exported (quantize.py) before a GPU ever loads it. It follows what TensorRT-LLM's PyTorch
backend does with each tensor (tensorrt_llm/_torch/modules/linear.py, NVIDIA/TensorRT-LLM @
ed53795b33fc139493f762a1c6c53f691cf52d38):

- FP8 (`quant_algo: FP8`): per-tensor fp8 weights with a scalar `weight_scale`, and a static
  `input_scale` for the activations (FP8QDQLinearMethod: static_quantize_e4m3_per_tensor). TensorRT-LLM
  fuses q/k/v and gate/up into one GEMM: it takes the max of their input scales and of their weight
  scales and re-quantizes each weight to the shared scale (load_weights_fused_qkv_linear,
  load_weights_fused_gate_up_linear). We do the same, and quantize activations with a forward hook.
- INT4-AWQ (`quant_algo: W4A16_AWQ`): `weight` is uint8 [out/2, in], two signed int4 values per byte
  along the output dimension (low nibble: the even row), `weight_scale` is [out, in/group_size], and
  `pre_quant_scale` multiplies the activations of o_proj and down_proj (W4A16_AWQ_LinearMethod.apply).
  The fused q/k/v and gate/up loaders read weight and weight_scale only, so a pre_quant_scale there
  would be dropped: it must have been folded into the preceding norm, and we refuse a checkpoint
  where it was not.
- Everything else (norms, embeddings, the vision tower, the projector) is read as stored. Gemma's
  RMSNorm computes x * (1 + weight), in transformers and in TensorRT-LLM alike, so a pre-quant scale
  folded into a norm as weight * s instead of (1 + weight) * s - 1 shows up here as it would there.

The KV-cache scales (k_scale / v_scale) are not applied: the FP8 KV cache is measured on ModelOpt's
fake-quantized model instead (checkpoint_quality.py).
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

QUANT_CONFIG_FILE = "hf_quant_config.json"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8 = "FP8"
INT4_AWQ = "W4A16_AWQ"
SUPPORTED_ALGOS = (FP8, INT4_AWQ)

# TensorRT-LLM fuses these projections of one layer into one GEMM (shared scales for FP8).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
SCALE_SUFFIXES = ("weight_scale", "input_scale", "pre_quant_scale", "k_scale", "v_scale")

# ModelOpt writes the transformers 4.x layout of Gemma3ForConditionalGeneration (TensorRT-LLM's);
# transformers 5 nests the towers under `model.`.
_KEY_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


# Every Linear of a Gemma 3 decoder layer; ModelOpt quantizes all of them in both recipes.
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LAYER_KEY = re.compile(r"^(language_model\.model\.layers|model\.language_model\.layers)\.(\d+)\.")


@dataclass(frozen=True)
class QuantFormat:
    quant_algo: str
    group_size: int | None
    kv_cache_quant_algo: str | None
    exclude_modules: tuple[str, ...] = ()  # hf_quant_config.json's patterns of modules left unquantized

    @classmethod
    def read(cls, checkpoint: str | Path) -> "QuantFormat":
        path = Path(checkpoint) / QUANT_CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a ModelOpt unified HF checkpoint")
        quantization = json.loads(path.read_text())["quantization"]
        algo = quantization.get("quant_algo")
        if algo not in SUPPORTED_ALGOS:
            raise ValueError(f"{path}: quant_algo {algo!r} is not one of {', '.join(SUPPORTED_ALGOS)}")
        group = quantization.get("group_size")
        if algo == INT4_AWQ and not group:
            raise ValueError(f"{path}: W4A16_AWQ without group_size")
        return cls(algo, int(group) if group else None, quantization.get("kv_cache_quant_algo"),
                   tuple(quantization.get("exclude_modules") or ()))


def transformers_key(key: str) -> str:
    for old, new in _KEY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(f"checkpoint tensor {key!r} is not part of Gemma3ForConditionalGeneration")


def unpack_int4(packed):
    """uint8 [out/2, in] with two signed int4 per byte along the output dimension -> int8 [out, in]."""
    import torch

    if packed.dtype != torch.uint8:
        raise ValueError(f"packed int4 weights must be uint8, got {packed.dtype}")
    low = (packed & 0x0F).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    low, high = (low ^ 8) - 8, (high ^ 8) - 8  # sign-extend 4-bit two's complement
    return torch.stack((low, high), dim=1).reshape(packed.shape[0] * 2, packed.shape[1])


def dequantize_int4(packed, weight_scale, group_size: int):
    import torch

    values = unpack_int4(packed).to(torch.float32)
    out_features, in_features = values.shape
    if in_features % group_size or tuple(weight_scale.shape) != (out_features, in_features // group_size):
        raise ValueError(f"weight_scale {tuple(weight_scale.shape)} does not match int4 weight [{out_features}, "
                         f"{in_features}] in groups of {group_size}")
    return values * weight_scale.to(torch.float32).repeat_interleave(group_size, dim=1)


def fp8_round_trip(values, scale):
    """What an fp8 tensor quantized with `scale` holds, back in fp32: clamp(values / scale) in e4m3, times scale."""
    import torch

    scale = scale.to(torch.float32)
    return (values.to(torch.float32) / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32) * scale


def _linear_prefixes(tensors: dict) -> list[str]:
    return sorted(key[: -len(".weight_scale")] for key in tensors if key.endswith(".weight_scale"))


def _fused_partners(prefix: str) -> list[str]:
    """The projections TensorRT-LLM fuses with `prefix` (itself included), or [prefix]."""
    head, _, name = prefix.rpartition(".")
    for group in FUSED_GROUPS:
        if name in group:
            return [f"{head}.{member}" for member in group]
    return [prefix]


def dequantized_state(tensors: dict, fmt: QuantFormat, fuse: bool = True) -> tuple[dict, dict]:
    """(fp32 weights by checkpoint key with every scale tensor consumed, activation input_scale by Linear prefix).

    fuse=False reads each projection on its own, as ModelOpt's fake-quantized model computes it
    (tests compare the two); TensorRT-LLM fuses.
    """
    import torch

    weights = {k: v for k, v in tensors.items() if not k.endswith(tuple("." + s for s in SCALE_SUFFIXES))}
    unscaled = [k for k, v in weights.items() if v.dtype == torch.float8_e4m3fn and k[: -len(".weight")] + ".weight_scale" not in tensors]
    if unscaled:  # read as plain numbers they are off by 1/scale: TensorRT-LLM PR #6499's gibberish
        raise ValueError(f"fp8 tensors without a weight_scale: {unscaled[:3]}{' ...' if len(unscaled) > 3 else ''}")
    input_scales = {}
    for prefix in _linear_prefixes(tensors):
        stored = tensors[prefix + ".weight"]
        group = [p for p in _fused_partners(prefix) if p + ".weight_scale" in tensors] if fuse else [prefix]
        if fmt.quant_algo == FP8:
            if stored.dtype != torch.float8_e4m3fn:
                raise ValueError(f"{prefix}.weight is {stored.dtype}, FP8 checkpoints store float8_e4m3fn")
            # One GEMM per fused group: shared (max) scales, weights re-quantized in bf16 to the shared one.
            shared = max(tensors[p + ".weight_scale"].reshape(()) for p in group)
            own = tensors[prefix + ".weight_scale"].reshape(())
            requantized = (stored.to(torch.bfloat16) * own.to(torch.bfloat16)).to(torch.float32)
            weights[prefix + ".weight"] = fp8_round_trip(requantized, shared) if len(group) > 1 else stored.to(torch.float32) * own
            scales = [tensors[p + ".input_scale"].reshape(()) for p in group if p + ".input_scale" in tensors]
            if scales:
                input_scales[prefix] = max(scales)
        else:
            if len(group) > 1 and prefix + ".pre_quant_scale" in tensors:
                raise ValueError(f"{prefix}.pre_quant_scale: TensorRT-LLM's fused {'/'.join(p.rpartition('.')[2] for p in group)} "
                                 "loader ignores it, so it must be folded into the preceding norm")
            weight = dequantize_int4(stored, tensors[prefix + ".weight_scale"], fmt.group_size)
            if prefix + ".pre_quant_scale" in tensors:  # input * s before the GEMM == weight columns * s
                weight = weight * tensors[prefix + ".pre_quant_scale"].to(torch.float32)[None, :]
            weights[prefix + ".weight"] = weight
    return weights, input_scales


def _excluded_by(fmt: QuantFormat, prefix: str) -> str | None:
    """The exclude_modules pattern that names this Linear (under any of the names a loader may use), or None."""
    names = {prefix, prefix.removeprefix("language_model."), prefix.removeprefix("model.language_model.")}
    if prefix.startswith("language_model."):
        names.add(transformers_key(prefix))
    return next((p for p in fmt.exclude_modules for n in names if fnmatch.fnmatchcase(n, p)), None)


def quantized_linear_faults(tensors: dict, fmt: QuantFormat) -> list[str]:
    """What keeps each decoder layer's Linears (attention and MLP) from being read as quantized: missing or
    unquantized weights, missing scales, or an exclude_modules pattern that names them. A loader that builds
    a quantized Linear from the checkpoint's quant config needs all of them (TensorRT-LLM PR #6499: Gemma 3's
    MLP linears were built without it and produced gibberish from FP8 weights). Empty: nothing wrong."""
    import torch

    layers = sorted({int(m.group(2)) for k in tensors if (m := _LAYER_KEY.match(k))})
    if not layers:
        return ["no language-model decoder layers in the checkpoint"]
    roots = {m.group(1) for k in tensors if (m := _LAYER_KEY.match(k))}
    if len(roots) != 1:
        raise ValueError(f"decoder layers under several roots: {sorted(roots)}")
    (root,) = roots
    expected = torch.float8_e4m3fn if fmt.quant_algo == FP8 else torch.uint8
    needed = ("weight_scale", "input_scale") if fmt.quant_algo == FP8 else ("weight_scale",)
    faults = []
    for layer in layers:
        for linear in LAYER_LINEARS:
            prefix = f"{root}.{layer}.{linear}"
            weight = tensors.get(prefix + ".weight")
            if weight is None:
                faults.append(f"{prefix}.weight is missing")
            elif weight.dtype != expected:
                faults.append(f"{prefix}.weight is {weight.dtype}, {fmt.quant_algo} stores {expected}")
            faults += [f"{prefix}.{name} is missing" for name in needed if prefix + "." + name not in tensors]
            if (pattern := _excluded_by(fmt, prefix)) is not None:
                faults.append(f"{prefix} is excluded from quantization by exclude_modules pattern {pattern!r}")
    return faults


def read_tensors(checkpoint: str | Path) -> dict:
    from safetensors import safe_open

    files = sorted(Path(checkpoint).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {checkpoint}")
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def _quantize_inputs_hook(input_scale):
    def hook(module, args):
        return (fp8_round_trip(args[0], input_scale).to(args[0].dtype), *args[1:])

    return hook


def load_dequantized(checkpoint: str | Path, fuse: bool = True, dtype: str = "float32"):
    """The checkpoint as a transformers Gemma3ForConditionalGeneration (eval mode, CPU), fp32 by default
    (bfloat16 to compute as the served model does; float16 is refused).

    FP8 checkpoints also quantize each Linear's input with its static input_scale, as TensorRT-LLM does.
    fuse: see dequantized_state.
    """
    import torch
    from transformers import AutoConfig, Gemma3ForConditionalGeneration

    from medgemma_triton.gpu.verify import refuse_fp16

    refuse_fp16(dtype, f"load_dequantized({checkpoint})")
    fmt = QuantFormat.read(checkpoint)
    weights, input_scales = dequantized_state(read_tensors(checkpoint), fmt, fuse=fuse)
    # Built from the config, not from_pretrained: the weights are ours to load, with no quantizer hooks.
    model = Gemma3ForConditionalGeneration(AutoConfig.from_pretrained(checkpoint)).to(torch.float32)
    state = {transformers_key(k): v.to(torch.float32) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise ValueError(f"{checkpoint}: tensors missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.tie_weights()
    modules = dict(model.named_modules())
    for prefix, scale in input_scales.items():
        modules[transformers_key(prefix)].register_forward_pre_hook(_quantize_inputs_hook(scale))
    return model.to(getattr(torch, dtype)).eval()

