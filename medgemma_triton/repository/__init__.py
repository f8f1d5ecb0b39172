"""Building model repositories (`medgemma-triton build`): this package's entry points pick the cpu or gpu
profile's builder (cpu.py, gpu.py) and build the synthetic repository.

The builders share only config.py (config.pbtxt reading, writing and checks) and templates.py (where the
templates are), so neither imports the other; the dispatch imports each only when it is asked for.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medgemma_triton.repository.cpu import CpuSettings

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
        from medgemma_triton.repository.gpu import build_gpu_repository

        return build_gpu_repository(checkpoint, output, precision=precision, cache_dir=cache_dir)
    from medgemma_triton.repository.cpu import build_cpu_repository

    return build_cpu_repository(checkpoint, output, precision=precision, cache_dir=cache_dir,
                                settings=settings, onnx_dir=onnx_dir)


def build_synthetic_repository(output, settings=None) -> Path:
    """Write the synthetic repository (one `medgemma` model running serving/synthetic_model.py) to `output`,
    replacing it atomically; settings: serving.synthetic.SyntheticSettings."""
    from medgemma_triton import contract
    from medgemma_triton.export.atomic import atomic_directory
    from medgemma_triton.repository.config import contract_io, read_config, set_parameter, write_config
    from medgemma_triton.repository.cpu import TEMPLATES
    from medgemma_triton.serving.synthetic import MODEL_SOURCE, PROFILE, SyntheticSettings

    settings = settings or SyntheticSettings()
    output = Path(output).absolute()
    config = read_config(TEMPLATES / contract.TOP_MODEL / "config.pbtxt")
    contract_io(config)
    for key in list(config.parameters):
        del config.parameters[key]
    for key, value in (("profile", PROFILE), ("tokens_per_second", settings.tokens_per_second),
                       ("tokens_per_response", settings.tokens_per_response),
                       ("max_concurrent_requests", settings.max_concurrent_requests),
                       ("seconds_per_image", settings.seconds_per_image)):
        set_parameter(config, key, value)
    with atomic_directory(output) as staging:
        model = Path(staging) / contract.TOP_MODEL
        (model / "1").mkdir(parents=True)
        write_config(config, model / "config.pbtxt")
        shutil.copy2(MODEL_SOURCE, model / "1" / "model.py")
    return output
