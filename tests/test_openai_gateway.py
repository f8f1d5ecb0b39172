"""The OpenAI-compatible gateway (medgemma_triton/gateway) between the official `openai` SDK and a real
Triton server, each gateway a real `medgemma-triton openai` process.

Reference: the package's own gRPC client (MedGemmaClient) on the same server, whose greedy output is
checked against transformers in test_serving.py and test_client.py. The gateway adds no model code,
so its answers must be those, text and token counts alike.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving_fixtures import _start, metric_value

from medgemma_triton.runtime.limits import Limits

pytestmark = pytest.mark.served  # starts tritonserver or the gateway: the full tier only

openai = pytest.importorskip("openai")

API_KEY = "test-key-0123456789"
MARKER = "Wombat-5521"  # a prompt string that must never reach the gateway's log
MAX_TOKENS = 16


# --- servers: Triton on the tiny and dev repositories, each with a gateway in front ---


def _repository(checkpoint_name: str, tmp_path_factory) -> Path:
    """A repository built in a temporary directory (the shared test cache's repositories are left to
    the other tests) on the cached export, which must be up to date: this test never re-exports."""
    from conftest import CACHE
    from medgemma_triton.export.manifest import exporter_version
    from medgemma_triton.repository import build_repository

    checkpoint, onnx_dir = CACHE / "checkpoints" / checkpoint_name, CACHE / "onnx" / f"{checkpoint_name}-fp32"
    try:
        manifest = json.loads((onnx_dir / "manifest.json").read_text())
    except OSError:
        pytest.skip(f"no cached {checkpoint_name} export under {CACHE} (run tests/test_serving.py first)")
    if not checkpoint.is_dir() or manifest.get("exporter_version") != exporter_version():
        pytest.skip(f"the cached {checkpoint_name} export is missing or stale (run tests/test_serving.py first)")
    return build_repository(checkpoint, tmp_path_factory.mktemp(f"repo-{checkpoint_name}") / "repo", onnx_dir=onnx_dir)


class Gateway:
    """`medgemma-triton openai` as a child process, its log in a file."""

    def __init__(self, triton_url: str, workdir: Path, *args: str, api_key: str | None = None,
                 env: dict[str, str] | None = None, preexec_fn=None):
        from medgemma_triton.server.launcher import free_port

        self.port = free_port()
        self.log_path = workdir / f"gateway-{self.port}.log"
        environ = {k: v for k, v in os.environ.items()
                   if k != "MEDGEMMA_API_KEY" and not k.startswith("MEDGEMMA_GATEWAY_")}
        if api_key:
            environ["MEDGEMMA_API_KEY"] = api_key
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "medgemma_triton.cli", "openai", "--triton-url", triton_url,
                 "--port", str(self.port), *args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**environ, **(env or {})},
                preexec_fn=preexec_fn,
            )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 60
        while not self._listening():
            assert self.process.poll() is None, f"the gateway exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"the gateway did not start:\n{self.log()}"
            time.sleep(0.1)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, headers, parsed JSON body) of one plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(data or b"null")
        finally:
            conn.close()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("media")
    (directory / "xray.png").write_bytes(png(1))
    (tmp_path_factory.getbasetemp() / "secret.png").write_bytes(png(2))
    (directory / "link.png").symlink_to(tmp_path_factory.getbasetemp() / "secret.png")
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, media_dir):
    """(Triton, gateway) on the tiny model; the gateway wants API_KEY and reads files in media_dir."""
    server = _start(_repository("tiny", tmp_path_factory), OMP_NUM_THREADS="1")
    gateway = None
    try:
        gateway = Gateway(server.url, tmp_path_factory.mktemp("gw-tiny"), "--allowed-local-media", str(media_dir),
                          api_key=API_KEY)
        yield server, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    server = _start(_repository("dev", tmp_path_factory))
    gateway = None
    try:
        gateway = Gateway(server.url, tmp_path_factory.mktemp("gw-dev"))
        yield server, gateway
    finally:
        if gateway is not None:
            gateway.stop()
        server.stop()


def sdk(gateway: Gateway, api_key: str = API_KEY, asynchronous: bool = False, **options):
    cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return cls(base_url=gateway.base_url, api_key=api_key, max_retries=0, timeout=120, **options)


def model_of(gateway: Gateway) -> str:
    return sdk(gateway).models.list().data[0].id


# --- chats, as model-card messages (the reference client's input) and as OpenAI messages ---


def png(seed: int, size=(96, 80)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def to_openai(card_messages: list[dict]) -> list[dict]:
    """The same chat as OpenAI messages: image parts become image_url parts with data URIs."""

    def part(p):
        if p["type"] == "image":
            return {"type": "image_url", "image_url": {"url": data_uri(p["image"])}}
        return p

    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else [part(p) for p in m["content"]]} for m in card_messages]


def user(*parts) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str)
                                        else {"type": "image", "image": p} for p in parts]}


CHATS = {
    "text": [user("What is a chest X-ray used for? Answer in one sentence.")],
    "system": [{"role": "system", "content": "You are an expert radiologist."}, user(f"Describe a normal chest X-ray. {MARKER}")],
    "one-image": [user("Describe this X-ray", png(1))],
    "two-images": [user("Compare", png(2, (64, 64)), "with", png(3, (120, 50)))],
    "multi-turn": [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        user("Is this chest X-ray normal?", png(4)),
        {"role": "assistant", "content": "The lungs look clear."},
        {"role": "user", "content": "And the heart?"},
    ],
}


def reference(server, chat: list[dict], **sampling):
    from medgemma_triton.client import MedGemmaClient

    with MedGemmaClient(server.url) as client:
        result = client.chat(chat, **sampling)
    assert result.completion_tokens > 0 and result.prompt_tokens > 0
    return result


def openai_finish(server_reason: str) -> str:
    return "length" if server_reason == "length" else "stop"


def ask(gateway: Gateway, chat: list[dict], mode: str, **params) -> tuple[str, str, object]:
    """(text, finish_reason, usage) of one completion through the SDK: sync, async or streamed."""
    request = dict(model=model_of(gateway), messages=to_openai(chat), **params)
    if mode == "sync":
        completion = sdk(gateway).chat.completions.create(**request)
        choice = completion.choices[0]
        return choice.message.content, choice.finish_reason, completion.usage
    if mode == "async":
        async def run():
            client = sdk(gateway, asynchronous=True)
            try:
                return await client.chat.completions.create(**request)
            finally:
                await client.close()

        completion = asyncio.run(run())
        return completion.choices[0].message.content, completion.choices[0].finish_reason, completion.usage
    text, finish, usage = [], None, None
    with sdk(gateway).chat.completions.create(stream=True, stream_options={"include_usage": True}, **request) as stream:
        for chunk in stream:
            if chunk.usage is not None:
                assert not chunk.choices  # OpenAI: usage comes in a last chunk of its own
                usage = chunk.usage
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
    return "".join(text), finish, usage


def check_same(answer, expected) -> None:
    text, finish, usage = answer
    assert text == expected.text
    assert finish == openai_finish(expected.finish_reason)
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.prompt_tokens, expected.completion_tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# --- greedy answers: what the gRPC client gets on the same server ---


@pytest.mark.slow
def test_dev_answers_match_the_grpc_client(dev):
    server, gateway = dev
    for chat, mode in (("text", "sync"), ("one-image", "stream")):
        expected = reference(server, CHATS[chat], max_tokens=MAX_TOKENS)
        check_same(ask(gateway, CHATS[chat], mode, max_tokens=MAX_TOKENS), expected)


@pytest.mark.parametrize("mode", ["sync", "async", "stream"])
@pytest.mark.parametrize("chat", ["system", "one-image", "two-images", "multi-turn"])
def test_tiny_answers_match_the_grpc_client(tiny, chat, mode):
    server, gateway = tiny
    check_same(ask(gateway, CHATS[chat], mode, max_tokens=MAX_TOKENS), reference(server, CHATS[chat], max_tokens=MAX_TOKENS))


def test_a_volume_of_85_image_parts_matches_the_grpc_client(tiny):
    """MedGemma 1.5's CT layout (image, "SLICE k", ...) within the default limits, through the SDK."""
    server, gateway = tiny
    parts = []
    for k in range(1, 86):
        parts += [png(100 + k, (48, 48)), f"SLICE {k}"]
    chat = [user(*parts, "Any findings?")]
    check_same(ask(gateway, chat, "stream", max_tokens=MAX_TOKENS), reference(server, chat, max_tokens=MAX_TOKENS))


