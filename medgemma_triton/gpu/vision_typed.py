"""vision_encoder.onnx (fp32) -> vision_encoder.bf16.onnx: the same graph with its precisions written in it.

TensorRT 11 builds only strongly typed networks (every tensor's type comes from the graph; the BF16/FP16
builder flags and per-layer precisions are gone) and TensorRT 10.12+ builds them on request, so the
precision of the gpu profile's vision engine lives here, in the ONNX graph, and trt_vision.py builds
whatever this writes. The graph is typed by ModelOpt's ONNX AutoCast (`convert_to_mixed_precision`,
NVIDIA's replacement for the weakly typed flags) with a fixed rule and no calibration data:

- bf16 compute (the dtype the reference model runs in) for the matmuls, convolution, GELU, residual adds;
- fp32 for every op in FP32_OP_TYPES (SigLIP's LayerNorms, the attention softmax, reductions, pooling)
  and for the projector's RMSNorm (`projector_norm_nodes`: the path from the tower's last LayerNorm to
  the output projection; transformers itself runs Gemma3RMSNorm in fp32);
- fp32 graph inputs and outputs (`pixel_values`, `image_embeddings`), as in the cpu profile's graph.

The cpu profile never reads the typed graph. ONNX Runtime's CPU provider has no bf16 kernels for these
ops (only Cast), so `emulate_on_cpu` rewrites a typed graph into an fp32 one that rounds every
low-precision tensor to bf16 where it is produced; `compare` measures it against the fp32 graph
(tests/test_gpu_vision_typed.py, benchmarks/studies/vision_typed.py). AutoCast holds many copies of the weights
while it works (its peak memory for a graph is in docs/results/vision-typed-epyc-zen3/), so for the 4B
tower the build host needs far more RAM than the 1.7 GB of fp32 weights; `emulate_rule_on_cpu` applies the
same rule to the fp32 graph without AutoCast, for CPU checks on machines where it does not fit.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

PRECISIONS = ("bf16", "fp16")
TYPED_ONNX = "vision_encoder.{precision}.onnx"
# ONNX op types computed in fp32 whatever their neighbours are: normalisations, softmax, reductions, pooling.
FP32_OP_TYPES = (
    "LayerNormalization", "RMSNormalization", "Softmax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceMax", "ReduceL2",
    "AveragePool", "GlobalAveragePool",
)
# AutoCast's bf16 path upgrades the graph to opset 22 (the first with bf16 in Conv, Gelu, ...); its data_max
# and init_max rules would keep large-valued nodes in fp32 after a calibration run: the rule above is fixed.
NO_RANGE_RULE = float("inf")
_TYPE_NAMES = {1: "fp32", 16: "bf16", 10: "fp16"}  # onnx.TensorProto data types


def _onnx_type(precision: str) -> int:
    from onnx import TensorProto

    if precision not in PRECISIONS:
        raise ValueError(f"typed vision graph precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return {"bf16": TensorProto.BFLOAT16, "fp16": TensorProto.FLOAT16}[precision]


def projector_norm_nodes(model) -> list[str]:
    """Names of the nodes between the vision tower's last LayerNormalization and the graph's final MatMul
    (the projector's avg-pool and RMSNorm), found by the graph's structure, not by exporter-given names.
    Casts are left out: AutoCast puts its own around them."""
    nodes = list(model.graph.node)
    norms = [n for n in nodes if n.op_type == "LayerNormalization"]
    (output,) = model.graph.output
    producers = {name: n for n in nodes for name in n.output}
    final = producers.get(output.name)
    while final is not None and final.op_type == "Cast":  # a typed graph casts its output back to fp32
        final = producers.get(final.input[0])
    if not norms or final is None or final.op_type != "MatMul":
        raise ValueError("vision graph does not end LayerNormalization ... MatMul -> image_embeddings: "
                         "not the SigLIP + Gemma 3 projector graph export/vision.py writes")
    # Walk back from the projection's activation input to the post-layernorm's output.
    start, path, stack = norms[-1].output[0], {}, [final.input[0]]
    while stack:
        tensor = stack.pop()
        node = producers.get(tensor)
        if tensor == start or node is None or node.name in path:
            continue
        path[node.name] = node
        stack.extend(node.input)
    reached = {name for name, node in path.items() if node.op_type != "Cast" and start in _ancestors(node, producers)}
    return [n.name for n in nodes if n.name in reached]


def _ancestors(node, producers) -> set[str]:
    seen, stack = set(), list(node.input)
    while stack:
        tensor = stack.pop()
        if tensor in seen:
            continue
        seen.add(tensor)
        if tensor in producers:
            stack.extend(producers[tensor].input)
    return seen


def type_vision_graph(fp32_onnx: str | Path, out_dir: str | Path, precision: str = "bf16", log=print) -> Path:
    """Write out_dir/vision_encoder.<precision>.onnx (+ .data): fp32_onnx with explicit casts (see the module
    docstring); refuses a result that breaks the rule (check_types), whatever the ModelOpt version did."""
    import onnx

    fp32_onnx, out_dir = Path(fp32_onnx), Path(out_dir)
    structure = onnx.load(str(fp32_onnx), load_external_data=False)
    typed = autocast(fp32_onnx, precision, FP32_OP_TYPES, projector_norm_nodes(structure))
    violations = check_types(typed, precision)
    if violations:
        raise RuntimeError(f"ModelOpt AutoCast typed {fp32_onnx} against the rule: " + "; ".join(violations[:5]))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / TYPED_ONNX.format(precision=precision)
    onnx.save(typed, str(path), save_as_external_data=True, location=path.name + ".data")
    counts = compute_types(typed)
    log(f"typed vision graph: {path.name}, {sum(t == precision for t in counts.values())} nodes compute in "
        f"{precision}, {sum(t == 'fp32' for t in counts.values())} in fp32")
    return path


def autocast(fp32_onnx: Path, precision: str, fp32_op_types, fp32_nodes):
    """ModelOpt AutoCast with a fixed rule: fp32_op_types and the named fp32_nodes stay fp32, the rest is
    low precision; fp32 graph inputs and outputs. Arguments as in modelopt/onnx/autocast/convert.py
    (0.37.0, and unchanged in NVIDIA/Model-Optimizer@0646ad7c)."""
    from modelopt.onnx.autocast import convert_to_mixed_precision

    _onnx_type(precision)
    return convert_to_mixed_precision(
        onnx_path=str(fp32_onnx),
        low_precision_type=precision,
        nodes_to_exclude=[f"^{re.escape(name)}$" for name in fp32_nodes],
        op_types_to_exclude=list(fp32_op_types),
        data_max=NO_RANGE_RULE,
        init_max=NO_RANGE_RULE,
        keep_io_types=True,
    )


# Op types whose work is the engine's compute: they must run in the low precision.
LOW_PRECISION_OP_TYPES = ("MatMul", "Gemm", "Conv")


def check_types(model, precision: str = "bf16") -> list[str]:
    """Where a typed vision graph breaks the rule: a norm, softmax, reduction or pooling (or a node of the
    projector's RMSNorm) that does not compute in fp32, a matmul or convolution that does not compute in
    `precision`, graph inputs/outputs that are not fp32. Empty when the graph follows the rule."""
    from onnx import TensorProto

    low = _TYPE_NAMES[_onnx_type(precision)]
    types = compute_types(model)
    fp32_nodes = set(projector_norm_nodes(model))
    violations = []
    for node in model.graph.node:
        if node.op_type == "Cast" or node.name not in types:
            continue
        if (node.op_type in FP32_OP_TYPES or node.name in fp32_nodes) and types[node.name] != "fp32":
            violations.append(f"{node.op_type} {node.name} computes in {types[node.name]}, not fp32")
        elif node.op_type in LOW_PRECISION_OP_TYPES and types[node.name] != low:
            violations.append(f"{node.op_type} {node.name} computes in {types[node.name]}, not {low}")
    for value in (*model.graph.input, *model.graph.output):
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            violations.append(f"graph tensor {value.name} is not fp32")
    return violations


def compute_types(model) -> dict[str, str]:
    """The float type each node computes in ("fp32", "bf16", "fp16"), read from the graph's own types: a
    node's first floating-point input (a Cast's is its target). Nodes with no float input are left out."""
    types = _tensor_types(model)
    result = {}
    for node in model.graph.node:
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            if to in _TYPE_NAMES:
                result[node.name] = _TYPE_NAMES[to]
            continue
        for name in node.input:
            if types.get(name) in _TYPE_NAMES:
                result[node.name] = _TYPE_NAMES[types[name]]
                break
    return result


def _tensor_types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(_without_weights(model))
    types = {t.name: t.data_type for t in model.graph.initializer}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        types[value.name] = value.type.tensor_type.elem_type
    return types


def _without_weights(model):
    """The graph with empty initializers of the same names and types (type inference needs no weights), built
    without copying the weights (a full copy of the 4B graph is gigabytes)."""
    import onnx
    from onnx import helper

    graph = onnx.GraphProto(name=model.graph.name)
    graph.node.extend(model.graph.node)
    for field in ("input", "output", "value_info"):
        getattr(graph, field).extend(getattr(model.graph, field))
    for tensor in model.graph.initializer:
        graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    copy = helper.make_model(graph, opset_imports=list(model.opset_import))
    copy.ir_version = model.ir_version
    return copy


def emulate_on_cpu(typed_model, precision: str = "bf16"):
    """An fp32 graph that computes what the typed graph computes, for ONNX Runtime's CPU provider.

    Model of a low-precision op (what TensorRT's bf16 kernels do): it reads low-precision inputs, computes
    in fp32 and writes a rounded low-precision output; the emulation computes in fp32 and rounds each
    low-precision output with a Cast to bf16 and back (ONNX Runtime rounds to nearest even). Low-precision
    weights become fp32 tensors of the same values. A LayerNormalization or Softmax that the typed graph
    runs in low precision is expanded into its steps (mean, variance, max, sum ...), each rounded, so its
    statistics carry low precision too. Where TensorRT fuses ops (a matmul's bias, GELU), it skips some
    of these roundings: the emulation is the less precise of the two.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    low = _onnx_type(precision)
    types = _tensor_types(typed_model)
    graph = typed_model.graph
    nodes, counter = [], [0]

    def fresh(base: str) -> str:
        counter[0] += 1
        return f"{base}__emul{counter[0]}"

    def rounded(value: str, out: str | None = None, to: int = low) -> str:
        """value (fp32) rounded to the type `to`; written to `out` when given."""
        narrow = fresh(value)
        out = out or fresh(value)
        nodes.append(helper.make_node("Cast", [value], [narrow], to=to, name=fresh("round")))
        nodes.append(helper.make_node("Cast", [narrow], [out], to=TensorProto.FLOAT, name=fresh("widen")))
        return out

    def step(op: str, inputs: list[str], **attrs) -> str:
        out = fresh(op)
        nodes.append(helper.make_node(op, inputs, [out], name=fresh(op), **attrs))
        return rounded(out)

    constants = []
    for node in graph.node:
        low_in = any(types.get(name) == low for name in node.input)
        if node.op_type == "Cast":
            to = next(a.i for a in node.attribute if a.name == "to")
            if to in _NARROW_FLOATS and types.get(node.input[0]) in (TensorProto.FLOAT, *_NARROW_FLOATS):
                rounded(node.input[0], node.output[0], to)
            elif to in _NARROW_FLOATS:
                raise NotImplementedError(f"{node.name}: a cast to type {to} from type {types.get(node.input[0])}")
            else:
                nodes.append(node)
        elif node.op_type == "LayerNormalization" and low_in:
            nodes.extend(_layer_norm_steps(node, step, constants))
        elif node.op_type == "Softmax" and low_in:
            nodes.extend(_softmax_steps(node, step, constants))
        elif node.op_type == "Constant" and types.get(node.output[0]) == low:
            value = next(a.t for a in node.attribute if a.name == "value")
            array = numpy_helper.to_array(value).astype(np.float32)
            nodes.append(helper.make_node("Constant", [], list(node.output), name=node.name,
                                          value=numpy_helper.from_array(array, value.name)))
        else:
            outputs = list(node.output)
            renamed = [fresh(name) if types.get(name) == low else name for name in outputs]
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            del copy.output[:]
            copy.output.extend(renamed)
            nodes.append(copy)
            for original, new in zip(outputs, renamed):
                if original != new:
                    rounded(new, original)

    initializers = []
    for tensor in graph.initializer:
        if tensor.data_type == low:
            array = numpy_helper.to_array(tensor).astype(np.float32)  # exact: every bf16/fp16 value is an fp32
            initializers.append(numpy_helper.from_array(array, tensor.name))
        else:
            initializers.append(tensor)
    initializers.extend(constants)

    def fp32_value(value):
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(value)
        if copy.type.tensor_type.elem_type == low:
            copy.type.tensor_type.elem_type = TensorProto.FLOAT
        return copy

    emulated = helper.make_graph(
        nodes, graph.name + "_emulated",
        [fp32_value(v) for v in graph.input], [fp32_value(v) for v in graph.output], initializers,
    )
    model = helper.make_model(emulated, opset_imports=list(typed_model.opset_import))
    model.ir_version = typed_model.ir_version
    return model


def emulate_rule_on_cpu(fp32_model, precision: str = "bf16"):
    """What the typed graph computes, emulated straight from the fp32 graph and the rule, without writing the
    typed graph: a node outside FP32_OP_TYPES and the projector's norm rounds its float inputs (a weight once,
    in place, as AutoCast converts it) and its outputs to the low precision; the others compute in fp32.
    For graphs AutoCast cannot type in the memory at hand (it holds many copies of the weights): the tests
    show it computes what emulate_on_cpu(typed graph) computes. Changes fp32_model's weights."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    low = _onnx_type(precision)
    types = _tensor_types(fp32_model)
    fp32_nodes = set(projector_norm_nodes(fp32_model))
    nodes, rounded_names, counter = [], {}, [0]

    def fresh(base: str) -> str:
        counter[0] += 1
        return f"{base}__emul{counter[0]}"

    def round_into(value: str, out: str) -> None:
        narrow = fresh(value)
        nodes.append(helper.make_node("Cast", [value], [narrow], to=low, name=fresh("round")))
        nodes.append(helper.make_node("Cast", [narrow], [out], to=TensorProto.FLOAT, name=fresh("widen")))

    initializers = {tensor.name: tensor for tensor in fp32_model.graph.initializer}
    narrow = {TensorProto.BFLOAT16: ml_dtypes.bfloat16, TensorProto.FLOAT16: np.float16}[low]

    def is_low(node) -> bool:
        floats = [n for n in (*node.input, *node.output) if types.get(n) == TensorProto.FLOAT]
        return bool(floats) and node.op_type not in FP32_OP_TYPES and node.name not in fp32_nodes

    # A weight only low-precision nodes read is rounded in place (no second copy of the 4B tower's weights).
    read_in_fp32 = {name for node in fp32_model.graph.node if not is_low(node) for name in node.input}
    rounded_weights = []

    def rounded_input(value: str) -> str:
        if value not in rounded_names:
            if value in initializers:  # a constant, as AutoCast's converted weight is (ORT prepacks constants)
                tensor = initializers[value]
                array = numpy_helper.to_array(tensor).astype(narrow).astype(np.float32)
                if value in read_in_fp32:
                    rounded_names[value] = fresh(value)
                    rounded_weights.append(numpy_helper.from_array(array, rounded_names[value]))
                else:
                    rounded_names[value] = value
                    tensor.CopyFrom(numpy_helper.from_array(array, value))
            else:
                rounded_names[value] = fresh(value)
                round_into(value, rounded_names[value])
        return rounded_names[value]

    for node in fp32_model.graph.node:
        floats_in = [name for name in node.input if types.get(name) == TensorProto.FLOAT]
        floats_out = [name for name in node.output if types.get(name) == TensorProto.FLOAT]
        if not is_low(node):
            nodes.append(node)
            continue
        copy = helper.make_node(node.op_type, [rounded_input(n) if n in floats_in else n for n in node.input],
                                [fresh(n) if n in floats_out else n for n in node.output], name=node.name,
                                domain=node.domain)
        copy.attribute.extend(node.attribute)
        nodes.append(copy)
        for original, new in zip(node.output, copy.output):
            if original != new:
                round_into(new, original)

    graph = fp32_model.graph
    used = {name for node in nodes for name in node.input}
    emulated = helper.make_graph(nodes, graph.name + "_rule_emulated", list(graph.input), list(graph.output),
                                 [t for t in graph.initializer if t.name in used] + rounded_weights)
    model = helper.make_model(emulated, opset_imports=list(fp32_model.opset_import))
    model.ir_version = fp32_model.ir_version
    return model


def _session_of(model, path: Path):
    """A CPU session of `model`, saved first to path (+ .data) so no second in-memory copy is kept."""
    import gc

    import onnx
    import onnxruntime as ort

    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    del model
    gc.collect()
    options = ort.SessionOptions()
    # ORT's optimiser would fuse the rounding Casts away (e.g. Cast pairs, LayerNorm re-fusion).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# Float types narrower than fp32 whose casts the emulation rounds through (bf16, fp16, the fp8 types).
_NARROW_FLOATS = (16, 10, 17, 18, 19, 20)


def _layer_norm_steps(node, step, constants):
    """LayerNormalization over the last axis, each step rounded (see emulate_on_cpu)."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("axis", -1) != -1:
        raise NotImplementedError(f"{node.name}: LayerNormalization over axis {attrs['axis']} is not emulated")
    eps = f"{node.name}__epsilon"
    axes = f"{node.name}__axes"
    constants.append(numpy_helper.from_array(np.array(attrs.get("epsilon", 1e-5), np.float32), eps))
    constants.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
    x, scale, bias = (list(node.input) + [""])[:3]
    mean = step("ReduceMean", [x, axes], keepdims=1)
    centred = step("Sub", [x, mean])
    variance = step("ReduceMean", [step("Mul", [centred, centred]), axes], keepdims=1)
    std = step("Sqrt", [step("Add", [variance, eps])])
    y = step("Mul", [step("Div", [centred, std]), scale])
    out = step("Add", [y, bias]) if bias else y
    return [helper.make_node("Identity", [out], [node.output[0]], name=node.name)]


def _softmax_steps(node, step, constants):
    """Softmax over the last axis, each step rounded (see emulate_on_cpu)."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("axis", -1) != -1:
        raise NotImplementedError(f"{node.name}: Softmax over axis {attrs['axis']} is not emulated")
    axes = f"{node.name}__axes"
    constants.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
    x = node.input[0]
    shifted = step("Sub", [x, step("ReduceMax", [x, axes], keepdims=1)])
    exp = step("Exp", [shifted])
    out = step("Div", [exp, step("ReduceSum", [exp, axes], keepdims=1)])
    return [helper.make_node("Identity", [out], [node.output[0]], name=node.name)]


def emulated_session(typed_onnx: str | Path, precision: str = "bf16"):
    """An ONNX Runtime CPU session of emulate_on_cpu(typed graph); the emulated graph is written beside the
    typed one (vision_encoder.<precision>.emulated.onnx + .data)."""
    import onnx

    typed_onnx = Path(typed_onnx)
    model = emulate_on_cpu(onnx.load(str(typed_onnx)), precision)
    return _session_of(model, typed_onnx.with_name(typed_onnx.stem + ".emulated.onnx"))


def rule_emulated_session(fp32_onnx: str | Path, out_dir: str | Path, precision: str = "bf16"):
    """An ONNX Runtime CPU session of emulate_rule_on_cpu(fp32 graph), written to out_dir."""
    import onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = emulate_rule_on_cpu(onnx.load(str(fp32_onnx)), precision)
    return _session_of(model, out_dir / f"vision_encoder.{precision}.rule-emulated.onnx")


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How far candidate image embeddings are from the reference's: absolute differences, the same relative to
    the reference's magnitude (max |diff| / max |ref|, mean |diff| / mean |ref|) and the lowest cosine
    similarity of one token's embedding."""
    reference = reference.astype(np.float64)
    candidate = candidate.astype(np.float64)
    diff = np.abs(candidate - reference)
    flat_ref = reference.reshape(-1, reference.shape[-1])
    flat_new = candidate.reshape(-1, candidate.shape[-1])
    cosine = (flat_ref * flat_new).sum(-1) / (np.linalg.norm(flat_ref, axis=-1) * np.linalg.norm(flat_new, axis=-1))
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_reference": float(np.abs(reference).max()),
        "mean_abs_reference": float(np.abs(reference).mean()),
        "max_rel_diff": float(diff.max() / np.abs(reference).max()),
        "mean_rel_diff": float(diff.mean() / np.abs(reference).mean()),
        "min_token_cosine": float(cosine.min()),
    }


def main(argv=None) -> int:
    """python -m medgemma_triton.gpu.vision_typed FP32_ONNX OUT_DIR [--precision bf16|fp16]: write the typed
    graph (e.g. for trtexec --onnx=... --stronglyTyped, or to look at it)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("fp32_onnx", type=Path, help="vision_encoder.onnx from `medgemma-triton export`")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    args = parser.parse_args(argv)
    print(type_vision_graph(args.fp32_onnx, args.out_dir, args.precision))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
