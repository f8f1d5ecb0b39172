"""Where the model repository templates are, installed or in a source checkout.

The top-level model_repository/ and gpu_model_repository/ are the canonical copies. pyproject.toml
ships them as package data under medgemma_triton/ (as it maps export/ and client/), so a wheel has
medgemma_triton/model_repository/; a source checkout (or an editable install) has them beside the package.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def template_dir(name: str) -> Path:
    """`name` (model_repository or gpu_model_repository) as installed, else from the source tree."""
    installed = PACKAGE_DIR / name
    return installed if installed.is_dir() else PACKAGE_DIR.parent / name
