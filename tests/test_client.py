"""The Python client (client/): request building, image encoding, error mapping, TLS wiring.

These need no server. Tests against a real Triton server are in the second half of the file.
"""

from __future__ import annotations

import asyncio
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor, triton_to_np_dtype

from medgemma_triton.client import (
    AsyncMedGemmaClient,
    DeadlineExceededError,
    DicomImage,
    InvalidArgumentError,
    MedGemmaClient,
    ServerError,
    UnavailableError,
    Window,
    build_request,
    dicom_to_png,
    encode_image,
)
from medgemma_triton.client.errors import CancelledError, from_triton
from medgemma_triton.contract import CLIENT_DTYPES, TOP_INPUTS
from medgemma_triton.runtime.limits import Limits

CONTRACT_INPUTS = {t.name: t for t in TOP_INPUTS}


def model_card_messages(image) -> list[dict]:
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"}, {"type": "image", "image": image}]},
    ]


def gradient_rgb(width=48, height=32) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 5 % 256, y * 7 % 256, (x + y) * 3 % 256], axis=-1).astype(np.uint8)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def tensors(request) -> dict:
    """name -> numpy values of each input tensor, read back from what tritonclient will send."""
    out = {}
    for tensor in request.inputs:
        datatype = tensor.datatype()
        raw = tensor._get_content()
        if datatype == "BYTES":
            values = deserialize_bytes_tensor(raw)
        else:
            values = np.frombuffer(raw, dtype=triton_to_np_dtype(datatype))
        out[tensor.name()] = values.reshape(tensor.shape())
    return out


# --- request building ---------------------------------------------------------------------------


def test_model_card_request_follows_the_contract_tables():
    image = Image.fromarray(gradient_rgb())
    request = build_request(model_card_messages(image), stream=True, max_tokens=200, temperature=0.0, seed=3, stop=["\n\n"])
    sent = tensors(request)
    for tensor in request.inputs:
        contract = CONTRACT_INPUTS[tensor.name()]
        assert tensor.datatype() == CLIENT_DTYPES[contract.triton_dtype]
        assert len(tensor.shape()) == len(contract.dims)
    assert json.loads(sent["messages"][0]) == [
        {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"}, {"type": "image"}]},
    ]
    assert sent["images"].shape == (1,)
    np.testing.assert_array_equal(decoded(sent["images"][0]), gradient_rgb())
    assert sent["max_tokens"].tolist() == [200]
    assert sent["temperature"].tolist() == [0.0]
    assert sent["random_seed"].tolist() == [3]
    assert sent["stop_words"].tolist() == [b"\n\n"]
    assert sent["stream"].tolist() == [True]
    assert "top_p" not in sent and "top_k" not in sent  # left to the server's defaults
    assert "text_input" not in sent


def test_text_only_and_plain_string_content():
    sent = tensors(build_request("What is pneumothorax?", stream=False))
    assert json.loads(sent["messages"][0]) == [{"role": "user", "content": "What is pneumothorax?"}]
    assert "images" not in sent
    assert sent["stream"].tolist() == [False]


def test_images_are_sent_in_order_of_their_placeholders():
    first, second = gradient_rgb(), gradient_rgb()[::-1].copy()
    messages = [
        {"role": "user", "content": [{"type": "image", "image": first}, {"type": "text", "text": "vs"}, {"type": "image", "image": second}]}
    ]
    request = build_request(messages, stream=True)
    assert [decoded(b).tolist() for b in request.images] == [first.tolist(), second.tolist()]
    assert json.loads(request.messages_json)[0]["content"] == [{"type": "image"}, {"type": "text", "text": "vs"}, {"type": "image"}]


@pytest.fixture
def image_files(tmp_path):
    rgb = Image.fromarray(gradient_rgb())
    png, jpeg, bmp = tmp_path / "x.png", tmp_path / "x.jpg", tmp_path / "x.bmp"
    rgb.save(png)
    rgb.save(jpeg, quality=90)
    rgb.save(bmp)
    return png, jpeg, bmp


def test_png_and_jpeg_files_and_bytes_are_sent_as_given(image_files):
    png, jpeg, _ = image_files
    for path in (png, jpeg):
        assert encode_image(path) == path.read_bytes()
        assert encode_image(str(path)) == path.read_bytes()
        assert encode_image(path.read_bytes()) == path.read_bytes()
        assert encode_image(bytearray(path.read_bytes())) == path.read_bytes()


def test_other_formats_are_re_encoded_losslessly_to_png(image_files):
    _, _, bmp = image_files
    data = encode_image(bmp)
    assert data.startswith(b"\x89PNG")
    np.testing.assert_array_equal(decoded(data), gradient_rgb())


@pytest.mark.parametrize(
    "array, mode",
    [
        (gradient_rgb()[..., 0], "L"),
        (gradient_rgb(), "RGB"),
        (np.dstack([gradient_rgb(), np.full((32, 48), 200, np.uint8)]), "RGBA"),
        (gradient_rgb()[..., :1], "L"),
    ],
)
def test_numpy_uint8_is_lossless_png(array, mode):
    data = encode_image(array)
    image = Image.open(io.BytesIO(data))
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(image), array.squeeze(-1) if array.shape[-1] == 1 else array)


