"""The `medgemma` model on a real Triton server (nvidia-pytriton's tritonserver 2.51), over gRPC.

Reference: transformers' Gemma3ForConditionalGeneration.generate (greedy, fp32) on the same
checkpoint, with AutoProcessor.apply_chat_template building its inputs from the same messages and
the same decoded images. One server per session (tests/serving_fixtures.py); tests that add load
(concurrency, cancellation, bad input) check that the others' results stay exact.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving_fixtures import MedgemmaStream, assert_response_sizes, metric_value

from medgemma_triton.runtime.limits import Limits
from medgemma_triton.repository.cpu import CpuSettings

pytestmark = pytest.mark.served  # starts tritonserver or the gateway: the full tier only

DEFAULT_LIMITS = Limits()  # the server's limits: the tests' servers set none of MEDGEMMA_MAX_*

MARKER = "Quokka-7731"  # a prompt string that must never reach the server log
_REFERENCE_MODELS = {}


# --- the transformers reference ---


def _reference(checkpoint: Path):
    if checkpoint not in _REFERENCE_MODELS:
        import torch
        from transformers import AutoProcessor, Gemma3ForConditionalGeneration

        torch.set_num_threads(1)
        model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
        _REFERENCE_MODELS[checkpoint] = (model, AutoProcessor.from_pretrained(checkpoint))
    return _REFERENCE_MODELS[checkpoint]


def reference_generate(checkpoint: Path, messages: list[dict], images: list[bytes], max_new_tokens: int):
    """(prompt length, generated ids through the first eos) from transformers generate."""
    import torch

    from medgemma_triton.spec import ModelSpec

    model, processor = _reference(checkpoint)
    pil_images = iter([Image.open(io.BytesIO(data)) for data in images])
    hf_messages = [
        {
            "role": m["role"],
            "content": [
                {"type": "image", "image": next(pil_images)} if part["type"] == "image" else part
                for part in m["content"]
            ],
        }
        for m in messages
    ]
    inputs = processor.apply_chat_template(
        hf_messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    prompt_length = inputs["input_ids"].shape[1]
    generated = out[0, prompt_length:].tolist()
    eos = ModelSpec.from_checkpoint(checkpoint).tokens.eos
    for i, token in enumerate(generated):
        if token in eos:
            generated = generated[: i + 1]
            break
    return prompt_length, generated


def png(seed: int, size=(96, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def user(*parts) -> list[dict]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image"} for p in parts]
    return [{"role": "user", "content": content}]


IMAGE = object()  # an image part in user(...)

CHATS = {
    "text": (
        [{"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]}]
        + user(f"Describe a normal chest X-ray. {MARKER}"),
        [],
    ),
    "one-image": (user("Describe this X-ray", IMAGE), [png(1)]),
    "two-images": (user("Compare", IMAGE, "with", IMAGE), [png(2, (64, 64)), png(3, (120, 50))]),
}
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from medgemma_triton.runtime.tokenizer import load_tokenizer

    return load_tokenizer(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    """Reference results for CHATS, computed once."""
    return {
        name: reference_generate(tiny_checkpoint, messages, images, MAX_TOKENS)
        for name, (messages, images) in CHATS.items()
    }


@pytest.fixture(scope="module")
def stream(tiny_server):
    s = MedgemmaStream(tiny_server.url)
    yield s
    s.close()


def check_outcome(outcome, expected_result, tokenizer):
    prompt_length, ids = expected_result
    assert outcome.error is None, outcome.error
    assert outcome.ids == ids
    assert outcome.prompt_tokens == prompt_length
    assert outcome.completion_tokens == len(ids)
    assert outcome.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert outcome.finish_reason == ("stop" if len(ids) < MAX_TOKENS else "length")


# --- greedy output, token for token ---


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "no-stream"])
@pytest.mark.parametrize("chat", list(CHATS))
def test_greedy_matches_transformers(stream, expected, tokenizer, chat, streaming):
    messages, images = CHATS[chat]
    seen = []  # (ids, text) received so far, response by response
    outcome = stream.request(messages=messages, images=images, max_tokens=MAX_TOKENS, stream=streaming,
                             on_response=lambda o: seen.append((len(o.ids), o.text)))
    check_outcome(outcome, expected[chat], tokenizer)
    assert_response_sizes(seen, len(outcome.ids), streaming, CpuSettings().stream_interval)  # the default repository


def test_text_input_is_one_user_turn(stream, tiny_checkpoint, tokenizer):
    text = "Is this chest X-ray normal?"
    expected_result = reference_generate(tiny_checkpoint, user(text, IMAGE), [png(4)], MAX_TOKENS)
    outcome = stream.request(text_input=text, images=[png(4)], max_tokens=MAX_TOKENS)
    check_outcome(outcome, expected_result, tokenizer)


def test_stop_word_cuts_the_text(stream, expected, tokenizer):
    messages, images = CHATS["text"]
    full_text = tokenizer.decode(expected["text"][1], skip_special_tokens=True)
    assert len(full_text) > 12
    stop = full_text[6:9]
    outcome = stream.request(messages=messages, max_tokens=MAX_TOKENS, stop_words=[stop, "\x00never"])
    assert outcome.error is None, outcome.error
    assert outcome.finish_reason == "stop"
    assert outcome.text == full_text[: full_text.find(stop)]
    assert outcome.ids == expected["text"][1][: len(outcome.ids)]


def test_sampling_is_seeded(stream):
    messages, _ = CHATS["text"]
    params = dict(messages=messages, max_tokens=16, temperature=1.0, top_k=50, top_p=0.9)
    first = stream.request(random_seed=7, **params)
    again = stream.request(random_seed=7, **params)
    other = stream.request(random_seed=8, **params)
    assert first.error is None and first.ids == again.ids
    assert other.ids != first.ids


# --- concurrency and cancellation ---


def _run_streams(url, requests, results, index_offset=0):
    def worker(i, request):
        s = MedgemmaStream(url)
        try:
            results[index_offset + i] = s.request(**request)
        finally:
            s.close()

    threads = [threading.Thread(target=worker, args=(i, r)) for i, r in enumerate(requests)]
    for t in threads:
        t.start()
    return threads


def test_eight_concurrent_streams(tiny_server, expected, tokenizer):
    names = list(CHATS) * 3
    names = names[:8]
    results = {}
    requests = [dict(messages=CHATS[n][0], images=CHATS[n][1], max_tokens=MAX_TOKENS) for n in names]
    for t in _run_streams(tiny_server.url, requests, results):
        t.join(300)
    assert len(results) == 8
    for i, name in enumerate(names):
        check_outcome(results[i], expected[name], tokenizer)


def _clients_back_to_back(url: str, clients: int, requests: int, send, timeout_s: float = 300.0) -> list[str]:
    """`clients` threads, each sending `requests` requests one after another on its own stream.

    send(stream, i) makes request i and returns what was wrong with its outcome, or None. Returns the
    failures (a client stops at its first); a dead server shows as an exception or a timeout.
    """
    failures = []

    def client(index):
        s = MedgemmaStream(url)
        try:
            for i in range(requests):
                problem = send(s, i)
                if problem is not None:
                    failures.append(f"client {index} request {i}: {problem}")
                    return
        except Exception as exc:  # noqa: BLE001 - a dead server shows here
            failures.append(f"client {index}: {exc!r}")
        finally:
            s.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        failures.append(f"requests still running after {timeout_s:g} s")
    return failures


def test_many_short_requests_finish_cleanly(tiny_server):
    """Each request's cancellation watcher polls its sender while the final response goes out; asking
    is_cancelled() of a finished sender crashed Triton 2.51 (SIGSEGV), mostly within this many requests."""

    def send(s, i):
        outcome = s.request(timeout_s=60, messages=user("hi"), max_tokens=1 + i % 3, stream=bool(i % 2))
        return None if outcome.error is None and 1 <= outcome.completion_tokens <= 1 + i % 3 else outcome

    failures = _clients_back_to_back(tiny_server.url, clients=4, requests=100, send=send)
    assert not failures, failures[0]
    assert tiny_server.process.poll() is None, "Triton died"


def test_concurrent_long_streams_keep_the_server_alive(tiny_server):
    """Four clients stream long answers about an image back to back. Without the is_cancelled() round
    trip between the `medgemma` model's sends (pipeline.Pipeline._run), its Triton 2.51 stub corrupted
    memory under this load (numpy "Reference count error" here; glibc heap corruption on dev int4) and
    stopped answering; that shows here as errors or timeouts."""
    messages, images = CHATS["one-image"]

    def send(s, i):
        outcome = s.request(timeout_s=30, messages=messages, images=images, max_tokens=48)
        return None if outcome.error is None and outcome.completion_tokens >= 1 else outcome

    failures = _clients_back_to_back(tiny_server.url, clients=4, requests=40, send=send)
    assert not failures, failures[0]
    assert tiny_server.process.poll() is None, "Triton died"


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "no-stream"])
def test_cancelled_stream_stops_generating(tiny_server, expected, tokenizer, streaming):
    """Cancelling stops the llm whether or not the request streams (stream=false sends nothing until
    the end, so only the server's token counter shows the victim is under way)."""
    cancelled_before = metric_value(tiny_server, "medgemma_cancelled_requests_total")
    tokens_before = metric_value(tiny_server, "medgemma_generated_tokens_total")
    others = {}
    other_threads = _run_streams(
        tiny_server.url, [dict(messages=CHATS["text"][0], max_tokens=MAX_TOKENS)] * 2, others
    )
    victim = MedgemmaStream(tiny_server.url)
    receiver = threading.Thread(target=lambda: victim.receive(timeout_s=120), daemon=True)
    victim.send(messages=user("Write a very long report."), max_tokens=4000, stream=streaming)
    receiver.start()
    # more tokens than the others can make: the victim is generating
    under_way = tokens_before + 2 * MAX_TOKENS + 5
    deadline = time.monotonic() + 60
    while metric_value(tiny_server, "medgemma_generated_tokens_total") < under_way:
        assert time.monotonic() < deadline, "the long request generated nothing"
        time.sleep(0.05)
    victim.cancel()
    deadline = time.monotonic() + 20
    while metric_value(tiny_server, "medgemma_cancelled_requests_total") <= cancelled_before:
        assert time.monotonic() < deadline, "the server never noticed the cancellation"
        time.sleep(0.1)
    for t in other_threads:
        t.join(300)
    # generation stopped: with nothing else running, the token counter stands still
    tokens = metric_value(tiny_server, "medgemma_generated_tokens_total")
    time.sleep(1.0)
    assert metric_value(tiny_server, "medgemma_generated_tokens_total") == tokens
    assert metric_value(tiny_server, "medgemma_active_requests") == 0
    for outcome in others.values():
        check_outcome(outcome, expected["text"], tokenizer)
    victim.client.close()


# --- bad input: clear INVALID_ARG errors, and the server keeps serving ---


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries almost no data (a decompression bomb)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _bomb() -> bytes:
    """A real PNG that inflates to 100 million pixels."""
    width = height = 10_000
    row = b"\x00" + b"\x00" * width
    raw = zlib.compress(row * height, 9)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _ico_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="ICO")
    return buffer.getvalue()


