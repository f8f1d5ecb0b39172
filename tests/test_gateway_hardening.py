"""The OpenAI gateway against hostile and broken clients: idle and trickling connections, more
connections than it may hold, inexact credentials, and requests whose refusals once leaked Python
internals or a wrong limit.

Each gateway is a real `medgemma-triton openai` process on 127.0.0.1 (test_openai_gateway.Gateway),
with short deadlines set through its MEDGEMMA_GATEWAY_* variables. No Triton server runs (the gateway
points at a port nothing listens on): every answer checked here is the gateway's own, given before it
would ask the server; a request the gateway lets through gets 502 upstream_unavailable. Slow clients
are raw sockets; everything else is the official `openai` SDK or http.client.
"""

from __future__ import annotations

import http.client
import io
import json
import resource
import select
import socket
import time

import numpy as np
import pytest
from PIL import Image

from test_openai_gateway import API_KEY, PYTHON_INTERNALS, Gateway, data_uri, png

pytestmark = pytest.mark.served  # starts tritonserver or the gateway: the full tier only

openai = pytest.importorskip("openai")

MODEL = "medgemma-4b-it"
HEADER_TIMEOUT_S = 2
BODY_TIMEOUT_S = 2
# every wait below ends well within this: ten times the deadlines it checks
BOUND_S = 10 * max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S)
TRICKLE_INTERVAL_S = 0.25  # 4 bytes/s: slower than any real client, far faster than 1 byte/s


def _absent_triton() -> str:
    from medgemma_triton.server.launcher import free_port

    return f"127.0.0.1:{free_port()}"


def _env(**settings) -> dict[str, str]:
    from medgemma_triton.gateway.config import ConnectionLimits

    return {ConnectionLimits.env_name(name): str(value) for name, value in settings.items()}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gateway = Gateway(_absent_triton(), tmp_path_factory.mktemp("gw-hardening"), "--model-name", MODEL,
                      api_key=API_KEY, env=_env(header_timeout_s=HEADER_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S))
    try:
        yield gateway
    finally:
        gateway.stop()


def sdk(gateway: Gateway):
    return openai.OpenAI(base_url=gateway.base_url, api_key=API_KEY, max_retries=0, timeout=BOUND_S)


def assert_serves_normally(gateway: Gateway) -> None:
    """A normal request is answered (retried briefly while closed connections are still counted)."""
    deadline = time.monotonic() + BOUND_S
    while True:
        try:
            assert [m.id for m in sdk(gateway).models.list().data] == [MODEL]
            return
        except openai.InternalServerError:
            assert time.monotonic() < deadline, "the gateway still refuses after its connections closed"
            time.sleep(0.2)


# --- raw sockets ---


def connect(gateway: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gateway.port), timeout=BOUND_S)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def read_until_closed(sock: socket.socket, started: float) -> bytes:
    received = b""
    while chunk := _recv(sock):
        received += chunk
        assert time.monotonic() - started < BOUND_S, "the gateway kept the connection open"
    return received


def trickle(sock: socket.socket, data: bytes) -> tuple[bytes, float]:
    """Send `data` a byte at a time, reading what comes back, until the gateway closes the connection:
    (everything it sent, seconds from the first byte until it closed)."""
    received, started = b"", time.monotonic()
    for byte in data:
        assert time.monotonic() - started < BOUND_S, f"the gateway still reads a trickle after {BOUND_S} s"
        while select.select([sock], [], [], 0)[0]:
            chunk = _recv(sock)
            if not chunk:
                return received, time.monotonic() - started
            received += chunk
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # closed under us: what it answered is still readable
            break
        time.sleep(TRICKLE_INTERVAL_S)
    else:
        pytest.fail(f"the gateway took all {len(data)} trickled bytes")
    return received + read_until_closed(sock, started), time.monotonic() - started


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def error_of(response: bytes) -> dict:
    return json.loads(response.partition(b"\r\n\r\n")[2])["error"]


