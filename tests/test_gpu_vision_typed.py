"""The gpu profile's strongly typed vision graph (medgemma_triton/gpu/vision_typed.py) and the TensorRT build
that reads it (trt_vision.py): the typing rule, the graph's numbers against the fp32 graph on CPU (an
emulation: ONNX Runtime's CPU provider has no bf16 kernels), and negative controls that the checks fail."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest

from medgemma_triton.gpu import trt_vision, vision_typed
from medgemma_triton.spec import ModelSpec

# Emulated bf16 graph vs the fp32 graph, relative to the embeddings' magnitude (vision_typed.compare): derived
# from the tiny and dev measurements (docs/results/vision-typed-epyc-zen3/, benchmarks/studies/vision_typed.py) with
# about 2x headroom, and below what the fp8 control below reaches on both.
MAX_REL_DIFF = 0.015
MEAN_REL_DIFF = 0.015


def _fp32_graph(onnx_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the cached fp32 vision graph: the cache hard-links its .data file, which onnx refuses
    to read external data from."""
    copy = tmp_path / "fp32"
    copy.mkdir()
    for name in ("vision_encoder.onnx", "vision_encoder.onnx.data"):
        shutil.copyfile(onnx_dir / name, copy / name)
    return copy / "vision_encoder.onnx"


@pytest.fixture(scope="module", params=["tiny", "dev"])
def typed(request, tmp_path_factory):
    """(spec, fp32 graph, typed bf16 graph) per checkpoint."""
    checkpoint = request.getfixturevalue(f"{request.param}_checkpoint")
    onnx_dir = request.getfixturevalue(f"{request.param}_onnx")
    tmp_path = tmp_path_factory.mktemp(f"typed-{request.param}")
    fp32 = _fp32_graph(onnx_dir, tmp_path)
    return ModelSpec.from_checkpoint(checkpoint), fp32, vision_typed.type_vision_graph(fp32, tmp_path, log=lambda _: None)


def _pixels(spec, batch=2, seed=0):
    size = spec.vision.image_size
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (batch, 3, size, size)).astype(np.float32)


def _fp32_embeddings(fp32: Path, pixel_values):
    import onnxruntime as ort

    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": pixel_values})[0]


def test_typed_graph_follows_the_rule(typed):
    import onnx

    spec, _, path = typed
    model = onnx.load(str(path), load_external_data=False)
    assert vision_typed.check_types(model) == []
    types = vision_typed.compute_types(model)
    ops = {node.name: node.op_type for node in model.graph.node}
    by_op = {}
    for name, dtype in types.items():
        by_op.setdefault(ops[name], set()).add(dtype)
    layers = spec.vision.num_layers
    assert sum(op == "LayerNormalization" for op in ops.values()) == 2 * layers + 1  # 2 per layer + post_layernorm
    assert by_op["LayerNormalization"] == by_op["Softmax"] == by_op["ReduceMean"] == by_op["AveragePool"] == {"fp32"}
    assert by_op["MatMul"] == by_op["Conv"] == by_op["Gelu"] == {"bf16"}
    # the projector's RMSNorm (x * rsqrt(mean(x^2) + eps) * (1 + w)) is fp32 from pooling to the projection
    norm = vision_typed.projector_norm_nodes(model)
    assert {ops[name] for name in norm} >= {"AveragePool", "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Mul"}
    assert {types[name] for name in norm if name in types} == {"fp32"}
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [1, 1]  # fp32


