"""Block-wise int4 weight-only quantization of the exported decoder (ONNX Runtime MatMulNBits).

Every MatMul with a constant fp32 [K, N] weight (q/k/v/o and gate/up/down projections) becomes a
com.microsoft MatMulNBits node: 4-bit asymmetric (with zero points), blocks of BLOCK_SIZE along K,
using onnxruntime.quantization.matmul_nbits_quantizer's own kernels (DefaultWeightOnlyQuantizer).
Activations, norms, RoPE, masks and the KV cache stay fp32.

The tied embedding table (vocab x hidden) is one initializer used twice in the exported graph: a
Gather (token embedding) and a Gemm with transB=1 (the LM head). Our choice: an int8 head, an int4
embedding.
- LM head: int8 in blocks ("int8-blocks": 8-bit asymmetric MatMulNBits, blocks of HEAD_BLOCK_SIZE along
  hidden, the same accuracy level as the projections). Every decode step reads the whole head; MLAS's
  8-bit block kernel streams it faster than DynamicQuantizeMatMul (`lm_head="int8"`: one scale per
  vocabulary row, the head of earlier exports) and int4 blocks cost quality. "int8", "int4" and "fp32"
  stay available.
- Embedding Gather: int4 (GatherBlockQuantized, blocks along hidden). A Gather reads only the rows of
  the request's tokens, so this is about size, not speed.
- Block size 16, asymmetric: coarser blocks and symmetric weights cost quality on dev (partly an
  artifact of dev's weights, which are dequantized Q4_K_M values); re-measure on google/medgemma-4b-it.
  `int8_projections=("v_proj", "down_proj")` (8-bit MatMulNBits, as Q4_K_M keeps them at 6 bits)
  remains available for real-weight re-measurement.

Graph rewrites besides the weights (rewrite_decoder; the int8 export gets them too):
- Projections reading one tensor (q/k/v, gate/up) become one product over their weights concatenated
  along N, then a Split: 7 -> 4 quantized products per layer. Each output column is quantized on its own
  and the shared input is quantized once either way, so the outputs are bit-identical.
- Every RMSNorm becomes ONNX Runtime's SimplifiedLayerNormalization (SkipSimplifiedLayerNormalization
  after a residual Add), by onnxscript's fusion rules. The fp32 export stays unfused: it is the
  token-for-token reference.

The measurements behind each choice, with the CPU each ran on: docs/quantization.md. Greedy token
agreement is low on dev (a base 270M model whose first-token top-2 margins after open prompts are small),
so the tests bound perplexity and teacher-forced top-1 agreement instead.

Memory: weights are read one tensor at a time (memory-mapped from the fp32 export's external data),
so the 4B decoder (about 15.6 GB fp32) quantizes without holding the fp32 model in RAM; the result is
saved with external data (`decoder.onnx.data`) and IR version IR_VERSION, which ONNX Runtime 1.31
and Triton's bundled runtimes accept.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from medgemma_triton.runtime.host_check import INT8_STORAGES, INT8_ZERO_POINT, QUANTIZATION_SCHEME

BITS = 4
BLOCK_SIZE = 16  # see the module docstring: 32 cost 0.2 perplexity ratio on dev
IS_SYMMETRIC = False
# 4: activations quantized to int8 per block, int8 dot products; faster than level 0 (fp32 compute on
# dequantized blocks) at the same quality on dev (docs/quantization.md)
ACCURACY_LEVEL = 4
# The tied LM head (see the module docstring): "int8-blocks" (8-bit MatMulNBits, blocks of HEAD_BLOCK_SIZE),
# "int8" (DynamicQuantizeMatMul, one scale per vocabulary row), "int4" (MatMulNBits, BLOCK_SIZE) or "fp32".
LM_HEAD = "int8-blocks"
HEAD_BITS = 8
HEAD_BLOCK_SIZE = 128
EMBEDDING_INT4 = True
# q/k/v and gate/up as one product each (bit-identical outputs) and RMSNorm as one op: see the docstring.
MERGE_SHARED_INPUT = True
FUSE_NORMS = True
IR_VERSION = 10  # what the fp32 export carries; onnx 1.23's default (14) is refused by older runtimes
MS_DOMAIN = "com.microsoft"
_COLUMN_CHUNK = 16384

def quantization_settings(lm_head: str = LM_HEAD, embedding_int4: bool = EMBEDDING_INT4,
                          int8_weights: str = "unsigned", block_size: int = BLOCK_SIZE) -> dict:
    return {
        "method": "MatMulNBits block-wise weight-only (onnxruntime.quantization.matmul_nbits_quantizer)",
        "bits": BITS,
        "block_size": check_block_size(block_size),
        "symmetric": IS_SYMMETRIC,
        "accuracy_level": ACCURACY_LEVEL,
        "lm_head": lm_head,
        "embedding": "int4" if embedding_int4 else "fp32",
        **graph_settings(int8_weights),
    }


def check_block_size(block_size: int) -> int:
    """MatMulNBits' block sizes: a power of two, at least 16."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"int4 block size {block_size}: choose a power of two >= 16 (16, 32, 64, 128)")
    return block_size