def test_pil_images_are_lossless_png():
    for image in (Image.fromarray(gradient_rgb()), Image.fromarray(gradient_rgb()[..., 1]), Image.fromarray(gradient_rgb()).convert("P")):
        np.testing.assert_array_equal(decoded(encode_image(image)), np.asarray(image))


def test_sixteen_bit_pixels_are_sent_as_eight_bits_by_v_over_257():
    values = (np.arange(32 * 48, dtype=np.uint32).reshape(32, 48) * 41 % 65536).astype(np.uint16)
    expected = np.rint(values / 257.0).astype(np.uint8)
    for image in (values, Image.fromarray(values), png_bytes(Image.fromarray(values))):
        data = encode_image(image)
        assert Image.open(io.BytesIO(data)).mode == "L"
        np.testing.assert_array_equal(decoded(data), expected)
    rgb16 = np.stack([values, values[::-1], values[:, ::-1]], axis=-1)
    np.testing.assert_array_equal(decoded(encode_image(rgb16)), np.rint(rgb16 / 257.0).astype(np.uint8))


def test_dicom_kinds_all_encode_to_the_same_png():
    path = get_testdata_file("6154")
    import pydicom

    expected = dicom_to_png(path)
    assert encode_image(path) == expected
    assert encode_image(pydicom.dcmread(path)) == expected
    assert encode_image(DicomImage(path)) == expected
    assert encode_image(DicomImage(path, window=Window(1000, 500))) != expected
    request = build_request(model_card_messages(path), stream=True)
    assert request.images == [expected]


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((8, 8), np.float32), "dtype float32; expected uint8 or uint16"),
        (np.zeros((3, 8, 8), np.uint8), "looks channels-first"),
        (np.zeros((8, 8, 2), np.uint8), r"expected HxW, HxWx3 or HxWx4"),
        ("https://example.org/xray.png", "the client does not fetch URLs"),
        (b"not an image", "is not a PNG, JPEG, DICOM or other image"),
        (Image.new("F", (4, 4)), "mode F"),
        (12, "unsupported image type int"),
    ],
)
def test_bad_images_are_refused_before_sending(image, message):
    with pytest.raises(InvalidArgumentError, match=message) as info:
        build_request(model_card_messages(image), stream=True)
    assert str(info.value).startswith("messages[1].content[1]: ")
    assert not re.search(r"\b0x[0-9a-fA-F]+|object at|b'", str(info.value)), str(info.value)


def test_missing_image_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_request(model_card_messages(tmp_path / "missing.png"), stream=True)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "doctor", "content": "hi"}], r"messages\[0\]\.role is 'doctor'; it must be one of system, user, assistant"),
        ([{"role": "user", "content": [{"type": "video"}]}], r"messages\[0\]\.content\[0\]\.type is 'video'"),
        ([{"role": "user", "content": [{"type": "image"}]}], r"messages\[0\]\.content\[0\] is an image part without an image"),
        ([], "messages is an empty list"),
        ([{"role": "user"}], r'messages\[0\] has no "content"'),
        ([{"role": "user", "content": [{"type": "text", "text": "a\ud800b"}]}],
         r"messages\[0\]\.content\[0\]\.text is not valid Unicode text: character 1 is the unpaired surrogate U\+D800"),
        ([{"role": "system", "content": [{"type": "image", "image": Image.new("L", (4, 4))}]}, {"role": "user", "content": "hi"}],
         r"messages\[0\]\.content\[0\] is an image in a system message, which takes text only; put images in a user message"),
        ([{"role": "user", "content": [{"type": "text", "text": Image.new("L", (4, 4))}]}],
         r"messages\[0\]\.content\[0\]\.text cannot be sent as JSON"),
    ],
)
def test_messages_are_validated_with_the_servers_messages(messages, message):
    with pytest.raises(InvalidArgumentError, match=message) as info:
        build_request(messages, stream=True)
    assert not re.search(r"\b0x[0-9a-fA-F]+|object at|Error|<_io|b'", str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"temperature": -1.0}, "temperature is -1.0; it must be between 0 and 2"),
        ({"top_p": 0.0}, r"top_p is 0.0; it must be in \(0, 1\]"),
        ({"max_tokens": 0}, "max_tokens is 0; it must be between 1"),
        ({"seed": -1}, "random_seed is -1"),
        ({"stop": [""]}, r"stop_words\[0\] is empty"),
        ({"top_k": 1.5}, "top_k must be an integer"),
    ],
)
def test_sampling_is_validated_with_the_servers_rules(params, message):
    with pytest.raises(InvalidArgumentError, match=message):
        build_request("hi", stream=True, **params)


