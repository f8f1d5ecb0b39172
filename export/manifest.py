"""`manifest.json` of an ONNX export: what was exported, from what, by which versions.

The build cache trusts an export whose manifest names the same checkpoint hash, precision and
exporter version and whose files are all present with their recorded sizes.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from medgemma_triton import __version__
from medgemma_triton.runtime.host_check import MANIFEST, QUANTIZATION_SCHEME, read_manifest
MANIFEST_FORMAT = 1
# What identifies a checkpoint: its config, tokenizer, processor settings, chat template and weights.
CHECKPOINT_SUFFIXES = (".json", ".jinja", ".safetensors", ".model")
# The exporter's own source: a change to any of these invalidates cached exports.
EXPORTER_SOURCES = ("onnx_export.py", "vision.py", "vision_fusion.py", "decoder.py", "int4.py", "int8.py",
                    "host_check.py", "manifest.py")


def checkpoint_files(checkpoint: Path) -> list[Path]:
    return sorted(
        p for p in checkpoint.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES
    )


def checkpoint_sha256(checkpoint: Path, progress=print) -> str:
    """sha256 over (name, length, bytes) of every file that defines the checkpoint."""
    digest = hashlib.sha256()
    files = checkpoint_files(checkpoint)
    total = sum(p.stat().st_size for p in files)
    if total > 1 << 30:
        progress(f"hashing {total / 2**30:.1f} GiB of checkpoint files")
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def checkpoint_stats(checkpoint: Path) -> dict:
    """name -> [bytes, mtime_ns] of the files checkpoint_sha256 reads."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in checkpoint_files(checkpoint)}


def cached_checkpoint_sha256(checkpoint: Path, output_dir: Path, progress=print) -> str:
    """The hash recorded in output_dir's manifest when the checkpoint files' sizes and mtimes are
    unchanged (as make does), else a fresh hash: a 4B checkpoint is ~8.6 GB to read."""
    manifest = read_manifest(output_dir) or {}
    source = manifest.get("source_checkpoint", {})
    if source.get("sha256") and source.get("file_stats") == checkpoint_stats(checkpoint):
        return source["sha256"]
    return checkpoint_sha256(checkpoint, progress)


def exporter_version() -> str:
    """Package version plus a digest of the exporter's source, so a code change re-exports."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in EXPORTER_SOURCES:
        path = here / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return f"{__version__}+src.{digest.hexdigest()[:12]}.q{QUANTIZATION_SCHEME}"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def build_manifest(
    *, checkpoint: Path, checkpoint_hash: str, precision: str, opset: int, spec_dict: dict,
    output_dir: Path, exporter: str, export_seconds: float, extra: dict | None = None,
) -> dict:
    files = {
        p.relative_to(output_dir).as_posix(): {"bytes": p.stat().st_size}
        for p in sorted(output_dir.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    return {
        "format": MANIFEST_FORMAT,
        "exporter_version": exporter,
        "package_version": __version__,
        "precision": precision,
        "opset": opset,
        "source_checkpoint": {
            "path": str(checkpoint.absolute()),
            "sha256": checkpoint_hash,
            "file_stats": checkpoint_stats(checkpoint),
        },
        "versions": {
            "python": platform.python_version(),
            **{name: _version(name) for name in ("torch", "transformers", "onnx", "onnxruntime", "onnxscript")},
        },
        "files": files,
        "export_seconds": round(export_seconds, 1),
        **(extra or {}),
        "spec": spec_dict,
    }


def write_manifest(output_dir: Path, manifest: dict) -> Path:
    path = output_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def is_up_to_date(output_dir: Path, *, checkpoint_hash: str, precision: str, exporter: str,
                  quantization: dict | None = None) -> bool:
    """The export at output_dir came from this checkpoint, precision, exporter and quantization settings
    (when given), and is whole."""
    manifest = read_manifest(output_dir)
    if not manifest or manifest.get("format") != MANIFEST_FORMAT:
        return False
    if (
        manifest.get("source_checkpoint", {}).get("sha256") != checkpoint_hash
        or manifest.get("precision") != precision
        or manifest.get("exporter_version") != exporter
        or (quantization is not None and manifest.get("quantization") != quantization)
    ):
        return False
    for name, info in manifest.get("files", {}).items():
        path = Path(output_dir) / name
        if not path.is_file() or path.stat().st_size != info.get("bytes"):
            return False
    return True