def _long_prompt() -> str:
    # about 4.1 tokens per repeat: over the default MEDGEMMA_MAX_INPUT_TOKENS
    return "lorem ipsum dolor sit amet " * (DEFAULT_LIMITS.max_input_tokens // 4 + 100)


BAD_REQUESTS = {
    # name: (request, words the error must contain)
    "corrupt image": (dict(messages=user("x", IMAGE), images=[png(5)[:40] + b"\x00" * 50]), ["images[0]"]),
    "truncated image": (dict(messages=user("x", IMAGE), images=[png(5)[: len(png(5)) // 2]]), ["images[0]"]),
    "unsupported format": (dict(messages=user("x", IMAGE), images=[_ico_bytes()]), ["images[0]", "PNG"]),
    "not an image": (dict(messages=user("x", IMAGE), images=[b"hello world, not an image"]), ["images[0]"]),
    "decompression bomb": (dict(messages=user("x", IMAGE), images=[_bomb()]), ["images[0]", "MEDGEMMA_MAX_IMAGE_PIXELS"]),
    "huge declared size": (dict(messages=user("x", IMAGE), images=[_png_header_only(20000, 100)]), ["images[0]", "MEDGEMMA_MAX_IMAGE_SIDE"]),
    "too many images": (dict(messages=user("x", *[IMAGE] * (DEFAULT_LIMITS.max_images + 1)),
                             images=[png(6)] * (DEFAULT_LIMITS.max_images + 1)),
                        [f"{DEFAULT_LIMITS.max_images + 1} images", "MEDGEMMA_MAX_IMAGES"]),
    "image part without bytes": (dict(messages=user("x", IMAGE)), ["image part", "no images"]),
    "bytes without image part": (dict(messages=user("x"), images=[png(7)]), ["no {\"type\": \"image\"} part"]),
    "malformed JSON": (dict(messages='[{"role": "user", "content": [}'), ["not valid JSON"]),
    "unknown role": (dict(messages=[{"role": "doctor", "content": "hi"}]), ["messages[0].role", "'doctor'"]),
    "over input-token limit": (dict(text_input=_long_prompt()),
                               [f"the limit is {DEFAULT_LIMITS.max_input_tokens}", "MEDGEMMA_MAX_INPUT_TOKENS"]),
    "max_tokens out of range": (dict(messages=user("x"), max_tokens=0), ["max_tokens", "MEDGEMMA_MAX_NEW_TOKENS"]),
    "max_tokens over limit": (dict(messages=user("x"), max_tokens=100_000), ["max_tokens", "8192"]),
    "temperature out of range": (dict(messages=user("x"), temperature=-1.0), ["temperature"]),
    "top_p out of range": (dict(messages=user("x"), top_p=1.5), ["top_p"]),
    "top_k out of range": (dict(messages=user("x"), top_k=-3), ["top_k"]),
    "non-UTF-8 text": (dict(text_input=b"caf\xe9 \xff"), ["text_input", "UTF-8"]),
    "non-UTF-8 messages": (dict(messages=b'[{"role": "user", "content": "\xff"}]'), ["messages", "UTF-8"]),
    "both messages and text_input": (dict(messages=user("x"), text_input="y"), ["exactly one"]),
    "neither messages nor text_input": (dict(max_tokens=4), ["exactly one"]),
}


def test_bad_input_fails_clearly_while_others_finish(tiny_server, stream, expected, tokenizer):
    good = {}
    good_threads = _run_streams(
        tiny_server.url,
        [dict(messages=CHATS[n][0], images=CHATS[n][1], max_tokens=MAX_TOKENS) for n in ("text", "one-image")],
        good,
    )
    failures = []
    for name, (request, words) in BAD_REQUESTS.items():
        outcome = stream.request(timeout_s=60, **request)
        if outcome.error is None:
            failures.append(f"{name}: no error")
            continue
        missing = [w for w in words if w not in outcome.error]
        if missing:
            failures.append(f"{name}: error {outcome.error!r} lacks {missing}")
    for t in good_threads:
        t.join(300)
    assert not failures, "\n".join(failures)
    check_outcome(good[0], expected["text"], tokenizer)
    check_outcome(good[1], expected["one-image"], tokenizer)
    # and the server still serves
    check_outcome(stream.request(messages=CHATS["text"][0], max_tokens=MAX_TOKENS), expected["text"], tokenizer)


@pytest.mark.parametrize("name", ["corrupt image", "malformed JSON", "over input-token limit", "top_p out of range"])
def test_bad_input_is_invalid_argument(tiny_server, name):
    """preprocessing itself (decoupled: a gRPC stream, which carries the message and not the status code)
    refuses bad input with the invalid-argument prefix the client maps to InvalidArgumentError."""
    import queue

    import tritonclient.grpc as grpcclient

    from medgemma_triton.contract import INVALID_ARGUMENT_PREFIX
    from serving_fixtures import medgemma_inputs

    request, words = BAD_REQUESTS[name]
    inputs = [i for i in medgemma_inputs(**request) if i.name() != "stream"]
    client = grpcclient.InferenceServerClient(tiny_server.url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put(error))
    try:
        client.async_stream_infer("preprocessing", inputs)
        error = results.get(timeout=60)
    finally:
        client.stop_stream()
        client.close()
    assert error is not None
    assert error.message().startswith(INVALID_ARGUMENT_PREFIX), error.message()
    assert all(w in error.message() for w in words)


def test_benchmarks_see_what_is_served(tiny_server, tiny_onnx):
    """The bench reads profile, precision and checkpoint hash from the served llm config."""
    import asyncio

    from medgemma_triton.bench.metadata import deployment_profile
    from medgemma_triton.bench.target import TritonTarget

    async def metadata():
        async with TritonTarget(tiny_server.url) as target:
            return await target.metadata()

    served = deployment_profile(asyncio.run(metadata()))
    manifest = json.loads((tiny_onnx / "manifest.json").read_text())
    assert served["profile"] == "cpu"
    assert served["precision"] == manifest["precision"] == "fp32"
    assert served["checkpoint_sha256"] == manifest["source_checkpoint"]["sha256"]


# --- what the server must not do ---


def test_no_request_content_in_the_server_log(tiny_server, stream, expected, tokenizer):
    stream.request(messages=CHATS["text"][0], max_tokens=MAX_TOKENS)
    log = tiny_server.log_text() + tiny_server.console_text()
    assert MARKER not in log
    generated = tokenizer.decode(expected["text"][1], skip_special_tokens=True)
    if len(generated) >= 12:
        assert generated not in log


def _server_processes(server) -> list[int]:
    group = os.getpgid(server.process.pid)
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == group:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def test_models_do_not_load_torch(tiny_server, stream):
    stream.request(messages=CHATS["one-image"][0], images=CHATS["one-image"][1], max_tokens=2)
    stubs = 0
    for pid in _server_processes(tiny_server):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        if b"triton_python_backend_stub" in cmdline:
            stubs += 1
            assert "libtorch" not in maps, f"a Python model process ({pid}) loaded torch"
    assert stubs >= 4


def test_serving_modules_import_without_torch():
    code = (
        "import sys, types; sys.modules['triton_python_backend_utils'] = types.ModuleType('pb');"
        "import medgemma_triton.serving.triton_io, medgemma_triton.serving.preprocess,"
        " medgemma_triton.serving.engine, medgemma_triton.serving.text, medgemma_triton.serving.pipeline,"
        " medgemma_triton.runtime.decoder,"
        " medgemma_triton.runtime.vision;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- unit tests of the pipeline's text (no server) ---


def test_text_deltas_reproduce_the_text(tokenizer):
    from medgemma_triton.runtime.detokenize import IncrementalDetokenizer
    from medgemma_triton.serving.text import SequenceText

    rng = np.random.default_rng(0)
    multibyte = tokenizer.encode("Größe 中文 😀 ").ids
    for trial in range(20):
        ids = rng.integers(0, 262_000, size=40).tolist()
        ids[5:5] = multibyte  # multi-byte characters across tokens
        reference = IncrementalDetokenizer(tokenizer)
        expected_text = "".join(reference.add([t]) for t in ids) + reference.flush()
        assert expected_text == tokenizer.decode(ids, skip_special_tokens=True)
        for chunk in (1, 3, len(ids)):  # streaming, coarser, and all at once
            text = SequenceText(tokenizer)
            deltas = ""
            for i, token in enumerate(ids):
                text.add(token)
                if (i + 1) % chunk == 0 and i + 1 < len(ids):
                    deltas += text.take_text()
            text.finish()
            deltas += text.take_text()
            assert deltas == expected_text == text.text


def test_text_is_cut_before_stop_words(tokenizer):
    from medgemma_triton.serving.text import SequenceText

    ids = tokenizer.encode("The lungs are clear. No effusion. END of report").ids
    text = SequenceText(tokenizer, ["effusion", "END"])
    deltas = ""
    for token in ids:
        stopped = text.add(token)
        deltas += text.take_text()
        if stopped:
            break
    assert stopped
    assert deltas == "The lungs are clear. No "


# --- the dev checkpoint: real Gemma 3 270M weights ---


@pytest.mark.slow
def test_dev_checkpoint_greedy_matches_transformers(dev_server, dev_checkpoint):
    from medgemma_triton.runtime.tokenizer import load_tokenizer

    messages = user("What is a chest X-ray used for? Answer in one sentence.")
    expected_result = reference_generate(dev_checkpoint, messages, [], 20)
    s = MedgemmaStream(dev_server.url)
    try:
        outcome = s.request(messages=messages, max_tokens=20)
        image_outcome = s.request(messages=user("Describe", IMAGE), images=[png(9)], max_tokens=8)
    finally:
        s.close()
    assert outcome.error is None, outcome.error
    assert outcome.ids == expected_result[1]
    assert outcome.text == load_tokenizer(str(dev_checkpoint)).decode(outcome.ids, skip_special_tokens=True)
    assert image_outcome.ids == reference_generate(dev_checkpoint, user("Describe", IMAGE), [png(9)], 8)[1]


# --- the data flow: images through medgemma to vision_encoder, tokens from the llm, text in medgemma ---


def _inference_count(server, model: str) -> int:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.url)
    try:
        stats = client.get_inference_statistics(model_name=model, as_json=True)
    finally:
        client.close()
    return int(stats["model_stats"][0].get("inference_count", 0))


STREAM_INTERVAL = 3


@pytest.fixture(scope="module")
def limited_server(tiny_checkpoint, tiny_onnx, tmp_path_factory):
    """A second tiny server: stream_interval 3, one request decoding and one waiting at most."""
    from serving_fixtures import _start

    from medgemma_triton.repository import build_repository

    repository = build_repository(
        tiny_checkpoint, tmp_path_factory.mktemp("limited") / "repo", onnx_dir=tiny_onnx,
        settings=CpuSettings(stream_interval=STREAM_INTERVAL, max_active_requests=1),
    )
    server = _start(repository, OMP_NUM_THREADS="1", MEDGEMMA_MAX_QUEUED="1")
    try:
        yield server
    finally:
        server.stop()


def test_a_stream_interval_images_and_stop_words_flow_one_way(limited_server, expected, tokenizer):
    """A second server streams with stream_interval 3: every token until the text shows, then 3
    tokens per response, same answers. Images reach vision_encoder once each (from medgemma, text-only requests
    never), the llm answers in tokens, and stop words cut the text in medgemma: finish reason `stop`,
    the tokens up to the one that completed the stop word, and the llm request stopped without
    counting as a cancellation."""
    server = limited_server
    other = MedgemmaStream(server.url)
    try:
        images_sent = 0
        for streaming in (True, False):
            for chat in ("text", "two-images"):
                messages, images = CHATS[chat]
                seen = []  # (ids, text) received so far, response by response
                outcome = other.request(messages=messages, images=images, max_tokens=MAX_TOKENS, stream=streaming,
                                        on_response=lambda o: seen.append((len(o.ids), o.text)))
                check_outcome(outcome, expected[chat], tokenizer)
                assert_response_sizes(seen, len(outcome.ids), streaming, STREAM_INTERVAL)
                images_sent += len(images)
        assert _inference_count(server, "vision_encoder") == images_sent  # batch size 4: one call per request

        full_ids = expected["text"][1]
        full_text = tokenizer.decode(full_ids, skip_special_tokens=True)
        stop = full_text[6:9]
        cancelled_before = metric_value(server, "medgemma_cancelled_requests_total")
        for streaming in (True, False):
            outcome = other.request(messages=CHATS["text"][0], max_tokens=MAX_TOKENS, stop_words=[stop],
                                    stream=streaming)
            assert outcome.error is None, outcome.error
            assert outcome.text == full_text[: full_text.find(stop)]
            assert outcome.finish_reason == "stop"
            n = len(outcome.ids)
            assert outcome.ids == full_ids[:n] and outcome.completion_tokens == n
            assert stop in tokenizer.decode(full_ids[:n], skip_special_tokens=True)
            assert stop not in tokenizer.decode(full_ids[: n - 1], skip_special_tokens=True)
            assert streaming or outcome.responses == 1
        assert metric_value(server, "medgemma_cancelled_requests_total") == cancelled_before
    finally:
        other.close()


BUSY_MAX_TOKENS = 400


def test_overload_is_refused_at_once_while_admitted_requests_finish_exactly(limited_server, tiny_checkpoint):
    """One request decoding and one queued (max_active_requests 1, MEDGEMMA_MAX_QUEUED 1): of five sent
    at once, three are refused at once with ServerBusyError naming the limit, counted by the llm's
    refused counter; the two admitted ones finish with the reference tokens."""
    import asyncio

    from medgemma_triton.client import AsyncMedGemmaClient, ServerBusyError

    messages = user("Write a long, detailed report about a normal chest X-ray.")
    reference = reference_generate(tiny_checkpoint, messages, [], BUSY_MAX_TOKENS)[1]
    refused_before = metric_value(limited_server, "medgemma_refused_requests_total")

    async def main():
        async with AsyncMedGemmaClient(limited_server.url) as client:
            return await asyncio.gather(
                *(client.chat(messages, max_tokens=BUSY_MAX_TOKENS, temperature=0.0) for _ in range(5)),
                return_exceptions=True,
            )

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, ServerBusyError)]
    answered = [r for r in results if not isinstance(r, Exception)]
    assert len(refused) + len(answered) == 5, [r for r in results if isinstance(r, Exception)]
    assert len(refused) == 3 and len(answered) == 2
    assert all("MEDGEMMA_MAX_QUEUED" in str(r) and r.retryable for r in refused)
    assert all(list(r.token_ids) == reference for r in answered)
    assert metric_value(limited_server, "medgemma_refused_requests_total") == refused_before + 3


def test_a_moved_repository_serves_the_same_answers(tiny_checkpoint, tiny_onnx, expected, tokenizer, tmp_path):
    """A repository built in one place, copied elsewhere (`cp -r`), with the original repository, its
    export and its checkpoint then removed: Triton (`tritonserver --model-repository`, the binary
    `medgemma-triton serve` runs) serves it and it answers exactly as before."""
    from serving_fixtures import _start

    from medgemma_triton.repository import build_repository

    origin = tmp_path / "origin"
    checkpoint = shutil.copytree(tiny_checkpoint, origin / "checkpoint")
    export = shutil.copytree(tiny_onnx, origin / "export")
    built = build_repository(checkpoint, origin / "repo", onnx_dir=export)
    moved = shutil.copytree(built, tmp_path / "elsewhere" / "repo")
    shutil.rmtree(origin)
    server = _start(moved, OMP_NUM_THREADS="1")
    try:
        other = MedgemmaStream(server.url)
        for chat in ("text", "one-image"):
            messages, images = CHATS[chat]
            check_outcome(other.request(messages=messages, images=images, max_tokens=MAX_TOKENS), expected[chat],
                          tokenizer)
        other.close()
    finally:
        server.stop()


def _served_as_in_process(repository, server, requests: int = 2):
    """benchmarks/studies/overhead.py's comparison: the served pipeline vs the same repository in-process."""
    from medgemma_triton.bench.overhead import InProcessPipeline, compare
    from medgemma_triton.client import MedGemmaClient

    pipeline = InProcessPipeline(repository)
    try:
        with MedGemmaClient(server.url) as client:
            return compare(pipeline, client, requests=requests, max_tokens=12, images=1,
                           image_size=pipeline.spec.vision.image_size, block=1, progress=lambda _: None)
    finally:
        pipeline.close()


def test_in_process_pipeline_produces_what_is_served(tiny_repository, tiny_server):
    """benchmarks/studies/overhead.py compares like with like: the in-process pipeline built from the
    repository's configs generates the served tokens, request by request."""
    report = _served_as_in_process(tiny_repository, tiny_server)
    assert report.same_tokens == 2
    assert all(p["completion_tokens"] > 0 for p in report.pairs)
    assert report.served_e2e_ms_median > 0 and report.in_process_e2e_ms_median > 0


def _assert_serves_what_it_generates_in_process(repository) -> None:
    """A repository of its own on a fresh server: three requests (with images) get the in-process tokens."""
    from serving_fixtures import _start

    server = _start(repository, OMP_NUM_THREADS="1")
    try:
        report = _served_as_in_process(repository, server, requests=3)
    finally:
        server.stop()
    assert report.same_tokens == 3
    assert all(p["completion_tokens"] > 0 for p in report.pairs)


def test_an_int8_repository_serves_its_decoder(tiny_checkpoint, tiny_onnx_int8, tmp_path):
    """A cpu repository built with --precision int8 loads in Triton (DynamicQuantizeMatMul in the llm's
    ONNX Runtime) and serves the tokens its decoder generates in-process, image requests included."""
    from medgemma_triton.repository import build_repository
    from medgemma_triton.repository.cpu import CpuSettings
    from medgemma_triton.repository.cpu import validate_repository

    repository = build_repository(tiny_checkpoint, tmp_path / "repo", precision="int8", onnx_dir=tiny_onnx_int8,
                                  settings=CpuSettings(decoder_engine="onnxruntime"))
    assert validate_repository(repository)["llm"].parameters["precision"].string_value == "int8"
    _assert_serves_what_it_generates_in_process(repository)


@pytest.mark.slow
def test_an_int4_repository_serves_llamacpp(tiny_checkpoint, tmp_path):
    """--precision int4 builds a Q4_K_M GGUF for llama.cpp (the default int4 engine); Triton's llm serves
    the tokens the same decoder generates in-process, image requests included."""
    from medgemma_triton.repository import build_repository
    from medgemma_triton.repository.cpu import validate_repository

    repository = build_repository(tiny_checkpoint, tmp_path / "repo", precision="int4", cache_dir=tmp_path / "cache")
    llm = validate_repository(repository)["llm"].parameters
    assert llm["gguf_model"].string_value == "decoder.gguf" and not llm["onnx_model"].string_value
    _assert_serves_what_it_generates_in_process(repository)