def graph_settings(int8_weights: str = "unsigned") -> dict:
    """What every quantized export records in its manifest besides its own format: the scheme version
    (an export of another scheme is refused at load), how int8 weights are stored, and the graph rewrites."""
    return {"scheme": QUANTIZATION_SCHEME, "int8_weights": int8_storage(int8_weights),
            "merged_shared_input_projections": MERGE_SHARED_INPUT, "fused_rms_norms": FUSE_NORMS}


def int8_storage(name: str) -> str:
    """The manifest's description of an int8 weight storage ("unsigned" or "signed"; see INT8_STORAGES)."""
    if name not in INT8_STORAGES:
        raise ValueError(f"int8 weights {name!r}: choose {' or '.join(INT8_STORAGES)}")
    return INT8_STORAGES[name]


def stores_unsigned(int8_weights: str) -> bool:
    """_dynamic_quantize_matmul's `unsigned` for an int8 weight storage name (checked: see int8_storage)."""
    int8_storage(int8_weights)
    return int8_weights == "unsigned"


class _Weights:
    """Initializer values on demand, memory-mapped from external data where the export put them.

    Read here, never by onnx's loader, which refuses external data with more than one link: model
    repositories hard-link the export's files so that a multi-gigabyte export is on disk once, not twice.
    """

    def __init__(self, model, base_dir: Path):
        from onnx import TensorProto, helper

        self.base_dir = base_dir
        self.tensors = {t.name: t for t in model.graph.initializer}
        self._np_dtype = helper.tensor_dtype_to_np_dtype
        self._float = TensorProto.FLOAT

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def is_float_matrix(self, name: str) -> bool:
        tensor = self.tensors.get(name)
        return tensor is not None and tensor.data_type == self._float and len(tensor.dims) == 2

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper
        from onnx.external_data_helper import uses_external_data

        tensor = self.tensors[name]
        if not uses_external_data(tensor):
            return numpy_helper.to_array(tensor)
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = Path(info["location"])
        if location.is_absolute() or ".." in location.parts:  # the export writes its data beside the graph
            raise ValueError(f"{name}: external data {info['location']!r} is outside {self.base_dir}")
        dtype = np.dtype(self._np_dtype(tensor.data_type))
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        return np.memmap(
            self.base_dir / location, dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=(count,),
        ).reshape(tuple(tensor.dims))

    def load(self, name: str) -> None:
        """Move the initializer's external data into the graph (onnx's load_external_data_for_tensor)."""
        from onnx import TensorProto

        tensor = self.tensors[name]
        tensor.raw_data = np.ascontiguousarray(self.array(name)).tobytes()
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT


def _matmul_nbits(weights_kn: np.ndarray, a_input: str, output: str, name: str, prefix: str,
                  bits: int = BITS, block_size: int = BLOCK_SIZE, symmetric: bool = IS_SYMMETRIC):
    """(node, initializers) computing output = a_input @ weights_kn with `bits`-bit block weights."""
    from onnx import helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, bits=bits)
    k, n = weights_kn.shape
    packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(
        np.ascontiguousarray(weights_kn, dtype=np.float32)
    )
    initializers = [numpy_helper.from_array(packed, f"{prefix}_Q{bits}"), numpy_helper.from_array(scales, f"{prefix}_scales")]
    inputs = [a_input, initializers[0].name, initializers[1].name]
    if not symmetric:
        initializers.append(numpy_helper.from_array(zero_points, f"{prefix}_zero_points"))
        inputs.append(initializers[2].name)
    attributes = {"K": k, "N": n, "bits": bits, "block_size": block_size}
    if ACCURACY_LEVEL:
        attributes["accuracy_level"] = ACCURACY_LEVEL
    node = helper.make_node("MatMulNBits", inputs, [output], name=f"{name}_Q{bits}", domain=MS_DOMAIN, **attributes)
    return node, initializers


def _dynamic_quantize_matmul(weights_kn: np.ndarray, a_input: str, output: str, name: str, prefix: str, node=None,
                             unsigned: bool = True):
    """(node, initializers) computing output = a_input @ weights_kn with int8 per-column weights
    (DynamicQuantizeMatMul: the activation is quantized to uint8 per call, MLAS's integer GEMM).

    The weights are symmetric int8 values q in [-127, 127], stored as uint8 q + 128 with zero point 128
    (unsigned=True, INT8_WEIGHT_FORMAT): the same products, but MLAS runs its u8u8 kernel, which cannot
    saturate. Stored as int8 (unsigned=False, scheme 1) they run the u8s8 kernel, whose pair sums saturate
    on x86 CPUs without VNNI (medgemma_triton/runtime/host_check.py)."""
    from onnx import helper, numpy_helper

    k, n = weights_kn.shape
    scales = np.empty(n, dtype=np.float32)
    quantized = np.empty((k, n), dtype=np.uint8 if unsigned else np.int8)
    offset = INT8_ZERO_POINT if unsigned else 0
    for start in range(0, n, _COLUMN_CHUNK):  # bounded fp32 temporaries: the 4B head is 2.7 GB in fp32
        columns = np.asarray(weights_kn[:, start:start + _COLUMN_CHUNK], dtype=np.float32)
        chunk_scales = np.abs(columns).max(axis=0) / 127.0
        chunk_scales[chunk_scales == 0] = 1.0  # an all-zero column quantizes to zeros with any scale
        scales[start:start + _COLUMN_CHUNK] = chunk_scales
        quantized[:, start:start + _COLUMN_CHUNK] = np.clip(np.rint(columns / chunk_scales), -127, 127) + offset
    initializers = [
        numpy_helper.from_array(quantized, f"{prefix}_Q8"),
        numpy_helper.from_array(scales, f"{prefix}_scales"),
        numpy_helper.from_array(np.full(n, offset, dtype=quantized.dtype), f"{prefix}_zero_points"),
    ]
    quantized_node = helper.make_node(
        "DynamicQuantizeMatMul", [a_input, *(t.name for t in initializers)], [output],
        name=f"{name}_Q8", domain=MS_DOMAIN,
    )
    return quantized_node, initializers


def _gather_block_quantized(table: np.ndarray, indices: str, output: str, name: str, prefix: str,
                            block_size: int = BLOCK_SIZE, symmetric: bool = IS_SYMMETRIC):
    """(node, initializers) for an int4 embedding lookup, blocks along the hidden axis."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    with np.errstate(divide="ignore", invalid="ignore"):  # all-zero blocks: handled by np.where inside
        quantized, scales, zero_points = DefaultWeightOnlyQuantizer.quantize_ndarray(
            np.asarray(table, dtype=np.float32), 1, block_size, symmetric
        )
    qtype = TensorProto.INT4 if symmetric else TensorProto.UINT4
    initializers = [
        helper.make_tensor(f"{prefix}_Q4", qtype, table.shape, quantized.tobytes(), True),
        numpy_helper.from_array(scales, f"{prefix}_scales"),
    ]
    if not symmetric:
        initializers.append(helper.make_tensor(f"{prefix}_zero_points", qtype, scales.shape, zero_points.tobytes(), True))
    inputs = [initializers[0].name, indices, initializers[1].name] + ([initializers[2].name] if not symmetric else [])
    node = helper.make_node(
        "GatherBlockQuantized", inputs, [output], name=f"{name}_Q4", domain=MS_DOMAIN,
        gather_axis=0, quantize_axis=1, block_size=block_size,
    )
    return node, initializers


def projection_name(node) -> str | None:
    """'v_proj' for a MatMul the exporter traced from `layers.3.self_attn.v_proj` (node metadata)."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in ast.literal_eval(prop.value) if s]
            for scope in reversed(scopes):
                if scope.startswith("layers."):
                    return scope.rsplit(".", 1)[-1]
    return None