def test_sampling_parameters_reach_the_server(tiny):
    server, gateway = tiny
    chat = CHATS["system"]
    sampled = dict(temperature=1.0, top_p=0.9, seed=7)
    expected = reference(server, chat, max_tokens=12, **sampled)
    check_same(ask(gateway, chat, "sync", max_completion_tokens=12, **sampled), expected)
    check_same(ask(gateway, chat, "stream", max_tokens=12, extra_body={"top_k": 5}, **sampled),
               reference(server, chat, max_tokens=12, top_k=5, **sampled))
    # a stop string taken from the greedy answer cuts it where the gRPC client's is cut
    greedy = reference(server, chat, max_tokens=MAX_TOKENS)
    assert len(greedy.text) > 8
    stop = greedy.text[4:7]
    stopped = reference(server, chat, max_tokens=MAX_TOKENS, stop=[stop])
    assert stopped.finish_reason == "stop" and stopped.text == greedy.text[: greedy.text.find(stop)]
    check_same(ask(gateway, chat, "sync", max_tokens=MAX_TOKENS, stop=stop), stopped)
    check_same(ask(gateway, chat, "stream", max_tokens=MAX_TOKENS, stop=[stop, "\x00never"]), stopped)


def test_local_media_inside_the_allowed_directory(tiny, media_dir):
    server, gateway = tiny
    expected = reference(server, [user("Describe this X-ray", png(1))], max_tokens=8)
    for url in (str(media_dir / "xray.png"), (media_dir / "xray.png").as_uri(), "xray.png"):
        messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                                 {"type": "image_url", "image_url": {"url": url}}]}]
        completion = sdk(gateway).chat.completions.create(model=model_of(gateway), messages=messages, max_tokens=8)
        assert completion.choices[0].message.content == expected.text
    for url in ("../secret.png", str(media_dir.parent / "secret.png"), "link.png", str(media_dir), "missing.png",
                "file://otherhost" + str(media_dir / "xray.png")):
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        with pytest.raises(openai.BadRequestError) as info:
            sdk(gateway).chat.completions.create(model=model_of(gateway), messages=messages, max_tokens=8)
        assert info.value.body["param"] == "messages"
        assert "messages[0].content[0]" in info.value.body["message"], url


