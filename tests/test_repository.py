"""Model repository templates and the generated repository: Triton's schema, the contract, the wiring."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from medgemma_triton import contract
from medgemma_triton.repository import build_repository
from medgemma_triton.repository.config import ALL_MODELS, RepositoryError, load_configs, read_config, validate_configs
from medgemma_triton.serving.parameters import LlmParameters
from medgemma_triton.repository.cpu import TEMPLATES, validate_repository
from medgemma_triton.repository.templates import template_dir
from medgemma_triton.spec import ModelSpec

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_templates_are_valid_triton_configs():
    configs = validate_repository(TEMPLATES)
    assert sorted(configs) == sorted(ALL_MODELS)
    for name in ALL_MODELS:
        assert (TEMPLATES / name / "1" / "model.py").is_file()


def test_top_model_serves_the_contract():
    config = read_config(TEMPLATES / contract.TOP_MODEL / "config.pbtxt")
    inputs = [(t.name, mc.DataType.Name(t.data_type), tuple(t.dims), t.optional) for t in config.input]
    outputs = [(t.name, mc.DataType.Name(t.data_type), tuple(t.dims)) for t in config.output]
    assert inputs == [(t.name, f"TYPE_{t.triton_dtype}", t.dims, t.optional) for t in contract.TOP_INPUTS]
    assert outputs == [(t.name, f"TYPE_{t.triton_dtype}", t.dims) for t in contract.TOP_OUTPUTS]
    assert config.model_transaction_policy.decoupled


def test_every_contract_output_is_produced():
    assert set(contract.TO_CLIENT) == {t.name for t in contract.TOP_OUTPUTS}
    consumed = set(contract.PREPROCESSING_INPUTS) | set(contract.LLM_REQUEST_INPUTS) | set(contract.READ_HERE)
    assert consumed == {t.name for t in contract.TOP_INPUTS}


def _input(config, name):
    return next(t for t in config.input if t.name == name)


def _break(configs, model, edit):
    edit(configs[model])
    with pytest.raises(RepositoryError) as info:
        validate_configs(configs)
    return str(info.value)


@pytest.mark.parametrize(
    "model, edit, words",
    [
        (contract.LLM_MODEL, lambda c: c.output.remove(next(t for t in c.output if t.name == "output_ids")), "output_ids"),
        (contract.LLM_MODEL, lambda c: setattr(_input(c, "image_embeddings"), "data_type", mc.TYPE_FP16), "image_embeddings"),
        (contract.LLM_MODEL, lambda c: c.input.add(name="pixel_values", data_type=mc.TYPE_FP32, dims=[-1, 3, 896, 896]), "pixel_values"),
        (contract.LLM_MODEL, lambda c: c.input.remove(_input(c, "stop_reason")), "stop_reason"),
        (contract.LLM_MODEL, lambda c: _input(c, "image_embeddings").dims.__setitem__(2, 7), "image_embeddings rows"),
        (contract.PREPROCESSING_MODEL, lambda c: c.input.remove(next(t for t in c.input if t.name == "images")), "images"),
        (contract.LLM_MODEL, lambda c: setattr(c.model_transaction_policy, "decoupled", False), "decoupled"),
        (contract.LLM_MODEL, lambda c: c.input.remove(next(t for t in c.input if t.name == "stop")), "stop"),
        (contract.VISION_ENCODER_MODEL, lambda c: c.ClearField("dynamic_batching"), "dynamic_batching"),
        (contract.VISION_ENCODER_MODEL, lambda c: setattr(c, "max_batch_size", 0), "max_batch_size"),
        (contract.TOP_MODEL, lambda c: setattr(c.output[0], "data_type", mc.TYPE_INT32), "text_output"),
        (contract.TOP_MODEL, lambda c: setattr(c.input[0], "optional", False), "text_input"),
        (contract.LLM_MODEL, lambda c: setattr(c, "name", "decoder"), "name"),
    ],
)
def test_wiring_errors_are_caught(model, edit, words):
    message = _break(load_configs(TEMPLATES), model, edit)
    assert words in message


def test_unparsable_config_names_the_file(tmp_path):
    shutil.copytree(TEMPLATES, tmp_path / "repo")
    path = tmp_path / "repo" / "llm" / "config.pbtxt"
    path.write_text(path.read_text().replace("decoupled: true", "decoupled: yes please"))
    with pytest.raises(RepositoryError, match="llm/config.pbtxt"):
        validate_repository(tmp_path / "repo")


def test_gpu_profile_needs_nvidias_container(tiny_checkpoint, tmp_path):
    """`build --profile gpu` dispatches to the gpu builder, which refuses at once without TensorRT(-LLM)."""
    from medgemma_triton.repository.gpu import ToolchainMissing

    with pytest.raises(ToolchainMissing, match="tensorrt.*tritonserver:.*trtllm"):
        build_repository(tiny_checkpoint, tmp_path / "repo", profile="gpu", precision="fp8")
    assert not (tmp_path / "repo").exists()
    with pytest.raises(ValueError, match="precision"):
        build_repository(tiny_checkpoint, tmp_path / "repo", precision="fp8")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "module, blocked",
    [
        ("medgemma_triton.repository.cpu", "medgemma_triton.repository.gpu"),
        ("medgemma_triton.repository.gpu", "medgemma_triton.repository.cpu"),
    ],
)
def test_profile_builders_do_not_import_each_other(module, blocked):
    """Each builder imports, and builds its configs, with the other one unimportable: they share
    only medgemma_triton.repository.config, and medgemma_triton.repository dispatches between them."""
    code = (
        "import sys\n"
        f"sys.modules[{blocked!r}] = None\n"  # importing it now raises ImportError
        f"import {module}\n"
        "from medgemma_triton.repository.config import load_configs, validate_configs\n"
        f"validate_configs(load_configs({str(TEMPLATES)!r}))\n"
        f"assert sys.modules[{blocked!r}] is None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or lazily inside a function."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # from package import module
    return names


def test_profile_builders_do_not_name_each_other():
    cpu = _imported_modules(REPO_ROOT / "medgemma_triton" / "repository" / "cpu.py")
    gpu = _imported_modules(REPO_ROOT / "medgemma_triton" / "repository" / "gpu.py")
    assert "medgemma_triton.repository.config" in cpu & gpu
    assert not {"medgemma_triton.repository.gpu", "medgemma_triton.repository"} & cpu
    assert not {"medgemma_triton.repository.cpu", "medgemma_triton.repository"} & gpu


def test_built_repository_matches_the_spec(tiny_repository, tiny_checkpoint, tiny_onnx):
    spec = ModelSpec.from_checkpoint(tiny_checkpoint)
    configs = validate_repository(tiny_repository)
    size = spec.vision.image_size

    def dims(model, name, output=False):
        tensors = configs[model].output if output else configs[model].input
        return tuple(next(t for t in tensors if t.name == name).dims)

    assert dims("preprocessing", "pixel_values", output=True) == (-1, 3, size, size)
    assert "pixel_values" not in [t.name for t in configs["llm"].input]  # pixels stop at vision_encoder
    assert dims("llm", "image_embeddings") == (-1, spec.mm_tokens_per_image, spec.text.hidden_size)
    assert dims("vision_encoder", "pixel_values") == (3, size, size)
    assert dims("vision_encoder", "image_embeddings", output=True) == (spec.mm_tokens_per_image, spec.text.hidden_size)
    # self-contained: every path is relative to the model's version directory, every file is there
    for name in ("preprocessing", "vision_encoder", "llm", "medgemma"):
        assert configs[name].parameters["checkpoint"].string_value == "checkpoint"
        for file in ("config.json", "tokenizer.json", "processor_config.json"):
            assert (tiny_repository / name / "1" / "checkpoint" / file).is_file()
        assert not list((tiny_repository / name / "1" / "checkpoint").glob("*.safetensors"))  # no weights
    assert configs["llm"].parameters["onnx_model"].string_value == "decoder.onnx"
    assert configs["llm"].parameters["source_checkpoint"].string_value == str(tiny_checkpoint.absolute())
    assert configs["vision_encoder"].parameters["onnx_model"].string_value == "vision_encoder.ort.onnx"
    for model, file in (("llm", "decoder.onnx"), ("llm", "manifest.json"), ("vision_encoder", "vision_encoder.ort.onnx")):
        placed, exported = tiny_repository / model / "1" / file, tiny_onnx / file
        assert placed.is_file() and placed.read_bytes() == exported.read_bytes()
    # hard links where the filesystem allows: the decoder's weights are not copied
    assert (tiny_repository / "llm" / "1" / "decoder.onnx").stat().st_ino == (tiny_onnx / "decoder.onnx").stat().st_ino
    assert configs["medgemma"].parameters["vision_max_batch_size"].string_value == str(configs["vision_encoder"].max_batch_size)
    # the llm's parameters, filled in by the build: their defaults unless built otherwise
    assert {k: configs["llm"].parameters[k].string_value for k in vars(LlmParameters())} == {
        k: str(v) for k, v in vars(LlmParameters()).items()}
    # what is served, for benchmark reports: from the export's manifest
    manifest = json.loads((tiny_onnx / "manifest.json").read_text())
    served = {k: configs["llm"].parameters[k].string_value for k in ("profile", "precision", "checkpoint_sha256")}
    assert served == {"profile": "cpu", "precision": "fp32", "checkpoint_sha256": manifest["source_checkpoint"]["sha256"]}
    # what was written reads back through Triton's schema
    for name in ALL_MODELS:
        text_format.Parse((tiny_repository / name / "config.pbtxt").read_text(), mc.ModelConfig())


def test_stream_interval_is_checked_when_building(tmp_path):
    from medgemma_triton.cli import main
    from medgemma_triton.repository.cpu import CpuSettings

    with pytest.raises(ValueError, match="stream_interval must be >= 1"):
        CpuSettings(stream_interval=0)
    where = ["--checkpoint", str(tmp_path), "--output", str(tmp_path / "r")]
    with pytest.raises(SystemExit):  # argparse: "--stream-interval: must be >= 1, got 0"
        main(["build", "cpu", *where, "--stream-interval", "0"])
    with pytest.raises(SystemExit):  # argparse: the gpu profile has no such setting
        main(["build", "gpu", *where, "--stream-interval", "2"])


def test_the_old_build_spelling_still_builds_and_names_the_new_one(tmp_path, capsys):
    """`build --profile P ...` and `build ...` (cpu) are read as `build P ...`, with a note on stderr."""
    from medgemma_triton.cli import _legacy_build, main

    assert _legacy_build(["build", "--checkpoint", "C", "--output", "O"]) == ["build", "cpu", "--checkpoint", "C", "--output", "O"]
    assert _legacy_build(["build", "--profile=gpu", "--output", "O"]) == ["build", "gpu", "--output", "O"]
    assert _legacy_build(["build", "--output", "O", "--profile", "synthetic", "--synthetic-tokens-per-second", "5"]) == [
        "build", "synthetic", "--output", "O", "--tokens-per-second", "5"]
    assert _legacy_build(["build", "cpu", "--output", "O"]) == ["build", "cpu", "--output", "O"]
    assert "is now `medgemma-triton build synthetic`" in capsys.readouterr().err
    assert main(["build", "--profile", "synthetic", "--output", str(tmp_path / "r"), "--synthetic-tokens-per-second", "5"]) == 0
    assert (tmp_path / "r" / "medgemma" / "config.pbtxt").is_file()


def test_wheel_ships_the_templates(tmp_path):
    """A non-editable install builds repositories: the templates are package data, and found there;
    so is the 4B's published config.json (medgemma_triton/data)."""
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (REPO_ROOT / name).is_file():
            shutil.copy2(REPO_ROOT / name, source / name)
    for name in ("medgemma_triton", "export", "client", "model_repository", "gpu_model_repository"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w", str(wheels)],
        check=True, cwd=source, capture_output=True,
    )
    (wheel,) = wheels.glob("*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    for name in ("model_repository", "gpu_model_repository"):
        templates = REPO_ROOT / name
        files = [p.relative_to(REPO_ROOT).as_posix() for p in templates.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files and not {f"medgemma_triton/{f}" for f in files} - packed, f"{name} is not in the wheel"
    assert "medgemma_triton/data/medgemma-4b-it.config.json" in packed

    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    code = (
        "from medgemma_triton.repository.cpu import TEMPLATES, validate_repository;"
        "from medgemma_triton.repository.gpu import CPU_TEMPLATES, GPU_TEMPLATES;"
        "from medgemma_triton.spec import MEDGEMMA_4B_CONFIG_FILE, medgemma_4b_config;"
        "validate_repository(TEMPLATES); medgemma_4b_config();"
        "print(TEMPLATES, CPU_TEMPLATES, GPU_TEMPLATES, MEDGEMMA_4B_CONFIG_FILE)"
    )
    env = {**os.environ, "PYTHONPATH": str(installed)}
    found = subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert found.stdout.split() == [
        str(installed / "medgemma_triton" / n) for n in ("model_repository", "model_repository", "gpu_model_repository",
                                                         "data/medgemma-4b-it.config.json")
    ]


def test_source_tree_templates_are_the_top_level_ones():
    assert TEMPLATES == REPO_ROOT / "model_repository" == template_dir("model_repository")


def _build_cli(*args) -> None:
    result = subprocess.run([sys.executable, "-m", "medgemma_triton.cli", "build", "cpu", *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _load_repository_models(repository: Path, precision: str) -> None:
    """The served ONNX files of `repository` load in ONNX Runtime, and the llm serves `precision`."""
    import onnxruntime as ort

    configs = validate_repository(repository)
    assert configs["llm"].parameters["precision"].string_value == precision
    manifest = json.loads((repository / "llm" / "1" / "manifest.json").read_text())
    assert manifest["precision"] == precision
    gguf = configs["llm"].parameters["gguf_model"].string_value
    if gguf:  # int4/int8 on llama.cpp: the GGUF its manifest names, byte for byte
        from medgemma_triton.export.llamacpp_build import file_sha256

        assert precision != "fp32" and not configs["llm"].parameters["onnx_model"].string_value
        assert file_sha256(repository / "llm" / "1" / gguf) == manifest["gguf"]["sha256"]
    for model in ("vision_encoder",) if gguf else ("llm", "vision_encoder"):
        onnx_file = repository / model / "1" / configs[model].parameters["onnx_model"].string_value
        ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])


@pytest.mark.slow
def test_builds_sharing_a_cache_work_in_any_order(tiny_checkpoint, tmp_path):
    """One --cache-dir for every build: int4 first (no fp32 export yet), then fp32, then int8 into the
    int4 build's --output and int4 in another block size, both quantized from the fp32 export that the
    fp32 repository hard-links; every repository loads, and still loads once copied away from the cache."""
    cache, a, b, c = tmp_path / "cache", tmp_path / "a", tmp_path / "b", tmp_path / "c"
    common = ["--checkpoint", str(tiny_checkpoint), "--cache-dir", str(cache)]
    _build_cli(*common, "--output", str(a), "--precision", "int4")
    _load_repository_models(a, "int4")
    _build_cli(*common, "--output", str(b), "--precision", "fp32")
    _load_repository_models(b, "fp32")
    fp32_data = b / "llm" / "1" / "decoder.onnx.data"
    assert fp32_data.stat().st_ino == (cache / "onnx-fp32" / "decoder.onnx.data").stat().st_ino  # linked, not copied
    _build_cli(*common, "--output", str(a), "--precision", "int8")
    _load_repository_models(a, "int8")
    _build_cli(*common, "--output", str(c), "--precision", "int4", "--int4-block-size", "32")
    _load_repository_models(c, "int4")
    assert json.loads((c / "llm" / "1" / "manifest.json").read_text())["fp32_source"] == str(cache / "onnx-fp32")

    moved = tmp_path / "moved"
    for repository in (a, b, c):
        shutil.copytree(repository, moved / repository.name)
    shutil.rmtree(cache)
    for repository in (a, b, c):
        shutil.rmtree(repository)
    _load_repository_models(moved / "a", "int8")
    _load_repository_models(moved / "b", "fp32")
    _load_repository_models(moved / "c", "int4")
