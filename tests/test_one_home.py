"""One home per fact.

- Each internal tensor name is stated once, in contract.py: the code that runs in Triton's model
  processes and the repository builders name those tensors through its constants, never as a string of
  their own. (gpu/llm_engine.py is left out: its "input_ids" keys are TensorRT-LLM's own.)
- Each medgemma and llm parameter's default is stated once, in serving/parameters.py (MedgemmaParameters,
  LlmParameters): no function default, dataclass field, `int_parameter(..., "name", default)` or
  `.get("name") or default` restates it, and the config.pbtxt templates leave it empty for the build to
  fill in.
"""

from __future__ import annotations

import ast
from pathlib import Path

from medgemma_triton import contract
from medgemma_triton.serving.parameters import LlmParameters, MedgemmaParameters

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / "medgemma_triton" / "contract.py"
SETTINGS_HOME = ROOT / "medgemma_triton" / "serving" / "parameters.py"
# intra_op_threads is left out: the vision encoder has a parameter of that name too, with its own default
LLM_PARAMETERS = set(vars(LlmParameters())) - {"intra_op_threads"}
PARAMETERS = LLM_PARAMETERS | set(vars(MedgemmaParameters()))
INTERNAL_NAMES = {
    contract.INPUT_IDS, contract.VISION_INPUT, contract.VISION_OUTPUT, contract.PIXELS_INPUT,
    contract.IMAGE_OFFSET_INPUT, contract.TIMEOUT_INPUT, contract.LLM_POLL_INPUT, contract.LLM_STOP_REASON_INPUT,
}


def checked_files() -> list[Path]:
    files = [*(ROOT / "medgemma_triton" / "serving").glob("*.py"), *(ROOT / "medgemma_triton" / "repository").glob("*.py"),
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


def restated_defaults(path: Path, names: set[str]) -> list[str]:
    """Places in `path` that give one of `names` a literal default of their own."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + node.args.kw_defaults
            hits += [f"{arg.arg} = {ast.unparse(d)} (line {node.lineno})" for arg, d in zip(args, defaults)
                     if arg.arg in names and isinstance(d, ast.Constant)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in names \
                and isinstance(node.value, ast.Constant):
            hits.append(f"{node.target.id}: ... = {ast.unparse(node.value)} (line {node.lineno})")
        elif isinstance(node, ast.Call) and len(node.args) >= 3 and isinstance(node.args[1], ast.Constant) \
                and node.args[1].value in names and isinstance(node.args[2], ast.Constant):
            hits.append(f"{ast.unparse(node)} (line {node.lineno})")
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or) and isinstance(node.values[-1], ast.Constant) \
                and any(isinstance(v, ast.Call) and any(isinstance(a, ast.Constant) and a.value in names for a in v.args)
                        for v in node.values[:-1]):
            hits.append(f"{ast.unparse(node)} (line {node.lineno})")
    return hits


def test_parameter_defaults_are_stated_only_in_serving_parameters():
    files = [*checked_files(), ROOT / "medgemma_triton" / "bench" / "overhead.py", ROOT / "medgemma_triton" / "cli.py",
             ROOT / "medgemma_triton" / "runtime" / "llamacpp.py"]
    # the synthetic deployment's model is another model, with settings of its own (SyntheticSettings)
    synthetic = ROOT / "medgemma_triton" / "serving" / "synthetic.py"
    elsewhere = [f"{path.relative_to(ROOT)}: {hit}" for path in sorted(set(files)) if path not in (SETTINGS_HOME, synthetic)
                 for hit in restated_defaults(path, PARAMETERS)]
    assert not elsewhere, "parameter defaults stated outside serving/parameters.py:\n" + "\n".join(elsewhere)
    from medgemma_triton.repository.config import read_config

    for model, parameters in ((contract.LLM_MODEL, LlmParameters()), (contract.TOP_MODEL, MedgemmaParameters())):
        template = read_config(ROOT / "model_repository" / model / "config.pbtxt")
        every = set(vars(parameters))
        assert {k: template.parameters[k].string_value for k in every} == dict.fromkeys(every, ""), model
    # Triton needs a number in vision_encoder's template; the builder always replaces it with the setting
    vision = read_config(ROOT / "model_repository" / contract.VISION_ENCODER_MODEL / "config.pbtxt")
    assert vision.max_batch_size == MedgemmaParameters.vision_max_batch_size


def test_the_check_sees_a_restated_default(tmp_path):
    model = tmp_path / "model.py"
    model.write_text("def f(stream_interval=1, other=2): pass\nx = int_parameter(p, 'max_active_requests', 16)\n"
                     "y = p.get('kv_cache_tokens') or 32768\nz = int_parameter(p, 'unrelated', 3)\n")
    hits = restated_defaults(model, LLM_PARAMETERS)
    assert len(hits) == 3 and not any("unrelated" in h or "other" in h for h in hits), hits