def test_layernorm_in_bf16_breaks_the_rule(typed):
    """Negative control: AutoCast asked to leave LayerNormalization in bf16; check_types names every LayerNorm."""
    _, fp32, _ = typed
    import onnx

    structure = onnx.load(str(fp32), load_external_data=False)
    loose = tuple(t for t in vision_typed.FP32_OP_TYPES if t != "LayerNormalization")
    model = vision_typed.autocast(fp32, "bf16", loose, vision_typed.projector_norm_nodes(structure))
    violations = vision_typed.check_types(model)
    norms = [n.name for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(violations) == len(norms) > 0
    assert all("LayerNormalization" in v and "computes in bf16, not fp32" in v for v in violations)


def test_typed_graph_matches_the_fp32_graph(typed):
    spec, fp32, path = typed
    pixel_values = _pixels(spec)
    reference = _fp32_embeddings(fp32, pixel_values)
    emulated = vision_typed.emulated_session(path).run(None, {"pixel_values": pixel_values})[0]
    assert emulated.shape == reference.shape == (2, spec.mm_tokens_per_image, spec.text.hidden_size)
    assert np.abs(reference).max() > 0.1, "reference embeddings are ~0: the projector was not randomised"
    diff = vision_typed.compare(reference, emulated)
    assert diff["max_abs_diff"] > 0  # the rounding is really there: an fp32 graph would be ~1e-6 away
    assert diff["max_rel_diff"] <= MAX_REL_DIFF and diff["mean_rel_diff"] <= MEAN_REL_DIFF, diff


def test_the_rule_applied_to_the_fp32_graph_computes_what_the_typed_graph_computes(typed):
    """emulate_rule_on_cpu (what benchmarks/studies/vision_typed.py runs at the 4B size, where AutoCast does not fit in
    memory) against the emulated AutoCast graph: the same numbers, bit for bit."""
    spec, fp32, path = typed
    pixel_values = _pixels(spec, seed=1)
    from_typed = vision_typed.emulated_session(path).run(None, {"pixel_values": pixel_values})[0]
    from_rule = vision_typed.rule_emulated_session(fp32, path.parent / "rule").run(None, {"pixel_values": pixel_values})[0]
    assert np.array_equal(from_typed, from_rule)
    assert np.abs(from_typed - _fp32_embeddings(fp32, pixel_values)).max() > 0  # both really round


def test_a_wrong_cast_fails_the_numeric_check(typed, tmp_path):
    """Negative control: the typed graph with the projector's normalised output squeezed through fp8 (e4m3)
    before its bf16 cast, a precision the rule never allows."""
    import onnx
    from onnx import TensorProto, helper

    spec, fp32, path = typed
    model = onnx.load(str(path))
    final = [n for n in model.graph.node if n.op_type == "MatMul"][-1]  # the projection to the text hidden size
    cast = next(n for n in model.graph.node if final.input[0] in n.output)
    assert cast.op_type == "Cast"  # fp32 RMSNorm output -> bf16 projection
    squeezed, widened = cast.input[0] + "_fp8", cast.input[0] + "_fp8_fp32"
    index = list(model.graph.node).index(cast)
    model.graph.node.insert(index, helper.make_node("Cast", [squeezed], [widened], to=TensorProto.FLOAT, name="widen"))
    model.graph.node.insert(index, helper.make_node("Cast", [cast.input[0]], [squeezed], to=TensorProto.FLOAT8E4M3FN,
                                                    name="wrong_cast"))
    cast.input[0] = widened
    wrong = tmp_path / "wrong.onnx"
    onnx.save(model, str(wrong), save_as_external_data=True, location="wrong.onnx.data")

    pixel_values = _pixels(spec)
    reference = _fp32_embeddings(fp32, pixel_values)
    emulated = vision_typed.emulated_session(wrong).run(None, {"pixel_values": pixel_values})[0]
    diff = vision_typed.compare(reference, emulated)
    assert diff["max_rel_diff"] > MAX_REL_DIFF and diff["mean_rel_diff"] > MEAN_REL_DIFF, diff


def test_fp16_graph_follows_the_rule_and_is_closer_than_bf16(tiny_spec, tiny_onnx, tmp_path):
    """fp16 (GPUs without bf16) keeps 3 more mantissa bits than bf16: on tiny's small activations its
    emulated error must be below the bf16 graph's; an emulation that rounded both alike would fail here."""
    import onnx

    fp32 = _fp32_graph(tiny_onnx, tmp_path)
    pixel_values = _pixels(tiny_spec)
    reference = _fp32_embeddings(fp32, pixel_values)
    diffs = {}
    for precision in ("fp16", "bf16"):
        path = vision_typed.type_vision_graph(fp32, tmp_path / precision, precision, log=lambda _: None)
        assert vision_typed.check_types(onnx.load(str(path), load_external_data=False), precision) == []
        emulated = vision_typed.emulated_session(path, precision).run(None, {"pixel_values": pixel_values})[0]
        diffs[precision] = vision_typed.compare(reference, emulated)
    assert 0 < diffs["fp16"]["max_abs_diff"] < diffs["bf16"]["max_abs_diff"]
    assert diffs["fp16"]["mean_abs_diff"] < diffs["bf16"]["mean_abs_diff"]


def test_emulation_rounds_as_bf16_kernels_do():
    """emulate_on_cpu against numpy + ml_dtypes: a bf16 MatMul and Add read bf16 values, compute in fp32 and
    write bf16-rounded results; a bf16 Softmax's steps are each rounded."""
    import ml_dtypes
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    w = rng.standard_normal((8, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    weight = helper.make_tensor("w", TensorProto.BFLOAT16, w.shape, w.flatten().tolist())  # rounded to bf16 here
    bias = helper.make_tensor("b", TensorProto.BFLOAT16, b.shape, b.flatten().tolist())
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16, name="cast_in"),
         helper.make_node("MatMul", ["xb", "w"], ["m"], name="matmul"),
         helper.make_node("Add", ["m", "b"], ["a"], name="add"),
         helper.make_node("Softmax", ["a"], ["s"], axis=-1, name="softmax"),
         helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT, name="cast_out")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (4, 5))], [weight, bias],
    )
    typed = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    typed.ir_version = 10
    onnx.checker.check_model(typed)
    emulated = vision_typed.emulate_on_cpu(typed)
    session = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]

    def r(a):
        return np.asarray(a, np.float32).astype(bf16).astype(np.float32)

    a = r(r(r(x) @ r(w)) + r(b))
    shifted = r(a - r(a.max(-1, keepdims=True)))
    e = r(np.exp(shifted))
    expected = r(e / r(e.sum(-1, keepdims=True)))
    # one bf16 step apart at most (fp32 summation order); an fp32 softmax is further away than that
    np.testing.assert_allclose(got, expected, rtol=2 ** -8, atol=0)
    assert np.abs(got - _softmax(x @ w + b)).max() > 2 ** -8 * np.abs(expected).max()


