"""`export_onnx`: manifest, cache, errors, atomicity; and the full-size vision encoder dry run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from medgemma_triton.export.atomic import OutputError
from medgemma_triton.export.manifest import checkpoint_sha256, exporter_version
from medgemma_triton.runtime.host_check import CHECK_DATA, CHECK_MODEL
from medgemma_triton.export.onnx_export import export_onnx
from medgemma_triton.spec import CheckpointError, ModelSpec

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPECTED_FILES = {"vision_encoder.onnx", "vision_encoder.ort.onnx", "vision_encoder.onnx.data", "decoder.onnx", "decoder.onnx.data"}


def _quiet(message):  # progress sink
    pass


@pytest.fixture(scope="module")
def fresh_tiny_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """An export made by this code (the session cache may hold one from an older exporter)."""
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("export") / "tiny-fp32", progress=_quiet)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.mark.slow  # a fresh export of its own
def test_manifest_describes_the_export(fresh_tiny_export, tiny_checkpoint):
    manifest = json.loads((fresh_tiny_export / "manifest.json").read_text())
    spec = ModelSpec.from_checkpoint(tiny_checkpoint)
    assert manifest["precision"] == "fp32"
    assert manifest["opset"] == 20
    assert manifest["exporter_version"] == exporter_version()
    assert manifest["source_checkpoint"]["sha256"] == checkpoint_sha256(tiny_checkpoint, _quiet)
    assert manifest["spec"] == json.loads(json.dumps(spec.to_dict()))
    for package in ("torch", "transformers", "onnx", "onnxruntime"):
        assert manifest["versions"][package], package
    assert manifest["versions"]["transformers"] == "5.23.0"
    assert set(manifest["files"]) == EXPECTED_FILES
    for name, info in manifest["files"].items():
        assert (fresh_tiny_export / name).stat().st_size == info["bytes"] > 0
    assert not _leftovers(fresh_tiny_export.parent)


@pytest.mark.slow  # a fresh export of its own
def test_second_export_is_a_cache_hit(fresh_tiny_export, tiny_checkpoint, monkeypatch):
    import medgemma_triton.export.decoder as decoder

    def no_export(*args, **kwargs):
        raise AssertionError("re-exported although the output was up to date")

    monkeypatch.setattr(decoder, "export_decoder", no_export)
    # unchanged checkpoint files (sizes, mtimes): the recorded hash is reused, nothing is re-read
    import medgemma_triton.export.manifest as manifest_module

    monkeypatch.setattr(manifest_module, "checkpoint_sha256", lambda *a: pytest.fail("re-hashed the checkpoint"))
    before = (fresh_tiny_export / "manifest.json").stat().st_mtime_ns
    files = {p.name: p.stat().st_mtime_ns for p in fresh_tiny_export.iterdir()}
    assert export_onnx(tiny_checkpoint, fresh_tiny_export, progress=_quiet) == fresh_tiny_export
    assert (fresh_tiny_export / "manifest.json").stat().st_mtime_ns == before
    assert {p.name: p.stat().st_mtime_ns for p in fresh_tiny_export.iterdir()} == files  # nothing rewritten
    monkeypatch.undo()
    monkeypatch.setattr(decoder, "export_decoder", no_export)
    # another precision, or force, is not a hit
    with pytest.raises(AssertionError, match="re-exported"):
        export_onnx(tiny_checkpoint, fresh_tiny_export, force=True, progress=_quiet)
    with pytest.raises(AssertionError, match="re-exported"):
        export_onnx(tiny_checkpoint, fresh_tiny_export, precision="int4", progress=_quiet)
    # the failed re-exports left the good export in place
    assert set(json.loads((fresh_tiny_export / "manifest.json").read_text())["files"]) == EXPECTED_FILES
    assert not _leftovers(fresh_tiny_export.parent)


@pytest.mark.slow  # a fresh export of its own
def test_a_quantized_export_reuses_an_up_to_date_fp32_export(fresh_tiny_export, tiny_checkpoint, tmp_path,
                                                              monkeypatch):
    import medgemma_triton.export.decoder as decoder
    import medgemma_triton.export.vision as vision

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the fp32 export was reusable")

    monkeypatch.setattr(decoder, "export_decoder", no_export)
    monkeypatch.setattr(vision, "export_vision_encoder", no_export)
    out = export_onnx(tiny_checkpoint, tmp_path / "int8", precision="int8", progress=_quiet,
                      fp32_source=fresh_tiny_export)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["fp32_source"] == str(fresh_tiny_export.absolute())
    assert set(manifest["files"]) == EXPECTED_FILES | {CHECK_MODEL, CHECK_DATA}  # + the host check
    for name in ("vision_encoder.onnx", "vision_encoder.onnx.data", "vision_encoder.ort.onnx"):
        assert (out / name).read_bytes() == (fresh_tiny_export / name).read_bytes()
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    assert "DynamicQuantizeMatMul" in {node.op_type for node in graph.node}
    assert not _leftovers(tmp_path)

    # a source that is not up to date (here: damaged) is ignored, and the export runs in full
    damaged = tmp_path / "damaged"
    shutil.copytree(fresh_tiny_export, damaged)
    (damaged / "decoder.onnx.data").write_bytes(b"")
    with pytest.raises(AssertionError, match="exported again"):
        export_onnx(tiny_checkpoint, tmp_path / "int8-b", precision="int8", progress=_quiet, fp32_source=damaged)


@pytest.mark.slow  # a fresh export of its own
def test_a_damaged_export_is_not_a_cache_hit(fresh_tiny_export, tmp_path):
    from medgemma_triton.export.manifest import is_up_to_date

    damaged = tmp_path / "damaged"
    shutil.copytree(fresh_tiny_export, damaged)
    manifest = json.loads((damaged / "manifest.json").read_text())
    key = dict(checkpoint_hash=manifest["source_checkpoint"]["sha256"], precision="fp32",
               exporter=manifest["exporter_version"])
    assert is_up_to_date(damaged, **key)
    with open(damaged / "decoder.onnx.data", "r+b") as f:
        f.truncate(100)
    assert not is_up_to_date(damaged, **key)
    assert not is_up_to_date(fresh_tiny_export, **{**key, "checkpoint_hash": "0" * 64})


@pytest.mark.slow  # a fresh export of its own
def test_interrupted_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    import medgemma_triton.export.decoder as decoder

    def interrupted(checkpoint, spec, out_dir, progress=print):
        assert (Path(out_dir) / "vision_encoder.onnx").is_file()  # midway: the vision encoder is written
        raise KeyboardInterrupt

    monkeypatch.setattr(decoder, "export_decoder", interrupted)
    output = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_checkpoint, output, progress=_quiet)
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


def _copy_checkpoint(source: Path, target: Path, skip=()) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.name not in skip:
            os.symlink(path, target / path.name)
    return target


def test_non_gemma3_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    checkpoint = _copy_checkpoint(tiny_checkpoint, tmp_path / "llama", skip={"config.json"})
    (checkpoint / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM.*not supported"):
        export_onnx(checkpoint, tmp_path / "out", progress=_quiet)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "missing, message",
    [("model.safetensors", "no \\*.safetensors"), ("tokenizer.json", "missing tokenizer.json"),
     ("config.json", "missing config.json")],
)
def test_checkpoint_with_missing_files_is_refused(tiny_checkpoint, tmp_path, missing, message):
    checkpoint = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt", skip={missing})
    with pytest.raises(CheckpointError, match=message):
        export_onnx(checkpoint, tmp_path / "out", progress=_quiet)
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_vision_weights_is_refused(tiny_checkpoint, tmp_path):
    import torch
    from safetensors.torch import save_file

    checkpoint = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt", skip={"model.safetensors"})
    save_file({"model.language_model.norm.weight": torch.zeros(64)}, str(checkpoint / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lack .* vision_tower tensors"):
        export_onnx(checkpoint, tmp_path / "out", progress=_quiet)
    assert list(tmp_path.iterdir()) == [checkpoint]


def test_unwritable_output_is_refused(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OutputError, match="cannot write"):
        export_onnx(tiny_checkpoint, blocker / "out", progress=_quiet)
    with pytest.raises(OutputError, match="not a directory"):
        export_onnx(tiny_checkpoint, blocker, progress=_quiet)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not an export"):
        export_onnx(tiny_checkpoint, precious, progress=_quiet)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_unknown_precision_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="precision 'fp16' is not supported"):
        export_onnx(tiny_checkpoint, tmp_path / "out", precision="fp16", progress=_quiet)


@pytest.mark.timeout(420)
@pytest.mark.fullsize
def test_full_size_vision_encoder_dry_run(tmp_path):
    """The real 4B vision geometry: all 27 layers exported (time, size, memory); numerics at full
    resolution (4096 patches, 16 heads, pooling 4x4, projection to 2560) on a 2-layer tower, since one
    27-layer image takes ~50-60 s in ONNX Runtime here (benchmarks/studies/vision_fullsize.py runs it)."""
    script = REPO_ROOT / "benchmarks" / "studies" / "vision_fullsize.py"

    def run(*args) -> dict:
        output = tmp_path / f"result{len(list(tmp_path.glob('result*')))}.json"
        subprocess.run([sys.executable, str(script), *args, "--output", str(output)], check=True,
                       stdout=subprocess.DEVNULL, timeout=400)
        return json.loads(output.read_text())

    full = run("--no-check")
    assert full["parameters"] > 400e6
    assert 1.6e9 < full["total_bytes"] < 1.8e9  # ~1.68 GB of fp32 weights in vision_encoder.onnx.data
    assert full["files_bytes"]["vision_encoder.onnx"] < 10e6  # the graph itself holds no weights
    assert full["peak_rss_gib"] < 12
    quick = run("--layers", "2")
    assert quick["output_shape"] == [1, 256, 2560]
    assert quick["max_abs_diff"] <= 1e-4 < quick["max_abs_reference"]


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantizing_an_fp32_decoder_that_a_repository_links_to(tiny_onnx, tmp_path, precision):
    """A model repository hard-links the fp32 export's files, and onnx (1.23) refuses to read external
    data with more than one link. On the tiny model every external tensor is a quantized weight, so the
    source is re-saved with all tensors external, as the 4B export keeps its norm weights."""
    from medgemma_triton.export.int4 import quantize_decoder_int4
    from medgemma_triton.export.int8 import quantize_decoder_int8

    quantize = {"int4": quantize_decoder_int4, "int8": quantize_decoder_int8}[precision]
    unlinked = tmp_path / "unlinked"
    unlinked.mkdir()
    for name in ("decoder.onnx", "decoder.onnx.data"):
        shutil.copy(tiny_onnx / name, unlinked / name)  # a copy has one link, whatever links the cache has
    source = tmp_path / "fp32"
    source.mkdir()
    onnx.save_model(onnx.load(str(unlinked / "decoder.onnx")), str(source / "decoder.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="decoder.onnx.data",
                    size_threshold=0)
    graph = onnx.load(str(source / "decoder.onnx"), load_external_data=False).graph
    assert any(len(t.dims) == 1 and t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    (tmp_path / "repository").mkdir()
    os.link(source / "decoder.onnx.data", tmp_path / "repository" / "decoder.onnx.data")
    assert (source / "decoder.onnx.data").stat().st_nlink == 2

    linked_out = quantize(source / "decoder.onnx", tmp_path / "from-linked" / "decoder.onnx", progress=_quiet)
    reference = quantize(unlinked / "decoder.onnx", tmp_path / "from-unlinked" / "decoder.onnx", progress=_quiet)
    from onnx import numpy_helper

    linked_model, reference_model = onnx.load(str(linked_out)), onnx.load(str(reference))
    assert [(n.op_type, n.input, n.output) for n in linked_model.graph.node] == [
        (n.op_type, n.input, n.output) for n in reference_model.graph.node]
    reference_weights = {t.name: numpy_helper.to_array(t) for t in reference_model.graph.initializer}
    linked_weights = {t.name: numpy_helper.to_array(t) for t in linked_model.graph.initializer}
    assert linked_weights.keys() == reference_weights.keys()
    for name, values in reference_weights.items():
        np.testing.assert_array_equal(linked_weights[name], values, err_msg=name)
