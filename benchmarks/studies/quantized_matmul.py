#!/usr/bin/env python
"""Which quantized MatMul suits this CPU: int4 MatMulNBits vs int8 DynamicQuantizeMatMul, by rows.

The int4 export runs its projections on ONNX Runtime's MatMulNBits and the int8 export (and int4's LM
head) on DynamicQuantizeMatMul. Both are built here by the exports' own functions (export/int4.py), so
the nodes and attributes are the shipped ones; MatMulNBits is also timed at other block sizes, and the
int8 product also with its weights stored signed (the scheme before 2: MLAS's u8s8 kernel, fast on VNNI
and AMX CPUs, saturating on x86 without VNNI, where its error column shows it). The report names the
CPU class: the kernels, and so these numbers, differ between classes. Rows:
1 = a single-stream decode step, 4 = a batch-4 decode step, 205 = a prefill of a 128-token prompt with
one image. Per row count and kernel it prints the median time of one product, its time relative to
int8, and its relative error against the fp32 product (numpy).

Both read the weights once per call, so at 1 row they are bound by memory bandwidth; with more rows
MatMulNBits (ORT 1.31, x86) does much more work per row than MLAS's integer GEMM, which is why int4
prefills and batches slower than int8 on the development VM. Run it on your hardware before choosing.

    python benchmarks/studies/quantized_matmul.py --shape 640 2048 --rows 1 4 16 205 --output quantized_matmul.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from medgemma_triton.export import int4
from medgemma_triton.export.host_check import product_model
from medgemma_triton.runtime.host_check import describe_cpu

INT8 = "int8 DynamicQuantizeMatMul (shipped)"
INT8_SIGNED = "int8 DynamicQuantizeMatMul, signed storage"


def _session(node, initializers, k: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto

    model = product_model([node], initializers, {node.input[0]: (TensorProto.FLOAT, ["rows", k])},
                          {node.output[0]: TensorProto.FLOAT})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def kernels(weights: np.ndarray, block_sizes: list[int]) -> dict[str, tuple]:
    """name -> (node, initializers) for every kernel compared, all computing a @ weights."""
    built = {
        INT8: int4._dynamic_quantize_matmul(weights, "a", "y", "int8", "w"),
        # the same int8 values stored signed: MLAS's u8s8 kernel, which saturates on x86 without VNNI
        INT8_SIGNED: int4._dynamic_quantize_matmul(weights, "a", "y", "int8", "w", unsigned=False),
    }
    for block in block_sizes:
        shipped = " (shipped)" if block == int4.BLOCK_SIZE else ""
        built[f"int4 MatMulNBits block {block}{shipped}"] = int4._matmul_nbits(weights, "a", "y", "int4", "w", block_size=block)
    return built


def measure(k: int, n: int, rows: list[int], block_sizes: list[int], threads: int, repeats: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    weights = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    sessions = {name: _session(*built, k, threads) for name, built in kernels(weights, block_sizes).items()}
    results = []
    for count in rows:
        a = rng.standard_normal((count, k)).astype(np.float32)
        reference = a @ weights
        for name, session in sessions.items():
            out = session.run(None, {"a": a})[0]  # warm-up, and the error
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                session.run(None, {"a": a})
                times.append(time.perf_counter() - started)
            results.append({
                "rows": count, "kernel": name, "ms": round(statistics.median(times) * 1e3, 4),
                "relative_error": float(np.linalg.norm(out - reference) / np.linalg.norm(reference)),
            })
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[640, 2048], metavar=("K", "N"),
                        help="weights [K, N]: dev's gate/up projection by default; the 4B's is 2560 10240")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 205])
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--output", type=Path, help="write the results as JSON")
    args = parser.parse_args(argv)

    import onnxruntime

    k, n = args.shape
    results = measure(k, n, args.rows, args.block_sizes, args.threads, args.repeats)
    cpu = describe_cpu()
    print(f"[{k} x {n}] weights, {args.threads} thread(s), ONNX Runtime {onnxruntime.__version__}, "
          f"median of {args.repeats}; CPU: {cpu}")
    print(f"{'rows':>5}  {'kernel':40} {'ms':>9} {'vs int8':>8} {'rel. error':>10}")
    for count in args.rows:
        at = [r for r in results if r["rows"] == count]
        int8_ms = next(r["ms"] for r in at if r["kernel"] == INT8)
        for r in at:
            print(f"{count:>5}  {r['kernel']:40} {r['ms']:>9.3f} {r['ms'] / int8_ms:>7.2f}x {r['relative_error']:>10.4f}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({
            "shape": [k, n], "threads": args.threads, "onnxruntime": onnxruntime.__version__, "cpu": cpu,
            "results": results,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