# --- 1: slow and idle connections, and too many of them ---


def test_an_idle_connection_is_closed_after_the_header_timeout(gateway):
    with connect(gateway) as sock:
        started = time.monotonic()
        try:
            assert _recv(sock) == b""
        except TimeoutError:
            pytest.fail(f"an idle connection was still open after {BOUND_S} s")
        assert time.monotonic() - started < BOUND_S
    assert_serves_normally(gateway)


def test_headers_sent_a_byte_at_a_time_are_cut_off_with_a_408(gateway):
    request = (f"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
               f"X-Padding: {'p' * 200}\r\n\r\n").encode()
    with connect(gateway) as sock:
        response, seconds = trickle(sock, request)
    assert seconds < BOUND_S
    assert status_of(response) == 408, response
    assert error_of(response)["code"] == "request_timeout"
    assert "MEDGEMMA_GATEWAY_HEADER_TIMEOUT_S" in error_of(response)["message"]
    assert_serves_normally(gateway)


@pytest.mark.parametrize("authorized", [True, False], ids=["awaiting-body", "answered-401-first"])
def test_a_body_sent_a_byte_at_a_time_is_cut_off(gateway, authorized):
    """Authorized, the gateway waits for the body and answers 408; without a key it has answered 401
    before reading the body, and still closes the connection on the trickle."""
    auth = f"Authorization: Bearer {API_KEY}\r\n" if authorized else ""
    headers = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n"
               "Content-Length: 1000\r\n\r\n").encode()
    with connect(gateway) as sock:
        sock.sendall(headers)
        response, seconds = trickle(sock, b"x" * 1000)
    assert seconds < BOUND_S
    assert status_of(response) == (408 if authorized else 401), response
    if authorized:
        assert "MEDGEMMA_GATEWAY_BODY_TIMEOUT_S" in error_of(response)["message"]
    assert_serves_normally(gateway)


def test_a_large_body_at_a_fair_rate_outlasts_the_body_timeout(gateway):
    """The body deadline is a pace, not a total: 1 MiB sent over twice the body timeout gets through."""
    body = json.dumps(_chat(user="u" * 2**20)).encode()
    pieces = [body[i:i + 2**16] for i in range(0, len(body), 2**16)]
    interval_s = 2 * BODY_TIMEOUT_S / len(pieces)
    with connect(gateway) as sock:
        sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode())
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(interval_s)
        response = read_until_closed(sock, time.monotonic())
    assert status_of(response) == 502 and error_of(response)["code"] == "upstream_unavailable", response[:300]


def test_past_the_connection_cap_a_request_gets_a_503_not_a_hang(tmp_path):
    cap = 8
    gateway = Gateway(_absent_triton(), tmp_path, "--model-name", MODEL, api_key=API_KEY,
                      env=_env(max_connections=cap, header_timeout_s=10 * BOUND_S))
    held = []
    try:
        held = [connect(gateway) for _ in range(cap)]
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:
            sdk(gateway).models.list()
        assert time.monotonic() - started < BOUND_S
        assert info.value.status_code == 503 and info.value.body["code"] == "too_many_connections"
        assert "MEDGEMMA_GATEWAY_MAX_CONNECTIONS" in info.value.body["message"]
        for sock in held:
            sock.close()
        assert_serves_normally(gateway)
    finally:
        for sock in held:
            sock.close()
        gateway.stop()


