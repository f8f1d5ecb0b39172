#!/usr/bin/env python
"""What an in-place KV cache would save per decode step: the exported attention vs GroupQueryAttention.

The cpu decoder appends each step's key/value with a `Concat` (a copy of the whole past, every layer,
every step), then attends: scores against the transposed keys, scale, mask, Softmax, values
(export/decoder.py; here as FusedMatMul with the scale folded in, Add, Softmax, MatMul). ONNX
Runtime's com.microsoft GroupQueryAttention can instead write the new row into a preallocated
[batch, kv_heads, max_length, head_dim] buffer that is bound as both its past input and its present
output (IOBinding), so nothing is copied. This times only that part of a batch-1 decode
step, for every layer of the geometry at once, both ways, checks that they agree, and prints the
difference: the most that moving the decoder onto GroupQueryAttention could take off a step.

It is a bound, not a plan: GroupQueryAttention masks causally only, so the bidirectional attention
between image tokens in a multimodal prefill (docs/design.md) would stay on the exported graph, and its
buffer grows to max_length on sliding-window layers too.

A geometry is `4b` (google/medgemma-4b-it's text config, medgemma_triton/data/medgemma-4b-it.config.json)
or a checkpoint directory (read through medgemma_triton.spec); the weights play no part.

    python benchmarks/studies/kv_attention.py --geometry .cache/test-artifacts/checkpoints/dev 4b \
        --contexts 100 400 1000 --output kv_attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from decoder_fullsize import published_4b  # benchmarks/: the package's 4B config, also from a bare checkout

MS_DOMAIN = "com.microsoft"


def geometry(name: str) -> tuple[str, int, int, int, int]:
    """(label, layers, attention heads, KV heads, head_dim) of `4b` or of a checkpoint directory."""
    if name == "4b":
        t = published_4b()["text_config"]
        return ("4b", t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"])
    from medgemma_triton.spec import ModelSpec

    text = ModelSpec.from_checkpoint(name).text
    return (Path(name).name, text.num_layers, text.num_heads, text.num_kv_heads, text.head_dim)


def _model(nodes, inputs, outputs):
    from onnx import helper

    graph = helper.make_graph(nodes, "attention", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)],
                             ir_version=10)


def concat_attention(layers: int, heads: int, kv_heads: int, head_dim: int, context: int):
    """The exported form, per layer: Concat the new row onto the past, then scores, mask, softmax, values."""
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    groups = heads // kv_heads
    inputs = [helper.make_tensor_value_info("q", f, [1, kv_heads, groups, head_dim]),
              helper.make_tensor_value_info("mask", f, [1, 1, 1, context + 1])]
    nodes, outputs = [], []
    for i in range(layers):
        for name, length in (("k", 1), ("v", 1), ("past_k", context), ("past_v", context)):
            inputs.append(helper.make_tensor_value_info(f"{name}{i}", f, [1, kv_heads, length, head_dim]))
        nodes += [
            helper.make_node("Concat", [f"past_k{i}", f"k{i}"], [f"present_k{i}"], axis=2),
            helper.make_node("Concat", [f"past_v{i}", f"v{i}"], [f"present_v{i}"], axis=2),
            helper.make_node("FusedMatMul", ["q", f"present_k{i}"], [f"scores{i}"], domain=MS_DOMAIN, transB=1,
                             alpha=head_dim ** -0.5),
            helper.make_node("Add", [f"scores{i}", "mask"], [f"masked{i}"]),
            helper.make_node("Softmax", [f"masked{i}"], [f"probs{i}"], axis=-1),
            helper.make_node("MatMul", [f"probs{i}", f"present_v{i}"], [f"out{i}"]),
        ]
        outputs += [helper.make_tensor_value_info(f"{name}{i}", f, None) for name in ("out", "present_k", "present_v")]
    return _model(nodes, inputs, outputs)


def gqa_attention(layers: int, heads: int, kv_heads: int, head_dim: int, max_length: int):
    """GroupQueryAttention per layer over a shared past/present buffer of max_length rows."""
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("q", f, [1, 1, heads * head_dim]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_length", TensorProto.INT32, [])]
    nodes, outputs = [], []
    for i in range(layers):
        inputs += [helper.make_tensor_value_info(f"k{i}", f, [1, 1, kv_heads * head_dim]),
                   helper.make_tensor_value_info(f"v{i}", f, [1, 1, kv_heads * head_dim]),
                   helper.make_tensor_value_info(f"past_k{i}", f, [1, kv_heads, max_length, head_dim]),
                   helper.make_tensor_value_info(f"past_v{i}", f, [1, kv_heads, max_length, head_dim])]
        nodes.append(helper.make_node(
            "GroupQueryAttention", ["q", f"k{i}", f"v{i}", f"past_k{i}", f"past_v{i}", "seqlens_k", "total_length"],
            [f"out{i}", f"present_k{i}", f"present_v{i}"], domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads,
            scale=head_dim ** -0.5))
        outputs += [helper.make_tensor_value_info(f"out{i}", f, None),
                    helper.make_tensor_value_info(f"present_k{i}", f, [1, kv_heads, max_length, head_dim]),
                    helper.make_tensor_value_info(f"present_v{i}", f, [1, kv_heads, max_length, head_dim])]
    return _model(nodes, inputs, outputs)


def _median_ms(fn, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(shape: tuple[str, int, int, int, int], context: int, threads: int, repeats: int, seed: int = 0) -> dict:
    import onnxruntime as ort

    label, layers, heads, kv_heads, head_dim = shape
    max_length = context + 1
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    q = normal(1, kv_heads, heads // kv_heads, head_dim)
    rows = [{name: normal(1, kv_heads, length, head_dim) for name, length in
             (("k", 1), ("v", 1), ("past_k", context), ("past_v", context))} for _ in range(layers)]

    exported = ort.InferenceSession(concat_attention(layers, heads, kv_heads, head_dim, context).SerializeToString(),
                                    options, providers=["CPUExecutionProvider"])
    feeds = {"q": q, "mask": np.zeros((1, 1, 1, context + 1), np.float32)}
    for i, layer in enumerate(rows):
        feeds.update({f"{name}{i}": value for name, value in layer.items()})
    expected = exported.run([f"out{i}" for i in range(layers)], feeds)

    fused = ort.InferenceSession(gqa_attention(layers, heads, kv_heads, head_dim, max_length).SerializeToString(),
                                 options, providers=["CPUExecutionProvider"])
    binding = fused.io_binding()
    binding.bind_cpu_input("q", q.reshape(1, 1, heads * head_dim))  # GQA groups query heads the same way
    binding.bind_cpu_input("seqlens_k", np.array([context], np.int32))  # total length - 1
    binding.bind_cpu_input("total_length", np.array(context + 1, np.int32))
    buffers = {}  # each numpy array owns the memory its OrtValue points at
    for i, layer in enumerate(rows):
        binding.bind_cpu_input(f"k{i}", layer["k"].reshape(1, 1, -1))
        binding.bind_cpu_input(f"v{i}", layer["v"].reshape(1, 1, -1))
        for name in ("k", "v"):
            buffer = np.zeros((1, kv_heads, max_length, head_dim), np.float32)
            buffer[:, :, :context] = layer[f"past_{name}"]
            buffers[f"{name}{i}"] = (buffer, ort.OrtValue.ortvalue_from_numpy(buffer))
            binding.bind_ortvalue_input(f"past_{name}{i}", buffers[f"{name}{i}"][1])
    names = [o.name for o in fused.get_outputs()]
    for name in names:  # outputs come back in binding order
        if name.startswith("present_"):
            binding.bind_ortvalue_output(name, buffers[name.removeprefix("present_")][1])
        else:
            binding.bind_output(name)
    fused.run_with_iobinding(binding)
    outputs = dict(zip(names, binding.copy_outputs_to_cpu()))
    difference = max(float(np.abs(outputs[f"out{i}"].reshape(-1) - expected[i].reshape(-1)).max()) for i in range(layers))
    in_place = all(np.array_equal(buffers[f"k{i}"][0][:, :, context], rows[i]["k"][:, :, 0]) for i in range(layers))

    exported_ms = _median_ms(lambda: exported.run(None, feeds), repeats)
    fused_ms = _median_ms(lambda: fused.run_with_iobinding(binding), repeats)
    kv_bytes = 2 * layers * kv_heads * context * head_dim * 4
    return {"geometry": label, "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "context": context, "threads": threads, "kv_mb": round(kv_bytes / 1e6, 1),
            "exported_ms": round(exported_ms, 3), "gqa_ms": round(fused_ms, 3),
            "saved_ms": round(exported_ms - fused_ms, 3), "max_abs_diff": difference, "written_in_place": in_place}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--geometry", nargs="+", default=["4b"], help="`4b` or checkpoint directories")
    parser.add_argument("--contexts", nargs="+", type=int, default=[100, 400, 1000], help="tokens already cached")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)

    results = []
    print(f"{'geometry':8s} {'context':>7s} {'KV MB':>7s} {'exported ms':>11s} {'GQA ms':>8s} {'saved ms':>8s} {'max|diff|':>9s}")
    for name in args.geometry:
        shape = geometry(name)
        for context in args.contexts:
            r = measure(shape, context, args.threads, args.repeats)
            results.append(r)
            print(f"{r['geometry']:8s} {context:7d} {r['kv_mb']:7.1f} {r['exported_ms']:11.3f} {r['gqa_ms']:8.3f} "
                  f"{r['saved_ms']:8.3f} {r['max_abs_diff']:9.1e}", flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