# --- errors -------------------------------------------------------------------------------------


def test_in_stream_errors_are_mapped_by_the_servers_prefix():
    error = from_triton(InferenceServerException("in ensemble 'medgemma', invalid argument: images[0] is empty"))
    assert isinstance(error, InvalidArgumentError) and str(error) == "images[0] is empty"
    assert error.status == "INVALID_ARGUMENT"
    error = from_triton(InferenceServerException("in ensemble 'medgemma', Failed to process the request"))
    assert type(error) is ServerError and str(error) == "Failed to process the request"


@pytest.mark.parametrize(
    "status, kind",
    [
        ("StatusCode.INVALID_ARGUMENT", InvalidArgumentError),
        ("StatusCode.UNAVAILABLE", UnavailableError),
        ("StatusCode.DEADLINE_EXCEEDED", DeadlineExceededError),
        ("StatusCode.CANCELLED", CancelledError),
        ("StatusCode.INTERNAL", ServerError),
    ],
)
def test_rpc_errors_are_mapped_by_status(status, kind):
    error = from_triton(InferenceServerException("boom", status=status))
    assert type(error) is kind and error.message == "boom" and error.status == status.split(".")[1]
    assert isinstance(DeadlineExceededError("x"), TimeoutError)


def test_connection_refused_is_a_one_line_unavailable_error():
    with MedGemmaClient("127.0.0.1:1") as client:
        assert client.is_ready() is False
        with pytest.raises(UnavailableError, match=r"^connection refused at 127\.0\.0\.1:1$"):
            client.check_ready()
        with pytest.raises(UnavailableError, match=r"^connection refused at 127\.0\.0\.1:1$"):
            client.chat("hi")

    async def main():
        async with AsyncMedGemmaClient("127.0.0.1:1") as client:
            assert await client.is_ready() is False
            with pytest.raises(UnavailableError, match=r"^connection refused at 127\.0\.0\.1:1$"):
                await client.chat("hi")

    asyncio.run(main())


# --- TLS: no TLS server here, so the credentials handed to gRPC are recorded (a spy on grpc) -----


@pytest.fixture
def pem_files(tmp_path):
    files = {}
    for name in ("root_certificates", "private_key", "certificate_chain"):
        path = tmp_path / f"{name}.pem"
        path.write_bytes(f"-----BEGIN TEST {name}-----\n".encode())
        files[name] = str(path)
    return files


@pytest.fixture
def credential_spy(monkeypatch):
    import grpc

    calls = []
    real = grpc.ssl_channel_credentials

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(grpc, "ssl_channel_credentials", spy)
    return calls


def _expected_credentials(pem_files):
    return {name: open(path, "rb").read() for name, path in pem_files.items()}


def test_tls_files_reach_grpc_credentials_sync(pem_files, credential_spy):
    client = MedGemmaClient("example.org:443", ssl=True, **pem_files)
    assert credential_spy == [_expected_credentials(pem_files)]
    client._acquire(), client._acquire()  # a second, concurrent request gets its own tritonclient, same credentials
    assert len(credential_spy) == 2 and credential_spy[1] == credential_spy[0]
    client.close()


def test_tls_files_reach_grpc_credentials_async(pem_files, credential_spy):
    async def main():
        client = AsyncMedGemmaClient("example.org:443", ssl=True, **pem_files)
        client._triton_client()
        await client.close()

    asyncio.run(main())
    assert credential_spy == [_expected_credentials(pem_files)]