def _attribute(node, name: str, default):
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def quantize_decoder_int4(
    fp32_path: str | Path,
    out_path: str | Path,
    spec=None,
    progress=print,
    *,
    lm_head: str = LM_HEAD,
    embedding_int4: bool = EMBEDDING_INT4,
    block_size: int = BLOCK_SIZE,
    symmetric: bool = IS_SYMMETRIC,
    int8_projections: tuple[str, ...] = (),
    int8_weights: str = "unsigned",
    **graph_options,
) -> Path:
    """Write an int4 copy of the fp32 decoder at fp32_path to out_path (+ out_path.data).
    block_size: the projections' and the embedding's (the LM head's is HEAD_BLOCK_SIZE).
    graph_options: rewrite_decoder's merge_shared_input / fuse_norms."""
    check_block_size(block_size)

    def bits_of(node) -> int:
        return 8 if projection_name(node) in int8_projections else BITS

    def projection(weights_kn, a_input, output, name, prefix, node):
        return _matmul_nbits(weights_kn, a_input, output, name, prefix, bits_of(node), block_size, symmetric)

    def int4_head(weights_kn, a_input, output, name, prefix, node):
        return _matmul_nbits(weights_kn, a_input, output, name, prefix, BITS, block_size, symmetric)

    unsigned = stores_unsigned(int8_weights)

    def int8_head(weights_kn, a_input, output, name, prefix, node):
        return _dynamic_quantize_matmul(weights_kn, a_input, output, name, prefix, node, unsigned=unsigned)

    def int8_block_head(weights_kn, a_input, output, name, prefix, node):
        block = min(HEAD_BLOCK_SIZE, 1 << (weights_kn.shape[0].bit_length() - 1))  # no padding past a small K
        return _matmul_nbits(weights_kn, a_input, output, name, prefix, HEAD_BITS, block, symmetric)

    # lm_head -> (rewrite of the head's Gemm or None to keep it fp32, its name in progress lines)

    heads = {"int8-blocks": (int8_block_head, f"int8 (MatMulNBits, blocks of {HEAD_BLOCK_SIZE})"),
             "int8": (int8_head, "int8 (DynamicQuantizeMatMul)"), "int4": (int4_head, None), "fp32": (None, None)}
    if lm_head not in heads:
        raise ValueError(f"lm_head={lm_head!r}; expected one of {tuple(heads)}")
    head, head_label = heads[lm_head]

    def embedding(table, indices, output, name, prefix, node):
        return _gather_block_quantized(table, indices, output, name, prefix, block_size, symmetric)

    return rewrite_decoder(
        fp32_path, out_path, f"int4 (block {block_size})", projection,
        head, embedding if embedding_int4 else None, progress, head_label=head_label, projection_key=bits_of,
        **graph_options,
    )