# --- bad input: 400 with OpenAI's error body, while good streams finish intact ---

DEFAULT_LIMITS = Limits()  # the server's limits: the tests' servers set none of MEDGEMMA_MAX_*
# about 4.1 tokens per repeat: over the default MEDGEMMA_MAX_INPUT_TOKENS
LONG_PROMPT = "lorem ipsum dolor sit amet " * (DEFAULT_LIMITS.max_input_tokens // 4 + 100)


def _body(**overrides) -> dict:
    return {"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **overrides}


def _image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]}]


BAD_REQUESTS = {
    # name: (body or raw bytes, param, words the message must contain)
    "malformed JSON": (b'{"model": "MODEL", "messages": [}', None, ["not valid JSON"]),
    "unknown role": (_body(messages=[{"role": "doctor", "content": "hi"}]), "messages", ["messages[0].role", "'doctor'"]),
    "remote image URL": (_body(messages=_image_message("https://example.com/xray.png")), "messages",
                         ["messages[0].content[1]", "remote https URL", "data URI"]),
    "corrupt base64": (_body(messages=_image_message("data:image/png;base64,iVBORw0KGgo%%%not-base64")), "messages",
                       ["messages[0].content[1]", "not base64"]),
    "corrupt image": (_body(messages=_image_message(data_uri(png(5)[:40] + b"\x00" * 50))), "messages",
                      ["messages[0].content[1]", "not an image in a supported format"]),
    "truncated image": (_body(messages=_image_message(data_uri(png(5)[:-30]))), "messages",
                        ["messages[0].content[1] (image 0)", "corrupt or truncated"]),
    "SVG image": (_body(messages=_image_message("data:image/svg+xml;base64,"
                                                + base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg"/>').decode())),
                  "messages", ["messages[0].content[1] is an SVG image", "not supported", "PNG", "DICOM"]),
    "lone surrogate": (b'{"model": "MODEL", "messages": [{"role": "user", "content": "\\ud800"}]}', "messages",
                       ["messages[0].content", "not valid Unicode", "\\ud800"]),
    "not an image": (_body(messages=_image_message(data_uri(b"hello world, not an image"))), "messages",
                     ["messages[0].content[1]"]),
    "too many images": (_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(png(6))}}] * (DEFAULT_LIMITS.max_images + 1)}]), "messages",
                        [f"{DEFAULT_LIMITS.max_images + 1} images", "MEDGEMMA_MAX_IMAGES"]),
    "n=2": (_body(n=2), "n", ["n=2"]),
    "negative max_tokens": (_body(max_tokens=-5), "max_tokens", ["max_tokens", "-5"]),
    "max_tokens over the server's limit": (_body(max_tokens=100_000), "max_tokens", ["max_tokens", "MEDGEMMA_MAX_NEW_TOKENS"]),
    "max_tokens past 32 bits": (_body(max_tokens=3_000_000_000), "max_tokens", ["between 1 and 8192 (MEDGEMMA_MAX_NEW_TOKENS)"]),
    "prompt over the token limit": (_body(messages=[{"role": "user", "content": LONG_PROMPT}]), "messages",
                                    [f"the limit is {DEFAULT_LIMITS.max_input_tokens}", "MEDGEMMA_MAX_INPUT_TOKENS"]),
    "temperature out of range": (_body(temperature=5), "temperature", ["temperature"]),
    "logprobs": (_body(logprobs=True), "logprobs", ["logprobs"]),
    "tools": (_body(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", ["tools"]),
    "response_format": (_body(response_format={"type": "json_object"}), "response_format", ["response_format"]),
    "presence_penalty": (_body(presence_penalty=0.5), "presence_penalty", ["presence_penalty"]),
    "unknown parameter": (_body(best_of=2), "best_of", ["best_of"]),
    "stream_options without stream": (_body(stream_options={"include_usage": True}), "stream_options", ["stream"]),
    "no messages": ({"model": "MODEL"}, "messages", ["messages"]),
}


# A Python repr, an exception's type name or a traceback: none means anything to an HTTP caller.
PYTHON_INTERNALS = re.compile(r"object at 0x|<[\w.]+ object|Traceback|\b\w*(Error|Exception)\b")


def _good_streams(gateway: Gateway, chats: list[str], results: dict) -> list[threading.Thread]:
    def worker(name):
        results[name] = ask(gateway, CHATS[name], "stream", max_tokens=MAX_TOKENS)

    threads = [threading.Thread(target=worker, args=(name,)) for name in chats]
    for t in threads:
        t.start()
    return threads


def test_bad_input_is_a_400_naming_the_problem_while_streams_finish(tiny):
    server, gateway = tiny
    model = model_of(gateway)
    good: dict = {}
    threads = _good_streams(gateway, ["system", "one-image"], good)
    failures = []
    for name, (body, param, words) in BAD_REQUESTS.items():
        raw = body if isinstance(body, bytes) else json.dumps(body).replace('"MODEL"', json.dumps(model)).encode()
        status, _, answer = gateway.raw("POST", "/v1/chat/completions", raw,
                                        {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        error = (answer or {}).get("error") or {}
        if status != 400 or set(error) != {"message", "type", "param", "code"}:
            failures.append(f"{name}: HTTP {status} {answer}")
        elif error["type"] != "invalid_request_error" or error["param"] != param:
            failures.append(f"{name}: type {error['type']!r}, param {error['param']!r} (expected {param!r})")
        elif missing := [w for w in words if w not in error["message"]]:
            failures.append(f"{name}: message {error['message']!r} lacks {missing}")
        elif PYTHON_INTERNALS.search(error["message"]):
            failures.append(f"{name}: message {error['message']!r} quotes Python internals")
    for t in threads:
        t.join(300)
    assert not failures, "\n".join(failures)
    for name in ("system", "one-image"):
        check_same(good[name], reference(server, CHATS[name], max_tokens=MAX_TOKENS))


def test_the_sdk_raises_its_typed_errors(tiny):
    _, gateway = tiny
    client = sdk(gateway)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_of(gateway), messages=[{"role": "user", "content": "hi"}], n=2)
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):  # a streamed request is refused before its stream starts
        client.chat.completions.create(model=model_of(gateway), stream=True,
                                       messages=[{"role": "user", "content": LONG_PROMPT}])
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"


# --- a client that goes away stops the generation ---


def _wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


LONG_REQUEST = {"messages": [{"role": "user", "content": "Write a very long report."}], "max_tokens": 4000}


@pytest.mark.parametrize("streaming", [True, False], ids=["stream", "no-stream"])
def test_disconnect_stops_generation(tiny, streaming):
    server, gateway = tiny
    cancelled_before = metric_value(server, "medgemma_cancelled_requests_total")
    tokens_before = metric_value(server, "medgemma_generated_tokens_total")
    under_way = tokens_before + 8
    if streaming:  # the SDK's stream, closed after its first chunks
        stream = sdk(gateway).chat.completions.create(model=model_of(gateway), stream=True, **LONG_REQUEST)
        chunks = iter(stream)
        next(chunks), next(chunks)
        _wait_for(lambda: metric_value(server, "medgemma_generated_tokens_total") >= under_way, "nothing generated")
        stream.close()
    else:  # a plain connection that sends the request and hangs up without reading
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
        body = json.dumps({"model": model_of(gateway), **LONG_REQUEST})
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Authorization": f"Bearer {API_KEY}"})
        _wait_for(lambda: metric_value(server, "medgemma_generated_tokens_total") >= under_way, "nothing generated")
        conn.close()
    _wait_for(lambda: metric_value(server, "medgemma_cancelled_requests_total") > cancelled_before,
              "the server never saw the cancellation", timeout_s=20)
    _wait_for(lambda: metric_value(server, "medgemma_active_requests") == 0, "the request is still active", timeout_s=20)
    tokens = metric_value(server, "medgemma_generated_tokens_total")
    time.sleep(1.0)
    assert metric_value(server, "medgemma_generated_tokens_total") == tokens  # nothing generates any more
    assert tokens - tokens_before < LONG_REQUEST["max_tokens"] // 2
    assert metric_value(server, "medgemma_cancelled_requests_total") == cancelled_before + 1


# --- security: API key, request id, TLS, what the log holds ---


def test_api_key_is_required(tiny):
    server, gateway = tiny
    body = json.dumps(_body(model=model_of(gateway))).encode()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"}):
        status, response_headers, answer = gateway.raw("POST", "/v1/chat/completions", body, headers)
        assert status == 401, headers
        assert answer["error"]["type"] == "authentication_error" and answer["error"]["code"] == "invalid_api_key"
        assert response_headers.get("www-authenticate") == "Bearer"
    assert gateway.raw("GET", "/v1/models")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, api_key="wrong").chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    assert gateway.raw("GET", "/health")[0] == 200  # probes need no key
    status, _, answer = gateway.raw("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1


def test_request_id_is_echoed(tiny):
    _, gateway = tiny
    auth = {"Authorization": f"Bearer {API_KEY}"}
    _, headers, _ = gateway.raw("GET", "/v1/models", headers={**auth, "X-Request-Id": "trace-42.a"})
    assert headers["x-request-id"] == "trace-42.a"
    _, headers, _ = gateway.raw("GET", "/v1/models", headers={"X-Request-Id": "no-key"})  # refusals carry it too
    assert headers["x-request-id"] == "no-key"
    ids = {gateway.raw("GET", "/v1/models", headers=auth)[1]["x-request-id"] for _ in range(2)}
    ids.add(gateway.raw("GET", "/v1/models", headers={**auth, "X-Request-Id": "bad id\twith spaces"})[1]["x-request-id"])
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)  # generated when absent or unusable
    raw = sdk(gateway).chat.completions.with_raw_response.create(
        model=model_of(gateway), messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        extra_headers={"x-request-id": "sdk-7"})
    assert raw.headers["x-request-id"] == "sdk-7"


