"""A Gemma 3 checkpoint -> the cpu profile's quantized decoder as a GGUF file, for llama.cpp.

output/
  vision_encoder*   the ONNX vision encoder (export/vision.py; linked from an fp32 export when one is
                    up to date): images stay on ONNX Runtime
  decoder.gguf      the text decoder: llama.cpp's own convert_hf_to_gguf.py, then its quantizer
                    (llama_model_quantize, what llama-quantize runs) to Q4_K_M (int4) or Q8_0 (int8);
                    F32 is the parity reference for the engine (tests/test_llamacpp_parity.py)
  manifest.json     as an ONNX export's, plus "gguf": type, llama.cpp version, sha256, bytes per tensor type

Both tools come from the llama-cpp-python source distribution that scripts/setup-llamacpp.sh unpacks and
builds (runtime/llamacpp.py pins it): the converter from its vendored llama.cpp tree, the quantizer from
the installed library. The directory is written atomically and reused while its manifest matches.

Two things llama.cpp's gemma3 model cannot read from a checkpoint, made to hold here:
- Its query scale is 1/sqrt(head_dim); transformers' is 1/sqrt(query_pre_attn_scalar). google/medgemma-4b-it
  has them equal. Where they differ (our tiny checkpoint), the converter is given a copy of the checkpoint
  whose q_norm weights carry the ratio: q_norm is the last elementwise scale on the queries before RoPE
  (linear), so this is exact up to float rounding.
- It takes the sliding/global layer pattern as a period (global every 6th layer unless the GGUF says
  otherwise). The period is derived from the checkpoint's layer_types and written into the GGUF; a
  pattern that is not periodic is refused.
- The converter keeps its own tokenizer in the file (for the dev checkpoints it labels it with another
  model's pre-tokenizer); the engine never tokenizes with it: token ids come from our tokenizer.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medgemma_triton.export.atomic import atomic_directory
from medgemma_triton.export.manifest import (
    build_manifest,
    cached_checkpoint_sha256,
    exporter_version,
    is_up_to_date,
    write_manifest,
)
from medgemma_triton.export.llamacpp_build import CACHE, file_sha256
from medgemma_triton.runtime.llamacpp import LLAMA_CPP_COMMIT, LLAMA_CPP_PYTHON
from medgemma_triton.spec import CheckpointError, ModelSpec

DECODER_GGUF = "decoder.gguf"
# precision -> (GGUF file type, llama_ftype); F32 is the engine's parity reference, not a served precision
GGUF_TYPES = {"int4": ("Q4_K_M", 15), "int8": ("Q8_0", 7), "f32": ("F32", 0)}
SOURCE_ENV = "MEDGEMMA_LLAMA_CPP_SOURCE"
DEFAULT_SOURCE = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
Q_NORM = ".self_attn.q_norm.weight"


def llamacpp_source() -> Path:
    """The vendored llama.cpp tree of the pinned sdist (its converter and gguf-py)."""
    source = Path(os.environ.get(SOURCE_ENV, DEFAULT_SOURCE))
    if not (source / "convert_hf_to_gguf.py").is_file():
        raise FileNotFoundError(
            f"llama.cpp's converter is not at {source}; run `bash scripts/setup-llamacpp.sh` (it unpacks "
            f"llama-cpp-python {LLAMA_CPP_PYTHON}'s source there), or set {SOURCE_ENV}"
        )
    return source


def swa_period(spec: ModelSpec) -> int:
    """The period p of the checkpoint's sliding/global pattern (layer i slides iff i % p < p - 1), as
    llama.cpp's gemma3 reads it; 1 when no layer slides. A pattern of any other shape is refused."""
    sliding = [spec.text.is_sliding(i) for i in range(spec.text.num_layers)]
    if not any(sliding):
        return 1
    for period in range(2, spec.text.num_layers + 2):
        if all(s == (i % period < period - 1) for i, s in enumerate(sliding)):
            return period
    raise CheckpointError(
        f"layer_types {['s' if s else 'f' for s in sliding]} is not 'sliding layers, then one global' repeated: "
        "llama.cpp's gemma3 cannot represent it"
    )


def quantization_settings(precision: str) -> dict:
    gguf_type, _ = GGUF_TYPES[precision]
    return {"engine": "llama.cpp", "gguf_type": gguf_type, "llama_cpp_python": LLAMA_CPP_PYTHON,
            "llama_cpp": LLAMA_CPP_COMMIT}


