"""`medgemma-triton export`: a Gemma 3 checkpoint -> ONNX artifacts for the `cpu` profile.

output/
  vision_encoder.onnx (+ .data)   multimodal checkpoints only (export/vision.py); standard ONNX ops, for TensorRT
  vision_encoder.ort.onnx         the same graph, same .data, attention fused for ONNX Runtime (export/vision_fusion.py):
                                  what the cpu profile serves
  decoder.onnx (+ .data)          the decoder with KV cache (export/decoder.py); int4: MatMulNBits projections, int8 head (export/int4.py);
                                  int8: DynamicQuantizeMatMul (export/int8.py)
  manifest.json                   source checkpoint hash, versions, precision, opset, spec, files

The whole directory is written atomically (export/atomic.py): an interrupted or failed export leaves
`output` as it was. An `output` whose manifest matches the checkpoint hash, precision and exporter
version is returned as is (the cache `medgemma-triton build` relies on), unless `force`.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path

from medgemma_triton.export.atomic import OutputError, atomic_directory
from medgemma_triton.export.host_check import write_host_check
from medgemma_triton.export.manifest import (
    MANIFEST,
    build_manifest,
    cached_checkpoint_sha256,
    exporter_version,
    is_up_to_date,
    write_manifest,
)
from medgemma_triton.runtime.host_check import CHECK_MODEL
from medgemma_triton.spec import CheckpointError, ModelSpec

PRECISIONS = ("fp32", "int4", "int8")
DECODER_ONNX = "decoder.onnx"


@contextlib.contextmanager
def _quiet_exporter():
    """Hide the exporter's noise (missing-torchvision registrations, deprecation warnings)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used", category=UserWarning)
            yield
    finally:
        registration.setLevel(level)


def _check_output(output: Path) -> None:
    """Never replace something that is not an earlier export."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output} exists and is not a directory; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST).is_file():
        raise OutputError(
            f"{output} is a non-empty directory without {MANIFEST} (not an export); "
            "choose another --output or empty it"
        )


def _default_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_onnx(
    checkpoint: str | Path,
    output: str | Path,
    precision: str = "fp32",
    force: bool = False,
    progress=print,
    fp32_source: str | Path | None = None,
    int8_weights: str = "unsigned",
    int4_block_size: int | None = None,
) -> Path:
    """Export `checkpoint` to `output` (a directory); returns `output`.

    fp32_source: an fp32 export of the same checkpoint (an earlier export_onnx output). When it is up to
    date (same checkpoint hash and exporter), an int4/int8 export takes its vision encoder files (hard
    links where the filesystem allows, else copies) and quantizes its decoder, instead of exporting both
    again (on dev: ~2 minutes); otherwise it is ignored. int8_weights: the storage of int8 weights
    ("unsigned", right on every CPU; "signed", faster on CPUs with VNNI or AMX: export/int4.py).
    int4_block_size: the int4 projections' block (default export/int4.py's BLOCK_SIZE; int4 only)."""
    checkpoint, output = Path(checkpoint), Path(output)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not supported (choose from {', '.join(PRECISIONS)})")
    spec = ModelSpec.from_checkpoint(checkpoint)  # CheckpointError says what is wrong
    _check_output(output)
    checkpoint_hash = cached_checkpoint_sha256(checkpoint, output, progress)
    exporter = exporter_version()
    if int4_block_size is not None and precision != "int4":
        raise ValueError(f"int4_block_size is an int4 setting; this export is {precision}")
    int4_options = {"block_size": int4_block_size} if int4_block_size is not None else {}
    quantization = _quantization_info(precision, int8_weights, **int4_options)
    if not force and is_up_to_date(output, checkpoint_hash=checkpoint_hash, precision=precision, exporter=exporter,
                                   quantization=quantization):
        progress(f"{output} is up to date ({precision}, checkpoint {checkpoint_hash[:12]})")
        return output

    from medgemma_triton.export.decoder import export_decoder

    reuse = None
    if precision != "fp32" and fp32_source is not None and is_up_to_date(
        Path(fp32_source), checkpoint_hash=checkpoint_hash, precision="fp32", exporter=exporter
    ):
        reuse = Path(fp32_source)
        progress(f"reusing the fp32 export at {reuse} (vision encoder, decoder to quantize)")
    started = time.perf_counter()
    timings = {}
    with atomic_directory(output) as staging, _quiet_exporter():
        if spec.multimodal:
            from medgemma_triton.export.vision import export_vision_encoder

            step = time.perf_counter()
            if reuse:
                _link_or_copy(sorted(reuse.glob("vision_encoder*")), staging)
            else:
                export_vision_encoder(checkpoint, spec, staging, progress)
            timings["vision_encoder_s"] = round(time.perf_counter() - step, 1)
        step = time.perf_counter()
        if precision == "fp32":
            decoder = export_decoder(checkpoint, spec, staging, progress)
            timings["decoder_s"] = round(time.perf_counter() - step, 1)
        else:
            fp32_dir = staging / ".decoder-fp32"
            fp32_decoder = reuse / DECODER_ONNX if reuse else export_decoder(checkpoint, spec, fp32_dir, progress)
            timings["decoder_s"] = round(time.perf_counter() - step, 1)
            step = time.perf_counter()
            quantize, _ = _quantization(precision)
            decoder = quantize(fp32_decoder, staging / DECODER_ONNX, spec, progress, int8_weights=int8_weights,
                               **int4_options)
            progress(f"host check written for {', '.join(write_host_check(decoder))}")
            timings[f"{precision}_quantization_s"] = round(time.perf_counter() - step, 1)
            if fp32_dir.exists():
                _remove_tree(fp32_dir)
        if decoder.resolve() != (staging / DECODER_ONNX).resolve():
            raise RuntimeError(f"decoder export wrote {decoder}, expected {staging / DECODER_ONNX}")
        opsets = {_default_opset(p) for p in staging.glob("*.onnx") if p.name != CHECK_MODEL}
        manifest = build_manifest(
            checkpoint=checkpoint,
            checkpoint_hash=checkpoint_hash,
            precision=precision,
            opset=max(opsets),
            spec_dict=spec.to_dict(),
            output_dir=staging,
            exporter=exporter,
            export_seconds=time.perf_counter() - started,
            extra={"timings": timings, "quantization": quantization,
                   "fp32_source": str(reuse.absolute()) if reuse else None},
        )
        write_manifest(staging, manifest)
    progress(f"exported {output} ({precision}) in {time.perf_counter() - started:.0f} s")
    return output


def _quantization(precision: str):
    """(quantize_decoder, quantization_settings) of a quantized precision; None for fp32."""
    if precision == "int4":
        from medgemma_triton.export import int4 as module

        return module.quantize_decoder_int4, module.quantization_settings
    if precision == "int8":
        from medgemma_triton.export import int8 as module

        return module.quantize_decoder_int8, module.quantization_settings
    return None


def _quantization_info(precision: str, int8_weights: str = "unsigned", **options) -> dict | None:
    quantization = _quantization(precision)
    return quantization[1](int8_weights=int8_weights, **options) if quantization else None


def _link_or_copy(files: list[Path], directory: Path) -> None:
    """Hard-link files into directory (exports are replaced whole, never edited in place), else copy."""
    import os
    import shutil

    for path in files:
        try:
            os.link(path, directory / path.name)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(path, directory / path.name)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


__all__ = ["export_onnx", "CheckpointError", "OutputError", "PRECISIONS"]