def test_no_request_content_in_the_gateway_log(tiny):
    server, gateway = tiny
    text, _, _ = ask(gateway, CHATS["system"], "sync", max_tokens=MAX_TOKENS)
    ask(gateway, CHATS["one-image"], "stream", max_tokens=MAX_TOKENS)
    log = gateway.log()
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in log  # the access log is on
    assert MARKER not in log
    assert len(text) >= 8 and text not in log
    assert base64.b64encode(png(1)).decode()[:40] not in log


def test_tls_and_health(tiny, tmp_path):
    server, _ = tiny
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    gateway = Gateway(server.url, tmp_path, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--model-name", "mg")
    try:
        import ssl

        with pytest.raises(OSError):  # plain HTTP gets no answer
            urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/health", timeout=10)
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"https://127.0.0.1:{gateway.port}/health", context=context, timeout=10) as r:
            assert r.status == 200
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{gateway.port}/v1", api_key="none", max_retries=0,
                               http_client=openai.DefaultHttpxClient(verify=context))
        completion = client.chat.completions.create(model="mg", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert completion.model == "mg" and completion.usage.completion_tokens >= 1
    finally:
        gateway.stop()


def test_health_is_503_without_a_ready_model(tmp_path):
    from medgemma_triton.server.launcher import free_port

    gateway = Gateway(f"127.0.0.1:{free_port()}", tmp_path, "--model-name", "medgemma-4b-it")
    try:
        status, _, answer = gateway.raw("GET", "/health")
        assert status == 503 and answer["error"]["code"] == "model_not_ready"
        status, _, answer = gateway.raw("POST", "/v1/chat/completions", json.dumps(_body(model="medgemma-4b-it")).encode())
        assert status == 502 and answer["error"]["type"] == "server_error"
        # local files are off unless --allowed-local-media: refused before the (absent) server is asked
        status, _, answer = gateway.raw("POST", "/v1/chat/completions", json.dumps(
            _body(model="medgemma-4b-it", messages=_image_message("/etc/passwd"))).encode())
        assert status == 400 and answer["error"]["code"] == "local_media_not_allowed"
    finally:
        gateway.stop()


# --- `serve --openai-port`: the gateway beside Triton, one lifecycle ---


def test_serve_runs_the_gateway_beside_triton(tmp_path_factory):
    from medgemma_triton.server.launcher import free_port

    repository = _repository("tiny", tmp_path_factory)
    ports = {name: free_port() for name in ("grpc", "http", "metrics", "openai")}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDGEMMA_API_KEY": API_KEY}
    process = subprocess.Popen(
        [sys.executable, "-m", "medgemma_triton.cli", "serve", str(repository), "--grpc-port", str(ports["grpc"]),
         "--http-port", str(ports["http"]), "--metrics-port", str(ports["metrics"]), "--openai-port", str(ports["openai"]),
         "--openai-model-name", "medgemma-4b-it"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['openai']}/v1", api_key=API_KEY, max_retries=0)
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.stdout.read().decode(errors="replace")
            try:
                if [m.id for m in client.models.list().data] == ["medgemma-4b-it"]:
                    break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the gateway never answered"
                time.sleep(0.3)
        completion = client.chat.completions.create(model="medgemma-4b-it", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=3)
        assert completion.usage.completion_tokens >= 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        with pytest.raises(openai.APIConnectionError):  # the gateway went with it
            client.models.list()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


# --- the benchmark, at tiny size (numbers are not checked, only that they are measured and saved) ---


def test_gateway_overhead_benchmark_runs(tiny, tmp_path):
    from conftest import REPO_ROOT

    server, gateway = tiny
    output = tmp_path / "overhead.json"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "studies" / "gateway_overhead.py"), "--url", server.url,
         "--gateway-url", gateway.base_url, "--gateway-pid", str(gateway.process.pid), "--api-key", API_KEY, "--concurrency", "1,2", "--rounds", "1",
         "--requests", "2", "--max-tokens", "4", "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    document = json.loads(output.read_text())
    assert document["host"]["cpu"] in result.stdout
    assert [p["concurrency"] for p in document["points"]] == [1, 2]
    for point in document["points"]:
        for path in ("grpc", "gateway"):
            records = point[path]["records"]
            assert len(records) == 2 and all(r["error"] is None for r in records), records
            assert all(0 < r["ttft_ms"] <= r["e2e_ms"] and r["completion_tokens"] >= 1 for r in records)
        assert point["gateway"]["process_cpu_ms_per_request"] >= 0  # 10 ms clock ticks: 0 is possible at this size
        # both paths were sent the same requests and gave the same (greedy) answers
        assert [r["completion_tokens"] for r in point["grpc"]["records"]] == [
            r["completion_tokens"] for r in point["gateway"]["records"]]