def _open_files_of(pid: int) -> tuple[int, int]:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1024, reason="needs a hard open-file limit >= 1024")
def test_the_open_file_limit_is_raised_and_the_cap_kept_below_it(tmp_path):
    """Started with 64 files allowed (hard limit 256), 150 idle connections used to exhaust them, and a
    real request then waited unaccepted. The gateway raises its limit to 256 and holds at most 128."""
    soft, hard = 64, 256

    def lower_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    gateway = Gateway(_absent_triton(), tmp_path, "--model-name", MODEL, api_key=API_KEY,
                      env=_env(header_timeout_s=10 * BOUND_S), preexec_fn=lower_limit)
    held = []
    try:
        assert _open_files_of(gateway.process.pid) == (hard, hard)
        held = [connect(gateway) for _ in range(150)]
        with pytest.raises(openai.InternalServerError) as info:
            sdk(gateway).models.list()
        assert info.value.status_code == 503 and "128 open connections" in info.value.body["message"]
        for sock in held:
            sock.close()
        assert_serves_normally(gateway)
    finally:
        for sock in held:
            sock.close()
        gateway.stop()


# --- 2: the API key, and what the access log holds ---


def request_with_headers(gateway: Gateway, headers: list[tuple[str, str]], path: str = "/v1/models") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=BOUND_S)
    try:
        conn.putrequest("GET", path)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_the_api_key_must_be_exact_and_sent_once(gateway):
    good = ("Authorization", f"Bearer {API_KEY}")
    refused = {
        "two spaces": [("Authorization", f"Bearer  {API_KEY}")],
        "a tab before the key": [("Authorization", f"Bearer \t{API_KEY}")],
        "text after the key": [("Authorization", f"Bearer {API_KEY} x")],
        "the key twice": [good, good],
        "a second, wrong key": [good, ("Authorization", "Bearer wrong")],
    }
    answers = {name: request_with_headers(gateway, headers) for name, headers in refused.items()}
    assert answers == {name: 401 for name in refused}
    assert request_with_headers(gateway, [good]) == 200
    assert request_with_headers(gateway, [("Authorization", f"bearer {API_KEY}")]) == 200  # RFC 9110: any case


def test_the_access_log_has_paths_without_query_strings(gateway):
    secret = "query-secret-4417"
    assert request_with_headers(gateway, [("Authorization", f"Bearer {API_KEY}")], f"/v1/models?token={secret}") == 200
    deadline = time.monotonic() + BOUND_S
    while '"GET /v1/models HTTP/1.1" 200' not in gateway.log():
        assert time.monotonic() < deadline, gateway.log()
        time.sleep(0.1)
    assert secret not in gateway.log()


# --- 3: refusals say what is wrong, in the caller's terms ---

