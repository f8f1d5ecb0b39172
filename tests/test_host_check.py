"""Quantized decoders on every CPU: int8 weights whose products no kernel can saturate, the host check a
quantized decoder runs when it opens, and the refusal of exports of the old scheme.

The kernel arithmetic is emulated in numpy (saturating_pair_sums), so these tests hold on every CPU
class; the host check runs this host's real kernels, and passes wherever they are right.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from medgemma_triton.export.host_check import TOLERANCES
from medgemma_triton.runtime import host_check
from medgemma_triton.runtime.decoder import OnnxDecoder
from medgemma_triton.spec import ModelSpec

INT16 = (-(1 << 15), (1 << 15) - 1)


def saturating_pair_sums(weights: np.ndarray) -> tuple[int, int]:
    """The largest and smallest int8-weight pair a[k]*b[k] + a[k+1]*b[k+1] over any uint8 activation: x86
    kernels without VNNI form it in int16 (vpmaddubsw), saturating past INT16. The worst activation is
    255 where the weight has the sign sought and 0 elsewhere."""
    b = weights.astype(np.int32)
    if b.shape[0] % 2:
        b = np.concatenate([b, np.zeros((1, b.shape[1]), np.int32)])
    pairs = b.reshape(-1, 2, b.shape[1])
    return int(255 * np.clip(pairs, 0, None).sum(axis=1).max()), int(255 * np.clip(pairs, None, 0).sum(axis=1).min())


def int8_products(model_path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(node name, weights, zero points) of every DynamicQuantizeMatMul in the graph."""
    model = onnx.load(str(model_path))
    tensors = {t.name: t for t in model.graph.initializer}
    return [
        (node.name, numpy_helper.to_array(tensors[node.input[1]]), numpy_helper.to_array(tensors[node.input[3]]))
        for node in model.graph.node if node.op_type == "DynamicQuantizeMatMul"
    ]


def assert_no_pair_saturates(model_path) -> int:
    products = int8_products(model_path)
    assert products, f"{model_path} has no DynamicQuantizeMatMul"
    for name, weights, zero_point in products:
        if weights.dtype == np.int8:  # u8s8: each pair is an int16 and must not saturate
            largest, smallest = saturating_pair_sums(weights)
            assert INT16[0] <= smallest and largest <= INT16[1], (name, smallest, largest)
        else:  # u8u8 widens its products before summing them; the storage must be the shipped format
            assert weights.dtype == np.uint8 and (zero_point == host_check.INT8_ZERO_POINT).all(), name
            assert weights.min() >= host_check.INT8_ZERO_POINT - 127, name
    return len(products)


def test_the_pair_sum_emulation_flags_full_range_int8_weights(tiny_onnx):
    """The old scheme (int8 weights in [-127, 127], stored signed) saturates the u8s8 pair sum on the
    tiny model's real head weights: the emulation would have caught the AVX2 failure on any machine."""
    from medgemma_triton.export.int4 import _Weights, _dynamic_quantize_matmul

    fp32 = onnx.load(str(tiny_onnx / "decoder.onnx"), load_external_data=False)
    (head,) = [n for n in fp32.graph.node if n.op_type == "Gemm"]
    table = _Weights(fp32, tiny_onnx).array(head.input[1])
    _, old = _dynamic_quantize_matmul(table.T, "a", "y", "head", "head", unsigned=False)
    largest, smallest = saturating_pair_sums(numpy_helper.to_array(old[0]))
    assert largest > INT16[1] or smallest < INT16[0]
    _, new = _dynamic_quantize_matmul(table.T, "a", "y", "head", "head")
    stored, scales = numpy_helper.to_array(new[0]), numpy_helper.to_array(new[1])
    assert stored.dtype == np.uint8 and (numpy_helper.to_array(new[2]) == host_check.INT8_ZERO_POINT).all()
    # the same int8 values as before, only stored unsigned
    np.testing.assert_array_equal(stored.astype(np.int16) - 128, numpy_helper.to_array(old[0]))
    np.testing.assert_array_equal(scales, numpy_helper.to_array(old[1]))


