"""Does this CPU compute a quantized decoder's products right? Checked whenever one is opened.

ONNX Runtime's MLAS picks its integer kernels per CPU. For uint8 activations and int8 weights (u8s8), on
x86 without VNNI (AVX2, or AVX512BW alone) it sums pairs of products in int16 (`vpmaddubsw`) and
saturates past 32767: a weight of 127 next to another large one gives a wrong sum there (2 x 255 x 127 =
64770), and the right one on VNNI or AMX CPUs (what that did to dev's int8 decoder, per CPU class:
docs/quantization.md). So every int8 weight the exports write is
stored as uint8 with zero point 128 (INT8_WEIGHT_FORMAT): the same values, but MLAS then runs its u8u8
kernel, whose products are widened before they are summed. The manifest records QUANTIZATION_SCHEME, and
an export of an older scheme is refused.

The check itself: the exporter writes CHECK_MODEL beside a quantized decoder, one node per quantized
operator kind the decoder uses (same attributes, the decoder's own K, weights quantized by the export's
own functions, columns of full-scale weights and an activation row of ones, the worst case of a pair
sum), and CHECK_DATA with their inputs, the fp32 products (numpy) and each kind's tolerance.
check_decoder_export runs them with this host's kernels and refuses a host whose products miss fp32 by
more than that. numpy and onnxruntime only: the serving processes have no onnx or torch.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INT8_WEIGHT_FORMAT = "uint8, zero point 128"
INT8_ZERO_POINT = 128
# int8 weight storages an export may choose: "unsigned" (INT8_WEIGHT_FORMAT, the default: right on every
# CPU) or "signed" (MLAS's u8s8 kernels: faster on CPUs with VNNI or AMX, wrong on x86 without VNNI,
# where the host check refuses it).
INT8_STORAGES = {"unsigned": INT8_WEIGHT_FORMAT, "signed": "int8 (u8s8 kernels: CPUs with VNNI or AMX only)"}
# 1: int8 weights stored as int8 (wrong products on x86 CPUs without VNNI); 2: as INT8_WEIGHT_FORMAT.
QUANTIZATION_SCHEME = 2
CHECK_MODEL = "decoder_check.onnx"
CHECK_DATA = "decoder_check.npz"
MANIFEST = "manifest.json"

# The x86 features that decide which integer kernel MLAS runs, and the arm64 ones.
X86_FEATURES = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
ARM_FEATURES = ("asimddp", "i8mm", "sve")


class StaleExportError(RuntimeError):
    """A quantized export written by an older quantization scheme: rebuild it."""


class HostCheckError(RuntimeError):
    """This host computes a quantized product wrong: serve another precision."""


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first value of each key in Linux's /proc/cpuinfo (the first CPU's); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_features() -> dict[str, bool]:
    """The kernel-deciding CPU flags of this host (Linux /proc/cpuinfo; empty elsewhere)."""
    info = _cpuinfo()
    if not info:
        return {}
    flags = set((info.get("flags") or info.get("Features") or "").split())  # x86 / arm64
    names = ARM_FEATURES if platform.machine() in ("aarch64", "arm64") else X86_FEATURES
    return {name: name in flags for name in names}


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine()


def cpu_class(features: dict[str, bool] | None = None, machine: str | None = None) -> str:
    """The CPU class that decides the integer kernels: a claim about int8/int4 speed or quality holds
    for one class. 'x86-64 AVX2 (no VNNI)', 'x86-64 AVX512-VNNI + AMX', 'arm64 dotprod', ..."""
    features = cpu_features() if features is None else features
    machine = machine or platform.machine()
    if machine in ("aarch64", "arm64"):
        extras = [label for name, label in (("asimddp", "dotprod"), ("i8mm", "i8mm"), ("sve", "sve")) if features.get(name)]
        return "arm64 " + (" + ".join(extras) if extras else "NEON")
    if not features:
        return machine
    if features.get("avx512_vnni") or features.get("avx_vnni"):
        label = "AVX512-VNNI" if features.get("avx512_vnni") else "AVX-VNNI"
        return f"x86-64 {label}" + (" + AMX" if features.get("amx_int8") else "")
    if features.get("avx512bw"):
        return "x86-64 AVX512BW (no VNNI)"
    if features.get("avx2"):
        return "x86-64 AVX2 (no VNNI)"
    return "x86-64 (no AVX2)"


def describe_cpu() -> str:
    """'AMD EPYC (x86-64 AVX2 (no VNNI); avx2 yes, avx512bw no, ...)', for messages and benchmark reports."""
    features = cpu_features()
    flags = ", ".join(f"{name} {'yes' if present else 'no'}" for name, present in features.items())
    return f"{cpu_model()} ({cpu_class(features)}" + (f"; {flags})" if flags else ")")


@dataclass
class HostCheckResult:
    relative_errors: dict[str, float]  # operator kind -> the worst row's |y - fp32| / |fp32|
    tolerances: dict[str, float]
    milliseconds: float  # session creation and run


def read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def check_decoder_export(model_path: str | Path, manifest: dict | None = None) -> HostCheckResult | None:
    """Refuse a quantized decoder of an older scheme (StaleExportError) or one whose products this host
    computes wrong (HostCheckError). None for an fp32 decoder or a graph with no manifest beside it."""
    model_path = Path(model_path)
    manifest = read_manifest(model_path.parent) if manifest is None else manifest
    if not manifest or manifest.get("precision", "fp32") == "fp32":
        return None
    scheme = (manifest.get("quantization") or {}).get("scheme", 1)
    if scheme != QUANTIZATION_SCHEME:
        raise StaleExportError(
            f"{model_path}: this {manifest['precision']} export uses quantization scheme {scheme}, whose int8 "
            f"weights overflow ONNX Runtime's integer kernels on x86 CPUs without VNNI; this version reads "
            f"scheme {QUANTIZATION_SCHEME}. Rebuild it: medgemma-triton build (or export) with the same "
            "--precision and --force"
        )
    return run_host_check(model_path.parent)


def run_host_check(directory: str | Path) -> HostCheckResult:
    """Run CHECK_MODEL's products on this host and compare them with fp32 (CHECK_DATA)."""
    import onnxruntime as ort

    directory = Path(directory)
    started = time.perf_counter()
    try:
        data = np.load(directory / CHECK_DATA, allow_pickle=False)
    except OSError as exc:
        raise StaleExportError(f"{directory}: the quantized export has no host check ({exc}); rebuild it") from None
    kinds = sorted(name.split(".", 1)[1] for name in data.files if name.startswith("tolerance."))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(directory / CHECK_MODEL), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: data[i.name] for i in session.get_inputs()}
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    errors, tolerances = {}, {}
    for kind in kinds:
        expected = data[f"expected.{kind}"].astype(np.float64)
        got = outputs[f"y.{kind}"].astype(np.float64)
        row_errors = np.linalg.norm(got - expected, axis=-1) / np.maximum(np.linalg.norm(expected, axis=-1), 1e-30)
        errors[kind] = float(np.nan_to_num(row_errors, nan=np.inf).max())
        tolerances[kind] = float(data[f"tolerance.{kind}"])
    result = HostCheckResult(errors, tolerances, (time.perf_counter() - started) * 1e3)
    failed = [kind for kind in kinds if not errors[kind] <= tolerances[kind]]
    if failed:
        details = "; ".join(f"{kind}: relative error {errors[kind]:.3g}, the limit is {tolerances[kind]:.3g}"
                            for kind in failed)
        raise HostCheckError(
            f"this CPU computes the quantized decoder's products wrong ({details}; {directory / CHECK_MODEL}). "
            f"CPU: {describe_cpu()}, ONNX Runtime {ort.__version__}. Serve this model at another precision "
            "(medgemma-triton build cpu --precision fp32), or rebuild the export with this package's version (--force)"
        )
    return result


def main(argv=None) -> int:
    """`python -m medgemma_triton.runtime.host_check EXPORT_DIR`: run an export's host check here."""
    import argparse
    import statistics

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("export", type=Path, help="a quantized export directory (decoder.onnx, manifest.json)")
    parser.add_argument("--repeats", type=int, default=10, help="runs to time (median reported)")
    args = parser.parse_args(argv)
    print(f"CPU: {describe_cpu()}")
    try:
        results = [check_decoder_export(args.export / "decoder.onnx") for _ in range(max(1, args.repeats))]
    except (StaleExportError, HostCheckError) as exc:
        print(f"refused: {exc}")
        return 1
    if results[0] is None:
        print(f"{args.export}: an fp32 export (or no manifest): nothing to check")
        return 0
    for kind, error in results[0].relative_errors.items():
        print(f"{kind:24s} relative error {error:.4f} (limit {results[0].tolerances[kind]:.3g})")
    print(f"{statistics.median(r.milliseconds for r in results):.1f} ms (median of {len(results)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