def test_no_tls_by_default(credential_spy):
    MedGemmaClient("127.0.0.1:1").close()
    assert credential_spy == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tritonclient's __del__ after its failed __init__
def test_missing_tls_file_fails_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError):
        MedGemmaClient("example.org:443", ssl=True, root_certificates=str(tmp_path / "missing.pem"))


def test_client_validates_without_torch_jinja_or_tokenizers():
    """Building a request checks its messages as the server does (runtime/messages.py), importing neither
    torch nor the prompt renderer's jinja2 and tokenizers."""
    import subprocess
    import sys

    code = ("import sys, medgemma_triton.client as c\n"
            "c.build_request([{'role': 'user', 'content': [{'type': 'text', 'text': 'hi'}]}], stream=True)\n"
            "try:\n    c.build_request([{'role': 'doctor', 'content': 'hi'}], stream=False)\nexcept c.InvalidArgumentError as e:\n"
            "    print('refused:', 'role' in str(e))\n"
            "print(sorted(m for m in ('torch', 'transformers', 'jinja2', 'tokenizers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["refused: True", "[]"], out


# =================================================================================================
# Against a real Triton server (tests/serving_fixtures.py: the tiny checkpoint's repository).
# The reference is the server's own greedy output read with plain tritonclient (MedgemmaStream).
# =================================================================================================

SERVER_MAX_TOKENS = 16
LONG_MAX_TOKENS = 4000


def server_reference(url: str, messages: list[dict], images: list[bytes], **sampling):
    from serving_fixtures import MedgemmaStream

    stream = MedgemmaStream(url)
    try:
        outcome = stream.request(messages=messages, images=images, **sampling)
    finally:
        stream.close()
    assert outcome.error is None, outcome.error
    return outcome


def assert_same_answer(result, outcome):
    assert result.text == outcome.text
    assert list(result.token_ids) == outcome.ids
    assert result.finish_reason == outcome.finish_reason
    assert result.prompt_tokens == outcome.prompt_tokens
    assert result.completion_tokens == outcome.completion_tokens


@pytest.fixture(scope="module")
def reference_image() -> Image.Image:
    return Image.fromarray(gradient_rgb(96, 80))


@pytest.fixture(scope="module")
def model_card(tiny_server, reference_image):
    """The model-card chat with one image, and the server's greedy answer to it."""
    messages = model_card_messages(reference_image)
    placeholders = json.loads(build_request(messages, stream=False).messages_json)
    outcome = server_reference(tiny_server.url, placeholders, [png_bytes(reference_image)], max_tokens=SERVER_MAX_TOKENS)
    return messages, outcome


def test_readiness(tiny_server):
    with MedGemmaClient(tiny_server.url) as client:
        assert client.is_ready()
        client.wait_until_ready(timeout=5)
    from medgemma_triton.client import ModelNotReadyError

    with MedGemmaClient(tiny_server.url, model="no_such_model") as client:
        with pytest.raises(ModelNotReadyError, match="model no_such_model is not ready"):
            client.wait_until_ready(timeout=1, interval=0.2)

    async def main():
        async with AsyncMedGemmaClient(tiny_server.url) as client:
            assert await client.is_ready()
            await client.wait_until_ready(timeout=5)

    asyncio.run(main())


def test_sync_and_async_greedy_answers_equal_the_servers(tiny_server, model_card):
    messages, outcome = model_card
    with MedGemmaClient(tiny_server.url) as client:
        assert_same_answer(client.chat(messages, max_tokens=SERVER_MAX_TOKENS), outcome)
        with client.stream_chat(messages, max_tokens=SERVER_MAX_TOKENS) as stream:
            deltas = list(stream)
        assert "".join(deltas) == outcome.text and len(deltas) > 1
        assert_same_answer(stream.final_result(), outcome)

    async def main():
        async with AsyncMedGemmaClient(tiny_server.url) as client:
            assert_same_answer(await client.chat(messages, max_tokens=SERVER_MAX_TOKENS), outcome)
            async with client.stream_chat(messages, max_tokens=SERVER_MAX_TOKENS) as stream:
                deltas = [delta async for delta in stream]
            assert "".join(deltas) == outcome.text
            assert_same_answer(await stream.final_result(), outcome)

    asyncio.run(main())


def test_text_only_chat_equals_the_servers(tiny_server):
    messages = [{"role": "user", "content": "Describe a normal chest X-ray."}]
    outcome = server_reference(tiny_server.url, messages, [], max_tokens=SERVER_MAX_TOKENS)
    with MedGemmaClient(tiny_server.url) as client:
        assert_same_answer(client.chat("Describe a normal chest X-ray.", max_tokens=SERVER_MAX_TOKENS), outcome)


def test_async_eight_concurrent_streams(tiny_server):
    prompts = [f"Case {i}: describe the findings." for i in range(8)]
    expected = [server_reference(tiny_server.url, [{"role": "user", "content": p}], [], max_tokens=SERVER_MAX_TOKENS) for p in prompts]

    async def one(client, prompt):
        async with client.stream_chat(prompt, max_tokens=SERVER_MAX_TOKENS) as stream:
            text = "".join([delta async for delta in stream])
        return text, await stream.final_result()

    async def main():
        async with AsyncMedGemmaClient(tiny_server.url) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    for (text, result), outcome in zip(asyncio.run(main()), expected):
        assert text == outcome.text
        assert_same_answer(result, outcome)


def test_sync_client_is_thread_safe(tiny_server):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Patient {i}" for i in range(4)]
    expected = [server_reference(tiny_server.url, [{"role": "user", "content": p}], [], max_tokens=SERVER_MAX_TOKENS) for p in prompts]
    with MedGemmaClient(tiny_server.url) as client, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: client.chat(p, max_tokens=SERVER_MAX_TOKENS), prompts))
    for result, outcome in zip(results, expected):
        assert_same_answer(result, outcome)