def export_gguf(checkpoint: str | Path, output: str | Path, precision: str = "int4", vision_source=None,
                force: bool = False, progress=print, threads: int | None = None) -> Path:
    """Write `output` (a directory) for `checkpoint`; returns it. vision_source: an fp32 ONNX export of the
    same checkpoint whose vision encoder files are linked when it is up to date."""
    checkpoint, output = Path(checkpoint).absolute(), Path(output).absolute()
    if precision not in GGUF_TYPES:
        raise ValueError(f"precision {precision!r} has no GGUF type (choose {', '.join(GGUF_TYPES)})")
    spec = ModelSpec.from_checkpoint(checkpoint)
    period = swa_period(spec)
    checkpoint_hash = cached_checkpoint_sha256(checkpoint, output, progress)
    exporter = f"{exporter_version()}.gguf.{hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:8]}"
    settings = quantization_settings(precision)
    if not force and is_up_to_date(output, checkpoint_hash=checkpoint_hash, precision=precision, exporter=exporter,
                                   quantization=settings):
        progress(f"{output} is up to date ({settings['gguf_type']}, checkpoint {checkpoint_hash[:12]})")
        return output
    source = llamacpp_source()
    started, timings = time.perf_counter(), {}
    with atomic_directory(output) as staging:
        if spec.multimodal:
            step = time.perf_counter()
            _vision(checkpoint, spec, staging, vision_source, checkpoint_hash, exporter_version(), progress)
            timings["vision_encoder_s"] = round(time.perf_counter() - step, 1)
        step = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gguf-", dir=staging) as work:
            converted = _convert(checkpoint, spec, source, Path(work), progress)
            timings["convert_s"] = round(time.perf_counter() - step, 1)
            step = time.perf_counter()
            progress(f"quantizing to {settings['gguf_type']} with llama.cpp")
            _quantize(converted, staging / DECODER_GGUF, GGUF_TYPES[precision][1], spec, period, threads)
            timings["quantize_s"] = round(time.perf_counter() - step, 1)
        gguf = {**settings, "sliding_window_pattern": period, "sha256": file_sha256(staging / DECODER_GGUF),
                "bytes_by_type": tensor_bytes_by_type(staging / DECODER_GGUF)}
        manifest = build_manifest(
            checkpoint=checkpoint, checkpoint_hash=checkpoint_hash, precision=precision, opset=0,
            spec_dict=spec.to_dict(), output_dir=staging, exporter=exporter,
            export_seconds=time.perf_counter() - started,
            extra={"timings": timings, "quantization": settings, "gguf": gguf},
        )
        write_manifest(staging, manifest)
    progress(f"wrote {output} ({settings['gguf_type']}) in {time.perf_counter() - started:.0f} s")
    return output


def _vision(checkpoint, spec, staging, vision_source, checkpoint_hash, exporter, progress) -> None:
    if vision_source is not None and is_up_to_date(Path(vision_source), checkpoint_hash=checkpoint_hash,
                                                   precision="fp32", exporter=exporter):
        from medgemma_triton.export.onnx_export import _link_or_copy

        _link_or_copy(sorted(Path(vision_source).glob("vision_encoder*")), staging)
        return
    from medgemma_triton.export.onnx_export import _quiet_exporter
    from medgemma_triton.export.vision import export_vision_encoder

    with _quiet_exporter():
        export_vision_encoder(checkpoint, spec, staging, progress)


def _convert(checkpoint: Path, spec: ModelSpec, source: Path, work: Path, progress) -> Path:
    """llama.cpp's converter on the checkpoint (or on a copy with the query scale folded in)."""
    text = spec.text
    if not math.isclose(text.query_pre_attn_scalar, text.head_dim):
        checkpoint = _fold_query_scale(checkpoint, work / "checkpoint", text.head_dim / text.query_pre_attn_scalar)
    outtype = "bf16" if spec.dtype == "bfloat16" else "f32"  # exact for the checkpoint's own weights
    out = work / f"decoder-{outtype}.gguf"
    progress(f"converting {checkpoint.name} to GGUF ({outtype}) with llama.cpp's convert_hf_to_gguf.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(checkpoint),
                             "--outtype", outtype, "--outfile", str(out)], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return out


def _fold_query_scale(checkpoint: Path, copy: Path, ratio: float) -> Path:
    """A copy of the checkpoint (links, except config.json and the weights) whose q_norm weights w become
    (1 + w) * sqrt(ratio) - 1 and whose query_pre_attn_scalar is head_dim."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    copy.mkdir(parents=True)
    scale = math.sqrt(ratio)
    for path in checkpoint.iterdir():
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
            for name in [n for n in tensors if n.endswith(Q_NORM)]:
                weight = tensors[name].astype(np.float64)
                tensors[name] = ((1.0 + weight) * scale - 1.0).astype(tensors[name].dtype)
            save_file(tensors, str(copy / path.name), metadata={"format": "pt"})
        elif path.name == "config.json":
            config = json.loads(path.read_text())
            text = config.get("text_config", config)
            text["query_pre_attn_scalar"] = text.get("head_dim", 256)
            (copy / path.name).write_text(json.dumps(config, indent=2))
        elif path.is_file():
            os.symlink(path, copy / path.name)
    return copy


def _quantize(source: Path, out: Path, ftype: int, spec: ModelSpec, period: int, threads: int | None) -> None:
    from medgemma_triton.runtime.llamacpp import _llama, load_backends

    llama_cpp = _llama()
    load_backends()
    overrides = (llama_cpp.llama_model_kv_override * 2)()
    overrides[0].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
    overrides[0].key = b"gemma3.attention.sliding_window_pattern"
    overrides[0].value.val_i64 = period
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if code != 0:
        raise RuntimeError(f"llama_model_quantize failed ({code}) on {source}")


def tensor_bytes_by_type(path: Path) -> dict[str, int]:
    """Bytes of the GGUF's tensors per quantization type (a Q4_K_M file mixes Q4_K, Q6_K and fallbacks)."""
    from gguf import GGUFReader

    totals: dict[str, int] = {}
    for tensor in GGUFReader(str(path)).tensors:
        name = tensor.tensor_type.name
        totals[name] = totals.get(name, 0) + int(tensor.n_bytes)
    return dict(sorted(totals.items()))