def test_int8_and_int4_exports_cannot_saturate(tiny_onnx_int8, tiny_onnx_int4):
    assert assert_no_pair_saturates(tiny_onnx_int8 / "decoder.onnx") > 1
    # int4's LM head is 8-bit MatMulNBits (export/int4.py): no u8s8 product at all; its own kernels are
    # the host check's MatMulNBits8
    assert not int8_products(tiny_onnx_int4 / "decoder.onnx")


@pytest.mark.slow
def test_dev_int8_export_cannot_saturate(dev_decoder_int8):
    assert_no_pair_saturates(dev_decoder_int8 / "decoder.onnx")


def test_quantized_exports_carry_a_host_check_that_passes_here(tiny_onnx_int8, tiny_onnx_int4, tiny_onnx):
    expected = {"int8": {"DynamicQuantizeMatMul", "GatherBlockQuantized"},
                "int4": {"MatMulNBits8", "GatherBlockQuantized", "MatMulNBits"}}
    for precision, export in (("int8", tiny_onnx_int8), ("int4", tiny_onnx_int4)):
        manifest = json.loads((export / "manifest.json").read_text())
        assert manifest["quantization"]["scheme"] == host_check.QUANTIZATION_SCHEME
        assert manifest["quantization"]["int8_weights"] == host_check.INT8_WEIGHT_FORMAT
        assert {host_check.CHECK_MODEL, host_check.CHECK_DATA} <= set(manifest["files"])
        result = host_check.check_decoder_export(export / "decoder.onnx")
        assert set(result.relative_errors) == expected[precision]
        for kind, error in result.relative_errors.items():
            assert 0 < error <= result.tolerances[kind], (precision, kind)
    assert host_check.check_decoder_export(tiny_onnx / "decoder.onnx") is None  # fp32: nothing to check
    assert host_check.main([str(tiny_onnx_int4), "--repeats", "2"]) == 0  # the command users run


def test_the_host_check_command_reports_a_refusal(tiny_onnx_int8, tmp_path, capsys):
    export = _linked_copy(tiny_onnx_int8, tmp_path / "int8")
    corrupt_check_scales(export)
    assert host_check.main([str(export)]) == 1
    assert "refused: this CPU computes the quantized decoder's products wrong" in capsys.readouterr().out


def _linked_copy(export, destination):
    """A copy of an export directory whose large files are hard links (the check files are rewritten)."""
    shutil.copytree(export, destination, copy_function=os.link)
    for name in (host_check.CHECK_MODEL, host_check.CHECK_DATA, "manifest.json"):
        (destination / name).unlink()
        shutil.copy2(export / name, destination / name)
    return destination


def corrupt_check_scales(directory, factor: float = 1.5) -> None:
    """Multiply every scale of the host check's DynamicQuantizeMatMul by `factor`: a wrong product."""
    path = directory / host_check.CHECK_MODEL
    model = onnx.load(str(path))
    scaled = {n.input[2] for n in model.graph.node if n.op_type == "DynamicQuantizeMatMul"}
    for tensor in model.graph.initializer:
        if tensor.name in scaled:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(factor), tensor.name))
    onnx.save(model, str(path))


def test_a_wrong_product_refuses_the_decoder(tiny_checkpoint, tiny_onnx_int8, tmp_path):
    export = _linked_copy(tiny_onnx_int8, tmp_path / "int8")
    corrupt_check_scales(export)
    with pytest.raises(host_check.HostCheckError) as info:
        OnnxDecoder(export / "decoder.onnx", ModelSpec.from_checkpoint(tiny_checkpoint))
    message = str(info.value)
    assert "DynamicQuantizeMatMul: relative error" in message
    assert f"the limit is {TOLERANCES['DynamicQuantizeMatMul']:.3g}" in message
    for flag in host_check.cpu_features():
        assert flag in message
    assert "--precision fp32" in message and "--force" in message


def test_an_export_of_the_old_scheme_is_refused(tiny_checkpoint, tiny_onnx_int8, tmp_path):
    export = _linked_copy(tiny_onnx_int8, tmp_path / "int8")
    manifest = json.loads((export / "manifest.json").read_text())
    del manifest["quantization"]["scheme"]  # what exports before scheme 2 wrote
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(host_check.StaleExportError, match="scheme 1.*Rebuild it"):
        OnnxDecoder(export / "decoder.onnx", ModelSpec.from_checkpoint(tiny_checkpoint))


