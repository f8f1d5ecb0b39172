"""`medgemma-triton build`: pick the cpu or gpu profile's repository builder.

The dispatch sits above both builders (serving/repository.py, gpu/repository.py), which share only
medgemma_triton.repository_config, so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

from medgemma_triton.serving.repository import CpuSettings, build_cpu_repository

PROFILES = ("cpu", "gpu")


def build_repository(
    checkpoint,
    output,
    profile: str = "cpu",
    precision: str = "fp32",
    cache_dir=None,
    settings: CpuSettings | None = None,
    onnx_dir=None,
) -> Path:
    """Build `profile`'s model repository at `output`; settings and onnx_dir are the cpu profile's."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    if profile == "gpu":  # inside NVIDIA's Triton TensorRT-LLM container (docs/gpu.md)
        from medgemma_triton.gpu.repository import build_gpu_repository

        return build_gpu_repository(checkpoint, output, precision=precision, cache_dir=cache_dir)
    return build_cpu_repository(checkpoint, output, precision=precision, cache_dir=cache_dir,
                                settings=settings, onnx_dir=onnx_dir)