def _softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ---- the strongly typed TensorRT build ----------------------------------------------------------


class _StandInTensorRT:
    """Stands in for the `tensorrt` module (no TensorRT on CPU machines): records what build_vision_engine asks
    of it (network creation flags, builder flags, the file parsed). `accept_cache` answers set_timing_cache."""

    float32, bfloat16 = "float32", "bfloat16"

    def __init__(self, version="10.14.1.48", accept_cache=(True,), output_dtype="float32"):
        self.__version__, self.answers = version, list(accept_cache)
        self.record = NS(flags=[], caches=[], parsed=None, network_flags=None)
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda logger, level: None})
        self.MemoryPoolType = NS(WORKSPACE="workspace")
        # kSTRONGLY_TYPED is 1 in TensorRT 10's NvInfer.h (after kEXPLICIT_BATCH); a different value stands for
        # a release that renumbered it: the builder must read the value from the module, never assume it.
        self.NetworkDefinitionCreationFlag = NS(STRONGLY_TYPED=1 if version.startswith("10.") else 0)
        trt = self

        class Network:
            num_inputs = num_outputs = 1
            num_layers = 7

            def __init__(self, plan_shape):
                self.input = NS(name="pixel_values", shape=plan_shape, dtype=trt.float32)

            def get_input(self, index):
                return self.input

            def get_output(self, index):
                return NS(name="image_embeddings", dtype=output_dtype)

        class Config:
            def set_memory_pool_limit(self, pool, size):
                pass

            def set_flag(self, flag):  # a precision flag here fails the tests below
                trt.record.flags.append(flag)

            def create_timing_cache(self, data):
                return NS(data=data, serialize=lambda: b"cache")

            def set_timing_cache(self, cache, ignore_mismatch):
                trt.record.caches.append(cache.data)
                self.cache = cache
                return trt.answers.pop(0)

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, profile):
                pass

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                import onnx

                trt.record.parsed = Path(path).name
                trt.record.parsed_model = onnx.load(path, load_external_data=False)
                return True

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                trt.record.network_flags = flags
                return Network(trt.input_shape)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return NS(set_shape=lambda *shapes: None)

            def build_serialized_network(self, network, config):
                return b"plan"

        self.Builder, self.OnnxParser = Builder, Parser