def post(gateway: Gateway, body: bytes | dict) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, answer = gateway.raw("POST", "/v1/chat/completions", raw,
                                    {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert isinstance(answer, dict) and "error" in answer, answer
    assert not PYTHON_INTERNALS.search(answer["error"]["message"]), answer
    return status, answer["error"]


def test_a_lone_surrogate_is_a_400_naming_where_it_is(gateway):
    bodies = {
        "messages[0].content": b'{"model": "M", "messages": [{"role": "user", "content": "a \\ud800 b"}]}',
        "messages[0].content[1].text": b'{"model": "M", "messages": [{"role": "user", "content": [{"type": "text", '
                                       b'"text": "fine"}, {"type": "text", "text": "\\udfff"}]}]}',
        "stop[0]": b'{"model": "M", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}',
    }
    for where, body in bodies.items():
        status, error = post(gateway, body.replace(b'"M"', json.dumps(MODEL).encode()))
        assert status == 400, (where, error)
        assert error["message"].startswith(f"{where} contains text that is not valid Unicode"), error
        assert error["code"] == "invalid_unicode" and error["param"] == where.split("[")[0]
    # a surrogate pair is a character beyond U+FFFF, which is fine: this one is let through to the server
    status, error = post(gateway, b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
                         % MODEL.encode())
    assert status == 502 and error["code"] == "upstream_unavailable"


def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def test_max_tokens_is_refused_at_the_servers_limit_and_named(gateway, tmp_path):
    for value in (8193, 3_000_000_000):
        status, error = post(gateway, _chat(max_tokens=value))
        assert status == 400 and error["param"] == "max_tokens"
        assert error["message"] == f"max_tokens is {value}; it must be between 1 and 8192 (MEDGEMMA_MAX_NEW_TOKENS)"
    assert post(gateway, _chat(max_tokens=8192))[0] == 502  # within the limit: sent on
    limited = Gateway(_absent_triton(), tmp_path, "--model-name", MODEL, api_key=API_KEY,
                      env={"MEDGEMMA_MAX_NEW_TOKENS": "100"})
    try:
        status, error = post(limited, _chat(max_completion_tokens=101))
        assert status == 400 and error["param"] == "max_completion_tokens"
        assert "between 1 and 100 (MEDGEMMA_MAX_NEW_TOKENS)" in error["message"]
        assert post(limited, _chat(max_completion_tokens=100))[0] == 502
    finally:
        limited.stop()


def _encoded(format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(buffer, format=format, **options)
    return buffer.getvalue()


def dicom(replace: tuple[bytes, bytes] | None = None, **elements) -> bytes:
    """An 8x8 MONOCHROME2 DICOM file; `replace` edits its bytes once (values pydicom would not write; the
    old bytes hold a "-", which no UID has)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    for name, value in elements.items():
        setattr(ds, name, value)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    return data.replace(*replace, 1) if replace else data


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect/></svg>'


def _refused_images() -> dict[str, tuple[bytes, list[str]]]:
    """name: (image bytes, words the refusal must hold besides messages[0].content[1])."""
    from pydicom.dataset import Dataset

    return {
        "SVG": (SVG, ["SVG", "not supported", "PNG", "JPEG", "DICOM"]),
        "PNG signature only": (b"\x89PNG\r\n\x1a\n", ["not an image in a supported format"]),
        "PNG header then zeros": (png(5)[:40] + b"\x00" * 50, ["not an image in a supported format"]),
        "truncated GIF": (_encoded("GIF")[:30], ["not an image in a supported format"]),
        "text": (b"hello world, not an image", ["PNG, JPEG"]),
        "DICOM without pixels": (b"\x00" * 128 + b"DICM" + b"\x00" * 64, ["no pixel data"]),
        "DICOM with a non-numeric window": (dicom((b"-7777", b"ab;cd"), WindowCenter="-7777", WindowWidth="10"),
                                            ["DICOM", "cannot be rendered"]),
        "DICOM VOI LUT item without a descriptor": (dicom(VOILUTSequence=[Dataset()]), ["DICOM", "cannot be rendered"]),
        "DICOM with a non-numeric rescale slope": (dicom((b"-8888", b"x;y z"), RescaleSlope="-8888", RescaleIntercept="0"),
                                                   ["DICOM", "cannot be rendered"]),
        "DICOM with truncated pixel data": (dicom()[:-40], ["DICOM", "cannot be rendered"]),
    }


def _image_request(image: bytes, media_type: str = "image/png") -> dict:
    url = f"data:{media_type};base64," + data_uri(image).partition(",")[2]
    return _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "x"},
                                                        {"type": "image_url", "image_url": {"url": url}}]}])


def test_image_refusals_name_the_part_and_the_formats_taken(gateway):
    failures = []
    for name, (image, words) in _refused_images().items():
        status, error = post(gateway, _image_request(image, "image/svg+xml" if name == "SVG" else "image/png"))
        missing = [w for w in ["messages[0].content[1]", *words] if w not in error["message"]]
        if status != 400 or error["param"] != "messages" or missing:
            failures.append(f"{name}: HTTP {status} {error} (lacks {missing})")
    assert not failures, "\n".join(failures)
    # what the gateway takes is sent on: PNG, JPEG and GIF, and a DICOM it renders
    for image in (png(1), _encoded("JPEG"), _encoded("GIF"), dicom()):
        status, error = post(gateway, _image_request(image))
        assert status == 502 and error["code"] == "upstream_unavailable", error