def test_the_served_llm_refuses_to_load_on_a_wrong_product(tiny_repository, tiny_onnx_int8, tmp_path):
    from medgemma_triton.repository.config import read_config, write_config
    from medgemma_triton.server.launcher import ServerError, TritonServer

    export = _linked_copy(tiny_onnx_int8, tmp_path / "int8")
    corrupt_check_scales(export)
    repository = tmp_path / "repo"
    shutil.copytree(tiny_repository, repository)
    config = read_config(repository / "llm" / "config.pbtxt")
    config.parameters["onnx_model"].string_value = str(export / "decoder.onnx")
    write_config(config, repository / "llm" / "config.pbtxt")
    with pytest.raises(ServerError, match="computes the quantized decoder's products wrong"):
        TritonServer(repository, ready_timeout_s=120).start()


def test_cpu_class_names_the_kernel_deciding_features():
    def named(**flags):
        return host_check.cpu_class({name: flags.get(name, False) for name in host_check.X86_FEATURES}, "x86_64")

    assert named(avx2=True) == "x86-64 AVX2 (no VNNI)"
    assert named(avx2=True, avx512bw=True) == "x86-64 AVX512BW (no VNNI)"
    assert named(avx2=True, avx512bw=True, avx512_vnni=True, amx_int8=True) == "x86-64 AVX512-VNNI + AMX"
    assert named(avx2=True, avx_vnni=True) == "x86-64 AVX-VNNI"
    assert host_check.cpu_class({"asimddp": True, "i8mm": False, "sve": False}, "aarch64") == "arm64 dotprod"
    assert host_check.cpu_model() in host_check.describe_cpu()


def test_signed_int8_storage_runs_only_where_the_u8s8_kernel_is_exact(tiny_checkpoint, tiny_onnx, tmp_path):
    """`--int8-weights signed`: the same int8 values stored signed run MLAS's u8s8 kernels (faster on VNNI
    and AMX CPUs). Which kernel runs decides the outcome, and this test says so: on a CPU with VNNI or
    AMX the host check passes; on x86 without them the pair sums saturate and the decoder is refused."""
    from medgemma_triton.export.onnx_export import export_onnx

    export = export_onnx(tiny_checkpoint, tmp_path / "int8-signed", precision="int8", fp32_source=tiny_onnx,
                         int8_weights="signed", progress=lambda _: None)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["quantization"]["int8_weights"] == host_check.INT8_STORAGES["signed"]
    assert {weights.dtype for _, weights, _ in int8_products(export / "decoder.onnx")} == {np.dtype(np.int8)}
    check = onnx.load(str(export / host_check.CHECK_MODEL))
    stored = {t.name: t.data_type for t in check.graph.initializer}
    (product,) = [n for n in check.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert stored[product.input[1]] == onnx.TensorProto.INT8  # the check runs the decoder's own storage
    # an unsigned export of the same checkpoint is not mistaken for it (the cache compares the storage)
    unsigned = export_onnx(tiny_checkpoint, export, precision="int8", fp32_source=tiny_onnx, progress=lambda _: None)
    assert {w.dtype for _, w, _ in int8_products(unsigned / "decoder.onnx")} == {np.dtype(np.uint8)}
    signed = export_onnx(tiny_checkpoint, tmp_path / "again", precision="int8", fp32_source=tiny_onnx,
                         int8_weights="signed", progress=lambda _: None)

    features = host_check.cpu_features()
    exact = any(features.get(name) for name in ("avx512_vnni", "avx_vnni", "amx_int8")) or not features.get("avx2")
    if exact:
        assert host_check.check_decoder_export(signed / "decoder.onnx") is not None
    else:
        with pytest.raises(host_check.HostCheckError, match="DynamicQuantizeMatMul"):
            host_check.check_decoder_export(signed / "decoder.onnx")


def test_int8_weights_option_is_the_cpu_profiles(tmp_path):
    from medgemma_triton.cli import main

    with pytest.raises(SystemExit):  # argparse: `build gpu` has no --int8-weights
        main(["build", "gpu", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "r"), "--int8-weights", "signed"])
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"), "--int8-weights", "s8"])
