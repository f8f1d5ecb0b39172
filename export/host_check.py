"""Writes a quantized decoder's host check (medgemma_triton.runtime.host_check runs it at load).

One node per quantized operator kind the decoder uses, with that kind's attributes and the decoder's own
K, its weights quantized by the export's own functions (export/int4.py). What each node multiplies:
- weights: 8 columns of one constant +-1 each (every int8 weight at the scheme's full scale, which is
  what can saturate a kernel), then 24 columns of standard-normal values;
- activations: a standard-normal row, a row of ones (quantized to uint8 255 throughout, the worst case of
  a u8s8 pair sum) and a positive uniform row. No outliers: DynamicQuantizeMatMul quantizes all rows with
  one scale, and an outlier's coarser step would be quantization error growing with K, not a kernel's.
The fp32 products come from numpy; TOLERANCES bound each kind's relative error (the worst row's
|y - fp32| / |fp32|), a few times what the right kernels give (docs/quantization.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgemma_triton.export.int4 import (
    IR_VERSION,
    MS_DOMAIN,
    _attribute,
    _dynamic_quantize_matmul,
    _gather_block_quantized,
    _matmul_nbits,
)
from medgemma_triton.runtime.host_check import CHECK_DATA, CHECK_MODEL

COLUMNS = 32
FULL_SCALE_COLUMNS = 8
TABLE_ROWS = 64
# Worst row, measured with this module's inputs at the dev and 4B geometries on AMD EPYC (x86-64
# AVX512-VNNI) natively and under qemu -cpu Haswell (AVX2 kernels): see docs/quantization.md.
# MatMulNBits8: 8-bit MatMulNBits (int4's LM head), other kernels than the 4-bit products'.
TOLERANCES = {"DynamicQuantizeMatMul": 0.04, "MatMulNBits": 0.2, "MatMulNBits8": 0.04, "GatherBlockQuantized": 0.2}


def product_model(nodes, initializers, inputs, outputs, opset: int = 20):
    """An ONNX model of `nodes` over `inputs` {name: (elem_type, shape)}, `outputs` {name: elem_type}."""
    from onnx import helper

    graph = helper.make_graph(
        nodes, "products", [helper.make_tensor_value_info(name, t, shape) for name, (t, shape) in inputs.items()],
        [helper.make_tensor_value_info(name, t, None) for name, t in outputs.items()], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = IR_VERSION
    return model


def check_inputs(k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(weights [k, COLUMNS], activations [3, k]) as the module docstring describes."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((k, COLUMNS)).astype(np.float32)
    weights[:, :FULL_SCALE_COLUMNS] = np.where(np.arange(FULL_SCALE_COLUMNS) % 2, -1.0, 1.0)
    activations = np.stack([rng.standard_normal(k), np.ones(k), rng.uniform(0.25, 1.0, k)]).astype(np.float32)
    return weights, activations


def _kind(node) -> str | None:
    kind = node.op_type
    if kind == "MatMulNBits" and _attribute(node, "bits", 4) == 8:
        kind = "MatMulNBits8"
    return kind if kind in TOLERANCES and node.domain == MS_DOMAIN else None


def write_host_check(decoder_path: str | Path, directory: str | Path | None = None) -> list[str]:
    """Write CHECK_MODEL and CHECK_DATA for the decoder at decoder_path into `directory` (default: beside
    it); returns the operator kinds checked."""
    import onnx
    from onnx import TensorProto

    decoder_path = Path(decoder_path)
    directory = Path(directory) if directory else decoder_path.parent
    decoder = onnx.load(str(decoder_path), load_external_data=False)
    graph = decoder.graph
    opset = next(o.version for o in decoder.opset_import if o.domain in ("", "ai.onnx"))
    tensors = {t.name: t for t in graph.initializer}
    dims = {name: list(t.dims) for name, t in tensors.items()}
    first: dict[str, object] = {}
    for node in graph.node:
        if (kind := _kind(node)) and kind not in first:
            first[kind] = node
    nodes, initializers, inputs, outputs, arrays = [], [], {}, {}, {}
    for kind, node in first.items():
        x_name, y_name, prefix = f"x.{kind}", f"y.{kind}", f"check_{kind}"
        if kind == "GatherBlockQuantized":
            k = dims[node.input[0]][1]
            table, _ = check_inputs(k)
            table = np.concatenate([table.T, table.T])[:TABLE_ROWS]  # rows of +-1 and of normal values
            indices = np.arange(TABLE_ROWS, dtype=np.int64)
            built = _gather_block_quantized(table, x_name, y_name, kind, prefix,
                                            block_size=_attribute(node, "block_size", 16),
                                            symmetric=len(node.input) < 4)
            arrays[x_name], arrays[f"expected.{kind}"] = indices, table
            inputs[x_name] = (TensorProto.INT64, [TABLE_ROWS])
        else:
            nbits = node.op_type == "MatMulNBits"
            k = _attribute(node, "K", 0) if nbits else dims[node.input[1]][0]
            weights, activations = check_inputs(k)
            if nbits:
                built = _matmul_nbits(weights, x_name, y_name, kind, prefix, bits=_attribute(node, "bits", 4),
                                      block_size=_attribute(node, "block_size", 16), symmetric=len(node.input) < 4)
            else:
                # the decoder's own int8 storage: signed weights run other kernels than unsigned ones
                built = _dynamic_quantize_matmul(weights, x_name, y_name, kind, prefix,
                                                 unsigned=tensors[node.input[1]].data_type == TensorProto.UINT8)
            arrays[x_name] = activations
            arrays[f"expected.{kind}"] = (activations.astype(np.float64) @ weights.astype(np.float64)).astype(np.float32)
            inputs[x_name] = (TensorProto.FLOAT, list(activations.shape))
        check_node, check_initializers = built
        if node.op_type == "MatMulNBits":  # the decoder's accuracy level (its int8 activation path), not the default
            del check_node.attribute[:]
            check_node.attribute.extend(a for a in node.attribute if a.name != "N")
            check_node.attribute.append(onnx.helper.make_attribute("N", COLUMNS))
        nodes.append(check_node)
        initializers.extend(check_initializers)
        outputs[y_name] = TensorProto.FLOAT
        arrays[f"tolerance.{kind}"] = np.float64(TOLERANCES[kind])
    if not nodes:
        raise RuntimeError(f"{decoder_path.name} has no quantized operator to check")
    onnx.save_model(product_model(nodes, initializers, inputs, outputs, opset), str(directory / CHECK_MODEL))
    np.savez(directory / CHECK_DATA, **arrays)
    return list(first)
