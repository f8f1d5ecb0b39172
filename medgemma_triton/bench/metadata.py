"""Run metadata: where the numbers came from (host, code revision, deployment, model spec)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

from medgemma_triton.runtime.host_check import cpu_class, cpu_features, cpu_model, read_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]


def git_revision(root: Path = REPO_ROOT) -> str | None:
    """HEAD's commit, with "+dirty" when the work tree has changes; None outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def host_info() -> dict:
    """The machine the benchmark client ran on (the server may be elsewhere: see `deployment.url`)."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_class": cpu_class(),  # decides ONNX Runtime's integer kernels: quantized numbers hold per class
        "cpu_features": cpu_features(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _memory_gib(),
        "python": sys.version.split()[0],
        "packages": {p: _version(p) for p in ("medgemma-triton", "tritonclient", "numpy", "torch", "transformers")},
    }


def deployment_profile(deployment: dict) -> dict:
    """Profile and precision as the served configs expose them (parameters `profile`/`precision`),
    else inferred from the backends: TensorRT/TensorRT-LLM means `gpu`, Python backend `cpu`."""
    models = deployment.get("models", {})
    params = {}
    for name in ("medgemma", "vision_encoder", "llm"):  # the llm's parameters win
        params.update({k: v for k, v in models.get(name, {}).get("parameters", {}).items() if v})
    backends = {m.get("backend", "") for m in models.values()}
    profile = params.get("profile") or ("gpu" if backends & {"tensorrtllm", "tensorrt_plan"} else "cpu")
    precision = params.get("precision") or params.get("quantization") or _export_precision(params.get("onnx_model"))
    return {
        "profile": profile,
        "precision": precision,
        # where the build read the checkpoint (a built repository's own `checkpoint` is relative to it)
        "checkpoint": params.get("source_checkpoint") or params.get("checkpoint"),
        "checkpoint_sha256": params.get("checkpoint_sha256"),
        "onnx_model": params.get("onnx_model"),
    }


def _export_precision(onnx_model: str | None) -> str | None:
    """The precision recorded in the ONNX export's manifest.json, when that file is readable here."""
    manifest = read_manifest(Path(onnx_model).parent) if onnx_model else None
    return manifest.get("precision") if manifest else None


def spec_summary(checkpoint: str | None) -> dict | None:
    """Key geometry of the served checkpoint when its directory is readable from here."""
    if not checkpoint or not Path(checkpoint).is_dir():
        return None
    try:
        from ..spec import ModelSpec

        spec = ModelSpec.for_serving(checkpoint)
    except Exception as exc:  # noqa: BLE001 - the spec is context for the report, never a reason to fail it
        return {"error": f"{type(exc).__name__}: {exc}"}
    summary = {
        "architecture": spec.architecture,
        "dtype": spec.dtype,
        "text_layers": spec.text.num_layers,
        "hidden_size": spec.text.hidden_size,
        "vocab_size": spec.text.vocab_size,
    }
    if spec.vision:
        summary.update(image_size=spec.vision.image_size, mm_tokens_per_image=spec.vision.mm_tokens_per_image)
    return summary


def run_metadata(deployment: dict | None, argv: list[str]) -> dict:
    profile = deployment_profile(deployment) if deployment else {}
    return {
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(argv),
        "git_revision": git_revision(),
        "host": host_info(),
        "deployment": deployment,
        **profile,
        "spec": spec_summary(profile.get("checkpoint")),
    }