def rewrite_decoder(fp32_path, out_path, label: str, projection, lm_head=None, embedding=None, progress=print,
                    head_label: str | None = None, *, merge_shared_input: bool = MERGE_SHARED_INPUT,
                    projection_key=None, fuse_norms: bool = FUSE_NORMS, metadata: dict | None = None) -> Path:
    """Replace the fp32 decoder's weight-bearing nodes and write the result to out_path (+ .data).

    projection / lm_head: (weights [K, N], a_input, output, name, prefix, node) -> (node, initializers),
    for every MatMul with a constant fp32 weight and for the tied head's Gemm (transB=1, given as its
    [K=hidden, N=vocab] view); embedding: (table [vocab, hidden], indices, output, name, prefix, node)
    for the embedding Gather. None leaves that node fp32. head_label names the head's format (default: label).
    merge_shared_input: MatMuls reading the same tensor (q/k/v, gate/up) become one product over their
    weights concatenated along N, then a Split; MatMuls whose projection_key(node) differs are not merged.
    fuse_norms: RMSNorms become SimplifiedLayerNormalization (see fuse_decoder_norms).
    metadata: entries for the graph's metadata_props (read by ONNX Runtime sessions: runtime/decoder.py).
    """
    import onnx

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    started = time.perf_counter()
    model = onnx.load(str(fp32_path), load_external_data=False)
    graph = model.graph
    weights = _Weights(model, fp32_path.parent)

    new_nodes, new_initializers = [], []
    counts = {"MatMul": 0, "lm_head": 0, "embedding": 0}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and weights.is_float_matrix(n.input[1])]
    groups = _shared_input_groups(matmuls, projection_key) if merge_shared_input else [[n] for n in matmuls]
    first_of = {id(group[0]): group for group in groups}
    merged = ""
    if len(groups) < len(matmuls):
        merged = f" as {len(groups)} products (projections reading one input concatenated)"
    progress(f"quantizing {len(matmuls)} decoder MatMuls to {label}{merged}")
    for node in graph.node:
        replaced = None
        if node.op_type == "MatMul" and weights.is_float_matrix(node.input[1]):
            if id(node) in first_of:  # the group's other members are replaced here too
                replaced = _grouped_projection(first_of[id(node)], weights, projection)
                counts["MatMul"] += len(first_of[id(node)])
            else:
                continue
        elif (
            lm_head is not None and node.op_type == "Gemm" and len(node.input) == 2
            and weights.is_float_matrix(node.input[1])
            and _attribute(node, "transB", 0) == 1 and _attribute(node, "transA", 0) == 0
            and _attribute(node, "alpha", 1.0) == 1.0
        ):
            table = weights.array(node.input[1])  # [vocab, hidden]
            progress(f"quantizing the LM head ({table.shape[0]} x {table.shape[1]}) to {head_label or label}")
            replaced = lm_head(table.T, node.input[0], node.output[0], node.name or "lm_head", "lm_head", node)
            counts["lm_head"] += 1
        elif (
            embedding is not None and node.op_type == "Gather" and weights.is_float_matrix(node.input[0])
            and _attribute(node, "axis", 0) == 0
        ):
            progress("quantizing the embedding table to int4 (GatherBlockQuantized)")
            replaced = embedding(weights.array(node.input[0]), node.input[1], node.output[0],
                                 node.name or "embedding", "embedding", node)
            counts["embedding"] += 1
        if replaced is None:
            new_nodes.append(node)
        else:
            nodes, initializers = replaced
            new_nodes.extend(nodes if isinstance(nodes, list) else [nodes])
            new_initializers.extend(initializers)
    if lm_head is not None and counts["lm_head"] != 1:
        raise RuntimeError(f"expected one tied LM-head Gemm in {fp32_path.name}, found {counts['lm_head']}")
    if embedding is not None and counts["embedding"] != 1:
        raise RuntimeError(f"expected one embedding Gather in {fp32_path.name}, found {counts['embedding']}")
    if counts["MatMul"] == 0:
        raise RuntimeError(f"no constant-weight MatMul in {fp32_path.name}: is it the fp32 decoder export?")

    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    write_rewritten(model, new_nodes, new_initializers, fp32_path, out_path)
    if fuse_norms:
        fuse_decoder_norms(out_path)
    progress(
        f"{label} decoder written: {counts['MatMul']} MatMuls, LM head {'quantized' if counts['lm_head'] else 'fp32'}, "
        f"embedding {'int4' if counts['embedding'] else 'fp32'} ({time.perf_counter() - started:.0f} s)"
    )
    return out_path


def _shared_input_groups(matmuls, projection_key=None) -> list[list]:
    """The MatMuls grouped by (input, projection_key(node)), in graph order."""
    groups: dict = {}
    for node in matmuls:
        groups.setdefault((node.input[0], projection_key(node) if projection_key else None), []).append(node)
    return list(groups.values())


