"""Each internal tensor name is stated once, in contract.py: the code that runs in Triton's model
processes and the repository builders name those tensors through its constants, never as a string of
their own. (gpu/llm_engine.py is left out: its "input_ids" keys are TensorRT-LLM's own.)
"""

from __future__ import annotations

import ast
from pathlib import Path

from medgemma_triton import contract

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / "medgemma_triton" / "contract.py"
INTERNAL_NAMES = {
    contract.INPUT_IDS, contract.VISION_INPUT, contract.VISION_OUTPUT, contract.PIXELS_INPUT,
    contract.IMAGE_OFFSET_INPUT, contract.TIMEOUT_INPUT, contract.LLM_POLL_INPUT, contract.LLM_STOP_REASON_INPUT,
}


def checked_files() -> list[Path]:
    files = [*(ROOT / "medgemma_triton" / "serving").glob("*.py"), ROOT / "medgemma_triton" / "repository_config.py",
             ROOT / "medgemma_triton" / "repository.py", ROOT / "medgemma_triton" / "gpu" / "repository.py",
             *(ROOT / "model_repository").glob("*/1/model.py"), *(ROOT / "gpu_model_repository").glob("*/1/model.py")]
    return sorted(files)


def stated(path: Path, names: set[str]) -> list[str]:
    """`names` written as string literals in `path` (docstrings and f-string text aside)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    in_fstrings = {id(value) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for value in node.values}
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [f"{where}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in names
            and id(node) not in docstrings and id(node) not in in_fstrings]


def test_internal_tensor_names_are_stated_only_in_the_contract():
    assert INTERNAL_NAMES <= {node.value for node in ast.walk(ast.parse(HOME.read_text())) if isinstance(node, ast.Constant)}
    elsewhere = [hit for path in checked_files() for hit in stated(path, INTERNAL_NAMES)]
    assert not elsewhere, "internal tensor names written outside contract.py:\n" + "\n".join(elsewhere)


def test_the_check_sees_a_restated_name(tmp_path):
    """Not vacuous: a model file that writes a tensor name itself is caught, a docstring mention is not."""
    model = tmp_path / "model.py"
    model.write_text('"""Reads "pixel_values"."""\nget("pixel_values")\nlog(f"no {x} image_offset")\n')
    hits = stated(model, INTERNAL_NAMES)
    assert len(hits) == 1 and "'pixel_values'" in hits[0] and ":2:" in hits[0]