def _wait_for_cancellation(server, before: float) -> None:
    import time

    from serving_fixtures import metric_value

    deadline = time.monotonic() + 20
    while metric_value(server, "medgemma_cancelled_requests_total") <= before:
        assert time.monotonic() < deadline, "the server never saw the cancellation"
        time.sleep(0.1)
    tokens = metric_value(server, "medgemma_generated_tokens_total")
    time.sleep(1.0)
    assert metric_value(server, "medgemma_generated_tokens_total") == tokens, "the server kept generating"


def test_leaving_a_sync_stream_cancels_the_request(tiny_server):
    from serving_fixtures import metric_value

    before = metric_value(tiny_server, "medgemma_cancelled_requests_total")
    with MedGemmaClient(tiny_server.url) as client:
        stream = client.stream_chat("Write a very long report.", max_tokens=LONG_MAX_TOKENS)
        for i, _ in enumerate(stream):
            if i == 4:
                break
        _wait_for_cancellation(tiny_server, before)
        result = stream.result
        assert result.finish_reason == "cancelled" and 0 < result.completion_tokens < LONG_MAX_TOKENS
        assert client.chat("still serving?", max_tokens=4).finish_reason in ("stop", "length")


def test_leaving_an_async_stream_cancels_the_request(tiny_server):
    from serving_fixtures import metric_value

    before = metric_value(tiny_server, "medgemma_cancelled_requests_total")

    async def main():
        async with AsyncMedGemmaClient(tiny_server.url) as client:
            async with client.stream_chat("Write a very long report.", max_tokens=LONG_MAX_TOKENS) as stream:
                count = 0
                async for _ in stream:
                    count += 1
                    if count == 5:
                        break
            return stream.result

    result = asyncio.run(main())
    assert result.finish_reason == "cancelled"
    _wait_for_cancellation(tiny_server, before)