def _grouped_projection(group, weights: _Weights, projection):
    """(nodes, initializers) replacing MatMuls that read one input: a single product over their weights
    concatenated along N, split back into their outputs. Every format here quantizes each output column
    on its own (blocks along K, or one scale per column), and the products quantize the shared input
    the same way, so the split outputs equal the separate products bit for bit."""
    from onnx import helper, numpy_helper

    first = group[0]
    name, prefix = first.name or first.output[0], first.input[1]
    if len(group) == 1:
        return projection(weights.array(prefix), first.input[0], first.output[0], name, prefix, first)
    matrices = [weights.array(node.input[1]) for node in group]
    merged = f"{first.output[0]}_merged"
    node, initializers = projection(np.concatenate(matrices, axis=1), first.input[0], merged, f"{name}_merged",
                                    f"{prefix}_merged", first)
    sizes = numpy_helper.from_array(np.array([m.shape[1] for m in matrices], dtype=np.int64), f"{prefix}_split")
    split = helper.make_node("Split", [merged, sizes.name], [n.output[0] for n in group], name=f"{name}_split",
                             axis=-1)
    return [node, split], [*initializers, sizes]


def fuse_decoder_norms(path: Path) -> int:
    """Rewrite the decoder graph at `path` in place with every RMSNorm as ONNX Runtime's
    SimplifiedLayerNormalization (SkipSimplifiedLayerNormalization where a residual Add feeds it),
    by onnxscript's own rules; returns the number of norms. Only the graph file changes: the weights
    stay references into its .data. Gemma 3 has 6 norms per layer and a final one; fewer fused means
    the exporter's pattern is not what the rules expect, and the export fails rather than ship it half done.

    Not applied to the fp32 export (the token-for-token reference): it moves fp32 logits by ~5e-5."""
    import logging
    import os

    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    path = Path(path)
    model = ir.load(path)
    layers = sum(1 for v in model.graph.outputs if v.name.startswith("present.") and v.name.endswith(".key"))
    fuse_rms_normalization(model)
    fuse_skip_rms_normalization(model)
    removal_log = logging.getLogger("onnx_ir.passes.common.unused_removal")
    level = removal_log.level
    removal_log.setLevel(logging.WARNING)  # "Removed 2 unused nodes" (the norms' dead scalars) is noise here
    try:
        RemoveUnusedNodesPass()(model)
    finally:
        removal_log.setLevel(level)
    ops = [node.op_type for node in model.graph]
    fused = ops.count("SimplifiedLayerNormalization") + ops.count("SkipSimplifiedLayerNormalization")
    if fused != 6 * layers + 1 or "Pow" in ops:
        raise RuntimeError(f"fused {fused} of {6 * layers + 1} RMSNorms in {path.name} ({ops.count('Pow')} Pow "
                           "left): the exporter's norm is not what onnxscript's fusion rules expect")
    staging = path.with_name(path.name + ".fusing")
    ir.save(model, staging)  # external tensors are written as references, not copied
    os.replace(staging, path)
    return fused


def write_rewritten(model, new_nodes, new_initializers, fp32_path: Path, out_path: Path) -> None:
    """Save `model` with `new_nodes`, the initializers they still use and `new_initializers` to out_path
    (+ out_path.data): the fp32 weights that stay (norms, ...) are read in from fp32_path's external data."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    graph = model.graph
    weights = _Weights(model, fp32_path.parent)
    used = {name for node in new_nodes for name in node.input}
    kept = []
    for tensor in graph.initializer:
        if tensor.name in used:
            if uses_external_data(tensor):
                weights.load(tensor.name)
            kept.append(tensor)
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_initializers)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    model.ir_version = IR_VERSION  # >= 10 for int4 tensors; explicit so onnx's default never leaks in

    out_path.parent.mkdir(parents=True, exist_ok=True)
    data_name = out_path.name + ".data"
    (out_path.parent / data_name).unlink(missing_ok=True)
    onnx.save_model(
        model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=data_name, size_threshold=1024,
    )
    (out_path.parent / data_name).chmod(0o644)  # onnx creates it 0600; Triton may run as another user
