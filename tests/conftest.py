"""Session-scoped artifacts: each checkpoint, export and model repository is built once per run.

Artifacts live under $MEDGEMMA_TEST_CACHE (default: <repo>/.cache/test-artifacts) and are reused
across runs when present; CI starts from a clean clone, so it builds everything once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["serving_fixtures"]  # servers and model repositories (tests/serving_fixtures.py)

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MEDGEMMA_TEST_CACHE", REPO_ROOT / ".cache" / "test-artifacts"))


# `scripts/test.sh --quick`, the tier to run before every commit: no test marked slow (ModelOpt
# quantization, several builds) or served (tritonserver, the gateway), none that needs the real-weight
# dev checkpoint or a full-size artifact; what it runs still builds and exports the tiny model.
QUICK_SKIPS = {"dev_checkpoint", "tiny_repository", "dev_repository"}


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true",
                     help="the fast tier: skip tests marked slow and those needing dev or a served repository")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--quick"):
        return
    skip = pytest.mark.skip(reason="not in the --quick tier (slow, served, the dev checkpoint or full size)")
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_dev = callspec is not None and any(isinstance(v, str) and v == "dev" for v in callspec.params.values())
        heavy = any(item.get_closest_marker(name) for name in ("slow", "fullsize", "served"))
        if heavy or on_dev or QUICK_SKIPS & set(getattr(item, "fixturenames", ())):
            item.add_marker(skip)


def _cached(name: str, build) -> Path:
    """Build `name` under the cache once; the builder writes atomically, so a path that exists is whole."""
    path = CACHE / name
    if not path.exists():
        build(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    from medgemma_triton.export.checkpoints import build_dev_checkpoint

    return _cached("checkpoints/tiny", lambda p: build_dev_checkpoint("tiny", p))


@pytest.fixture(scope="session")
def dev_checkpoint() -> Path:
    from medgemma_triton.export.checkpoints import build_dev_checkpoint

    return _cached("checkpoints/dev", lambda p: build_dev_checkpoint("dev", p))


@pytest.fixture(scope="session", params=["tiny", "dev"])
def checkpoint(request) -> Path:
    """Both development checkpoints, for tests that must hold on each."""
    return request.getfixturevalue(f"{request.param}_checkpoint")


def _export(checkpoint: Path, name: str, precision: str) -> Path:
    from medgemma_triton.export.onnx_export import export_onnx

    # export_onnx itself returns at once when the manifest matches (checkpoint hash, precision and
    # exporter source digest), and re-exports a stale cache. A quantized export quantizes the session's
    # fp32 export (built first) instead of exporting its own.
    fp32 = export_onnx(checkpoint, CACHE / "onnx" / f"{name}-fp32") if precision != "fp32" else None
    return export_onnx(checkpoint, CACHE / "onnx" / f"{name}-{precision}", precision=precision, fp32_source=fp32)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint) -> Path:
    return _export(tiny_checkpoint, "tiny", "fp32")


@pytest.fixture(scope="session")
def dev_onnx(dev_checkpoint) -> Path:
    return _export(dev_checkpoint, "dev", "fp32")


@pytest.fixture(scope="session")
def dev_onnx_int4(dev_checkpoint) -> Path:
    return _export(dev_checkpoint, "dev", "int4")


@pytest.fixture(scope="session")
def tiny_onnx_int8(tiny_checkpoint) -> Path:
    return _export(tiny_checkpoint, "tiny", "int8")


@pytest.fixture(scope="session")
def tiny_onnx_int4(tiny_checkpoint) -> Path:
    return _export(tiny_checkpoint, "tiny", "int4")


@pytest.fixture(scope="session")
def dev_decoder_int8(dev_onnx, tmp_path_factory) -> Path:
    """The dev decoder quantized to int8 from the fp32 export, once per session (~25 s; export_onnx's
    int8 path is tested on tiny in test_export.py, so no second dev decoder export is needed)."""
    from medgemma_triton.export.int8 import quantize_decoder_int8

    out = tmp_path_factory.mktemp("dev-int8")
    quantize_decoder_int8(dev_onnx / "decoder.onnx", out / "decoder.onnx", progress=lambda _: None)
    return out


def _gguf(checkpoint: Path, name: str, precision: str) -> Path:
    """export_gguf returns at once when its manifest matches; the vision encoder comes from the fp32 export."""
    from medgemma_triton.export.gguf import export_gguf
    from medgemma_triton.export.onnx_export import export_onnx

    fp32 = export_onnx(checkpoint, CACHE / "onnx" / f"{name}-fp32")
    return export_gguf(checkpoint, CACHE / "gguf" / f"{name}-{precision}", precision, vision_source=fp32)


@pytest.fixture(scope="session")
def tiny_gguf_f32(tiny_checkpoint) -> Path:
    return _gguf(tiny_checkpoint, "tiny", "f32")


@pytest.fixture(scope="session")
def dev_gguf_f32(dev_checkpoint) -> Path:
    return _gguf(dev_checkpoint, "dev", "f32")


@pytest.fixture(scope="session")
def dev_gguf_int4(dev_checkpoint) -> Path:
    return _gguf(dev_checkpoint, "dev", "int4")


@pytest.fixture(scope="session")
def dev_gguf_int8(dev_checkpoint) -> Path:
    return _gguf(dev_checkpoint, "dev", "int8")


def quality_benchmark():
    """benchmarks/int4_quality.py as a module (the int4 and int8 quality gates run its measures)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "int4_quality.py"
    module_spec = importlib.util.spec_from_file_location("int4_quality", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def onnx_graph(path):
    """An ONNX model's graph and initializer metadata, without its external weights."""
    import onnx

    return onnx.load(str(path), load_external_data=False)