def test_cancelling_the_task_cancels_the_request(tiny_server):
    from serving_fixtures import metric_value

    before = metric_value(tiny_server, "medgemma_cancelled_requests_total")

    async def main():
        async with AsyncMedGemmaClient(tiny_server.url) as client:
            task = asyncio.create_task(client.chat("Write a very long report.", max_tokens=LONG_MAX_TOKENS))
            await asyncio.sleep(1.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    _wait_for_cancellation(tiny_server, before)


def _stopped(server) -> float:
    """Requests the llm ended early: cancelled by the client, or stopped by the server-side deadline."""
    from serving_fixtures import metric_value

    return metric_value(server, "medgemma_cancelled_requests_total") + metric_value(
        server, "medgemma_finished_requests_total", finish_reason="timeout"
    )


def test_timeout_raises_a_typed_error_and_stops_the_server(tiny_server):
    """The client's timeout ends the call (DeadlineExceededError) and, sent as timeout_ms, the server's
    generation: by the client's cancellation or the server's deadline, whichever lands first."""
    import time

    from serving_fixtures import metric_value

    def wait_until_stopped(before: float) -> None:
        deadline = time.monotonic() + 20
        while _stopped(tiny_server) <= before:
            assert time.monotonic() < deadline, "the server never stopped the request"
            time.sleep(0.1)
        tokens = metric_value(tiny_server, "medgemma_generated_tokens_total")
        time.sleep(1.0)
        assert metric_value(tiny_server, "medgemma_generated_tokens_total") == tokens, "the server kept generating"

    before = _stopped(tiny_server)
    with MedGemmaClient(tiny_server.url, timeout=0.5) as client:
        with pytest.raises(DeadlineExceededError, match=r"within 0\.5 s"):
            client.chat("Write a very long report.", max_tokens=LONG_MAX_TOKENS)
    wait_until_stopped(before)

    async def main():
        async with AsyncMedGemmaClient(tiny_server.url) as client:
            with pytest.raises(DeadlineExceededError):
                async with client.stream_chat("Write a very long report.", max_tokens=LONG_MAX_TOKENS, timeout=0.5) as stream:
                    async for _ in stream:
                        pass

    before = _stopped(tiny_server)
    asyncio.run(main())
    wait_until_stopped(before)


def test_a_server_side_deadline_stops_generation(tiny_server):
    """timeout_ms alone (no client deadline, no cancellation): the server stops generating when it
    passes and answers with what it has, finish_reason `timeout`, counted in the llm's finished counter."""
    from serving_fixtures import MedgemmaStream, metric_value

    timeouts = metric_value(tiny_server, "medgemma_finished_requests_total", finish_reason="timeout")
    cancelled = metric_value(tiny_server, "medgemma_cancelled_requests_total")
    stream = MedgemmaStream(tiny_server.url)
    try:
        for streaming in (True, False):
            outcome = stream.request(messages=[{"role": "user", "content": "Write a very long report."}],
                                     max_tokens=LONG_MAX_TOKENS, timeout_ms=400, stream=streaming)
            assert outcome.error is None, outcome.error
            assert outcome.finish_reason == "timeout"
            assert 0 <= outcome.completion_tokens == len(outcome.ids) < LONG_MAX_TOKENS
    finally:
        stream.close()
    assert metric_value(tiny_server, "medgemma_finished_requests_total", finish_reason="timeout") == timeouts + 2
    assert metric_value(tiny_server, "medgemma_cancelled_requests_total") == cancelled


# Stream errors carry no gRPC status: the server prefixes refusals with contract.INVALID_ARGUMENT_PREFIX.
def test_server_refusals_are_invalid_argument_errors(tiny_server):
    one_too_many = Limits().max_images + 1  # the server's default
    small = png_bytes(Image.new("RGB", (8, 8)))
    with MedGemmaClient(tiny_server.url) as client:
        with pytest.raises(InvalidArgumentError, match="MEDGEMMA_MAX_IMAGES") as info:
            client.chat([{"role": "user", "content": [{"type": "image", "image": small}] * one_too_many}], max_tokens=4)
        assert info.value.status == "INVALID_ARGUMENT"
        with pytest.raises(InvalidArgumentError, match="MEDGEMMA_MAX_NEW_TOKENS"):
            client.chat("hi", max_tokens=100_000)
        assert client.chat("hi", max_tokens=4).completion_tokens > 0  # and it keeps serving



def with_raw_messages(request, raw: bytes):
    """`request` with its messages tensor replaced by bytes build_request would have refused to send."""
    import dataclasses

    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("messages", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([raw], dtype=np.object_))
    inputs = [tensor if t.name() == "messages" else t for t in request.inputs]
    return dataclasses.replace(request, messages_json=raw.decode("utf-8"), inputs=inputs)


# What the live tiny server answers (copied from its replies): preprocessing refuses the first two,
# the llm the third (the prompt fits MEDGEMMA_MAX_INPUT_TOKENS but not the tiny model's context), and
# the BLS `medgemma` model forwards each, prefixed "invalid argument: ", as the stream's error.
SERVER_REFUSALS = {
    "malformed messages JSON": "messages is not valid JSON: Expecting value: line 1 column 1 (char 0)",
    "image over MEDGEMMA_MAX_IMAGE_SIDE": (
        "images[0] is 16385x1 pixels; the limit is 16384 pixels per side (MEDGEMMA_MAX_IMAGE_SIDE)"
    ),
    "prompt over the model's context": "the prompt is 5009 tokens; the model's context is 4096",
}


def refused_requests() -> dict:
    wide_png = png_bytes(Image.new("L", (16385, 1)))
    return {
        "malformed messages JSON": with_raw_messages(build_request("hi", stream=True, max_tokens=4), b"not json"),
        "image over MEDGEMMA_MAX_IMAGE_SIDE": build_request(model_card_messages(wide_png), stream=True, max_tokens=4),
        "prompt over the model's context": build_request("hello " * 5000, stream=True, max_tokens=4),
    }


def test_refused_requests_raise_invalid_argument_with_the_servers_message(tiny_server):
    requests = refused_requests()
    with MedGemmaClient(tiny_server.url) as client:
        for name, request in requests.items():
            with pytest.raises(InvalidArgumentError) as info:
                client.send(request).final_result()
            assert (str(info.value), info.value.status) == (SERVER_REFUSALS[name], "INVALID_ARGUMENT"), name
        assert client.chat("hi", max_tokens=4).completion_tokens > 0

    async def main():
        async with AsyncMedGemmaClient(tiny_server.url) as client:
            for name, request in requests.items():
                with pytest.raises(InvalidArgumentError) as info:
                    async with client.send(request) as stream:
                        await stream.final_result()
                assert str(info.value) == SERVER_REFUSALS[name], name

    asyncio.run(main())

def test_each_image_kind_gives_the_answer_of_the_same_pixels_through_pil(tiny_server, tmp_path):
    import pydicom

    rgb = gradient_rgb(96, 80)
    grey = rgb[..., 0].copy()
    (tmp_path / "x.png").write_bytes(png_bytes(Image.fromarray(rgb)))
    Image.fromarray(rgb).save(tmp_path / "x.jpg", quality=90)
    dicom_path = get_testdata_file("6154")
    kinds = {
        # kind: (image as the caller passes it, the PIL image of the same pixels)
        "PIL": (Image.fromarray(rgb), Image.fromarray(rgb)),
        "numpy RGB": (rgb, Image.fromarray(rgb)),
        "numpy grey": (grey, Image.fromarray(grey)),
        "numpy uint16": (grey.astype(np.uint16) * 257, Image.fromarray(grey)),
        "PNG path": (tmp_path / "x.png", Image.fromarray(rgb)),
        "PNG bytes": ((tmp_path / "x.png").read_bytes(), Image.fromarray(rgb)),
        "JPEG path": (str(tmp_path / "x.jpg"), Image.open(tmp_path / "x.jpg")),
        "DICOM path": (dicom_path, Image.open(io.BytesIO(dicom_to_png(dicom_path)))),
        "DICOM dataset": (pydicom.dcmread(dicom_path), Image.open(io.BytesIO(dicom_to_png(dicom_path)))),
    }
    answers = {}
    with MedGemmaClient(tiny_server.url) as client:
        for kind, (image, same_pixels) in kinds.items():
            pil_messages = model_card_messages(same_pixels)
            reference_bytes = png_bytes(same_pixels) if same_pixels.format != "JPEG" else (tmp_path / "x.jpg").read_bytes()
            outcome = server_reference(
                tiny_server.url,
                json.loads(build_request(pil_messages, stream=False).messages_json),
                [reference_bytes],
                max_tokens=SERVER_MAX_TOKENS,
            )
            result = client.chat(model_card_messages(image), max_tokens=SERVER_MAX_TOKENS)
            assert list(result.token_ids) == outcome.ids, kind
            answers[kind] = tuple(result.token_ids)
    # the pixels reach the model: different images, different answers
    assert len({answers["numpy RGB"], answers["numpy grey"], answers["DICOM path"]}) == 3


def test_best_effort_inputs_go_only_to_servers_that_declare_them():
    """timeout_ms is sent only when the served model declares it: a client newer than its server
    still gets answers (without the server-side deadline); other inputs are never dropped."""
    from medgemma_triton.client.request import build_request

    client = MedGemmaClient("127.0.0.1:1")  # no call is made
    try:
        request = build_request("Hello", stream=True, max_tokens=4, timeout=5.0)
        names = [t.name() for t in request.inputs]
        url = client.url
        assert "timeout_ms" in names and [t.name() for t in client._inputs_for(url, request)] == names  # unknown: all
        client._learn_inputs(url, {"inputs": [{"name": "messages"}, {"name": "stream"}]})  # an older server
        assert [t.name() for t in client._inputs_for(url, request)] == [n for n in names if n != "timeout_ms"]
    finally:
        client.close()


FAILOVER_REQUESTS = 24
FAILOVER_MAX_TOKENS = 48


def _medgemma_requests(url: str) -> int:
    import tritonclient.grpc as grpcclient

    triton = grpcclient.InferenceServerClient(url)
    try:
        stats = triton.get_inference_statistics(model_name="medgemma", as_json=True)
    finally:
        triton.close()
    return int(stats["model_stats"][0].get("inference_count", 0))


def test_two_endpoints_share_requests_and_a_killed_one_fails_over(tiny_repository):
    """A client with two servers spreads requests across both. One server is killed (SIGKILL) under
    load: every request completes with the reference answer or ends with a clear MedGemmaError (only
    those already streaming from the killed server), later requests go to the survivor, and nothing hangs."""
    import os
    import signal
    import threading
    import time

    from serving_fixtures import _start

    from medgemma_triton.client import MedGemmaError

    servers = [_start(tiny_repository, OMP_NUM_THREADS="1") for _ in range(2)]
    try:
        prompt = [{"role": "user", "content": "Write a long, detailed report about a normal chest X-ray."}]
        expected = server_reference(servers[1].url, prompt, [], max_tokens=FAILOVER_MAX_TOKENS)
        client = MedGemmaClient([s.url for s in servers], timeout=120)
        for _ in range(4):
            assert_same_answer(client.chat(prompt, max_tokens=FAILOVER_MAX_TOKENS), expected)
        assert _medgemma_requests(servers[0].url) >= 2 and _medgemma_requests(servers[1].url) >= 2  # shared

        outcomes: list = []
        lock = threading.Lock()
        pending = iter(range(FAILOVER_REQUESTS))

        def worker():
            while True:
                with lock:
                    if next(pending, None) is None:
                        return
                try:
                    result = client.chat(prompt, max_tokens=FAILOVER_MAX_TOKENS)
                    outcome = ("completed", list(result.token_ids) == expected.ids)
                except MedGemmaError as exc:
                    outcome = ("error", str(exc))
                with lock:
                    outcomes.append(outcome)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while len(outcomes) < 6:
            assert time.monotonic() < deadline, "the load never got going"
            time.sleep(0.05)
        os.killpg(servers[0].process.pid, signal.SIGKILL)  # the server and its model processes, at once
        for thread in threads:
            thread.join(timeout=180)
        assert not any(t.is_alive() for t in threads), "a request hung after its server was killed"
        completed = [o for o in outcomes if o[0] == "completed"]
        errors = [o for o in outcomes if o[0] == "error"]
        print(f"\n{len(completed)} completed, {len(errors)} errors: {[e[1] for e in errors]}")
        assert len(completed) + len(errors) == FAILOVER_REQUESTS
        assert all(same for _, same in completed), "a completed answer differs from the reference"
        assert len(errors) <= 4  # at most the requests in flight on the killed server
        assert len(completed) >= FAILOVER_REQUESTS - 4
        client.close()
    finally:
        for server in servers:
            server.stop()


def test_an_unreachable_endpoint_is_skipped_by_both_clients(tiny_server):
    """With a dead endpoint first or second in turn, every request is answered by the live one, sync and
    asyncio; readiness holds while one endpoint is ready; a client of dead endpoints only says so."""
    from medgemma_triton.server.launcher import free_port

    dead = f"127.0.0.1:{free_port()}"
    prompt = [{"role": "user", "content": "Is this chest X-ray normal?"}]
    expected = server_reference(tiny_server.url, prompt, [], max_tokens=SERVER_MAX_TOKENS)
    with MedGemmaClient([dead, tiny_server.url]) as client:
        assert client.is_ready()
        for _ in range(2):  # round robin: the dead endpoint comes first once
            assert_same_answer(client.chat(prompt, max_tokens=SERVER_MAX_TOKENS), expected)

    async def main():
        async with AsyncMedGemmaClient([dead, tiny_server.url]) as client:
            assert await client.is_ready()
            return [await client.chat(prompt, max_tokens=SERVER_MAX_TOKENS) for _ in range(2)]

    for result in asyncio.run(main()):
        assert_same_answer(result, expected)
    with MedGemmaClient([dead]) as client:
        with pytest.raises(UnavailableError, match="connection refused"):
            client.chat(prompt, max_tokens=SERVER_MAX_TOKENS)