def _build_with(stand_in, spec, onnx_path, tmp_path, monkeypatch, precision="bf16", cache=b""):
    plan = trt_vision.plan_vision_engine(spec, max_batch_size=2, precision=precision)
    stand_in.input_shape = (-1, *plan.input_shape(1)[1:])
    importlib.import_module("modelopt.onnx.autocast")  # first: importing it looks for a real tensorrt's __spec__
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in)
    cache_path = tmp_path / "timing.cache"
    if cache:
        cache_path.write_bytes(cache)
    logged = []
    trt_vision.build_vision_engine(onnx_path, tmp_path / "v.plan", plan, cache_path, log=logged.append)
    return logged, cache_path


@pytest.fixture(scope="module")
def tiny_spec(tiny_checkpoint) -> ModelSpec:
    return ModelSpec.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def tiny_fp32_graph(tiny_onnx, tmp_path_factory):
    return _fp32_graph(tiny_onnx, tmp_path_factory.mktemp("tiny-vision"))


@pytest.mark.parametrize("version", ["10.14.1.48", "11.0.0"])
def test_vision_build_is_strongly_typed_from_the_typed_graph(version, tiny_spec, tiny_fp32_graph, tmp_path, monkeypatch):
    trt = _StandInTensorRT(version=version)
    logged, _ = _build_with(trt, tiny_spec, tiny_fp32_graph, tmp_path, monkeypatch)
    assert trt.record.network_flags == 1 << trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert trt.record.flags == []  # no BF16 / FP16 / OBEY_PRECISION_CONSTRAINTS: they are gone in TensorRT 11
    assert trt.record.parsed == "vision_encoder.bf16.onnx"
    assert vision_typed.check_types(trt.record.parsed_model) == []
    assert (tmp_path / "v.plan").read_bytes() == b"plan"
    written = json.loads((tmp_path / "v.json").read_text())
    assert written["strongly_typed"] and written["fp32_op_types"] == list(vision_typed.FP32_OP_TYPES)
    assert any("strongly typed bf16" in line for line in logged)


def test_fp32_vision_build_reads_the_exported_graph(tiny_spec, tiny_fp32_graph, tmp_path, monkeypatch):
    trt = _StandInTensorRT()
    _build_with(trt, tiny_spec, tiny_fp32_graph, tmp_path, monkeypatch, precision="fp32")
    assert trt.record.parsed == "vision_encoder.onnx" and trt.record.flags == []


@pytest.mark.parametrize("version", ["10.11.0.33", "12.0.0", "9.3.0", "unknown"])
def test_vision_build_refuses_tensorrt_it_was_not_checked_against(version, tiny_spec, tiny_fp32_graph, tmp_path,
                                                                  monkeypatch):
    with pytest.raises(RuntimeError, match=f"strongly typed for TensorRT 10.12 up to 11.x; found TensorRT {version}"):
        _build_with(_StandInTensorRT(version=version), tiny_spec, tiny_fp32_graph, tmp_path, monkeypatch)


def test_vision_build_refuses_a_network_with_low_precision_outputs(tiny_spec, tiny_fp32_graph, tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match=r"\['image_embeddings'\] are not fp32"):
        _build_with(_StandInTensorRT(output_dtype="bfloat16"), tiny_spec, tiny_fp32_graph, tmp_path, monkeypatch)


def test_vision_build_checks_the_timing_cache_is_taken(tiny_spec, tiny_fp32_graph, tmp_path, monkeypatch):
    stale = _StandInTensorRT(accept_cache=(False, True))  # a cache from another TensorRT or GPU
    logged, cache_path = _build_with(stale, tiny_spec, tiny_fp32_graph, tmp_path, monkeypatch, precision="fp32",
                                     cache=b"old")
    assert stale.record.caches == [b"old", b""] and any("starting a new one" in line for line in logged)
    assert cache_path.read_bytes() == b"cache"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(RuntimeError, match="refused a new, empty timing cache"):
        _build_with(_StandInTensorRT(accept_cache=(False,)), tiny_spec, tiny_fp32_graph, fresh, monkeypatch,
                    precision="fp32")
