"""Imports run from outer layers to inner ones, never back (read from the source, lazy imports included:
they run too). Inner first:

0. base: `contract`, `spec`, `processes`;
1. `runtime`: tokenizer, vision, decoders, sampling;
2. model-process code, what runs inside Triton's model processes: `serving`, `gpu.llm_engine` and the
   repositories' `*/1/model.py`;
3. everything else: `export`, `client`, `gateway`, `bench`, `gpu` (its export and build code), `cli`,
   `repository` (building repositories) and `server` (launching and supervising tritonserver).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"medgemma_triton": ROOT / "medgemma_triton", "medgemma_triton.export": ROOT / "export",
                "medgemma_triton.client": ROOT / "client"}
BASE = {"medgemma_triton.contract", "medgemma_triton.spec", "medgemma_triton.processes"}
# gpu.llm_engine drives TensorRT-LLM inside the gpu llm's model process, with trtllm_gemma3 and pins
MODEL_PROCESS = ("medgemma_triton.serving", *(f"medgemma_triton.gpu.{name}" for name in ("llm_engine", "trtllm_gemma3", "pins")))
LAYER_NAMES = ("base", "runtime", "model process", "outer")


def layer(module: str) -> int:
    if module in BASE or module == "medgemma_triton":
        return 0
    if module == "medgemma_triton.runtime" or module.startswith("medgemma_triton.runtime."):
        return 1
    if module.startswith("model_repository.") or any(module == m or module.startswith(f"{m}.") for m in MODEL_PROCESS):
        return 2
    return 3


def modules() -> dict[str, Path]:
    found = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in directory.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(directory).with_suffix("").parts)
            found[".".join([package, *parts[:-1]] + ([] if parts[-1] == "__init__" else parts[-1:]))] = path
    for repository in ("model_repository", "gpu_model_repository"):
        for path in (ROOT / repository).glob("*/1/model.py"):
            found[f"model_repository.{repository}.{path.parts[-3]}"] = path
    return found


def imported(module: str, path: Path) -> set[str]:
    """Our modules that `path` imports, by their full names (`from medgemma_triton import contract` names
    medgemma_triton.contract)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names} & modules_cache().keys()
            names.update(submodules or {base})  # `from package import module` imports the module
    known = modules_cache()
    return {name for name in names if name in known}


_MODULES: dict[str, Path] = {}


def modules_cache() -> dict[str, Path]:
    if not _MODULES:
        _MODULES.update(modules())
    return _MODULES


def test_no_import_runs_from_an_inner_layer_to_an_outer_one():
    wrong = []
    for module, path in sorted(modules_cache().items()):
        for target in sorted(imported(module, path)):
            if layer(target) > layer(module):
                wrong.append(f"{path.relative_to(ROOT)}: {module} ({LAYER_NAMES[layer(module)]}) imports {target} "
                             f"({LAYER_NAMES[layer(target)]})")
    assert not wrong, "imports from an inner layer to an outer one:\n" + "\n".join(wrong)


@pytest.mark.parametrize(("module", "target"), [
    ("medgemma_triton.runtime.decoder", "medgemma_triton.serving.engine"),
    ("medgemma_triton.serving.engine", "medgemma_triton.repository.cpu"),
    ("medgemma_triton.serving.pipeline", "medgemma_triton.bench.metrics"),
    ("model_repository.model_repository.llm", "medgemma_triton.cli"),
])
def test_the_rule_catches_an_inward_import(module, target):
    """The check is not vacuous: each of these imports, if written, would break it."""
    assert target in modules_cache() and module in modules_cache()
    assert layer(target) > layer(module)


def test_serving_holds_only_what_runs_in_model_processes():
    """Every module under serving/ is imported, directly or through others, by a repository's model.py
    (or is the synthetic repository's model.py itself): build-time and launcher code lives elsewhere."""
    known = modules_cache()
    roots = [name for name in known if name.startswith("model_repository.")] + ["medgemma_triton.serving.synthetic_model"]
    reached, pending = set(), list(roots)
    while pending:
        module = pending.pop()
        if module not in reached:
            reached.add(module)
            pending.extend(imported(module, known[module]))
    serving = {name for name in known if name.startswith("medgemma_triton.serving.")}
    assert serving and not serving - reached, f"serving/ modules no model process imports: {sorted(serving - reached)}"
