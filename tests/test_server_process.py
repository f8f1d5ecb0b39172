"""Starting and stopping tritonserver: broken repositories fail fast and say why; nothing hangs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medgemma_triton.processes import process_alive
from medgemma_triton.server.launcher import ServerError, TritonServer, find_triton, server_environment
from medgemma_triton.server.supervisor import MODEL_PROCESS_DIED

pytestmark = pytest.mark.served  # starts tritonserver or the gateway: the full tier only

ECHO_CONFIG = """
name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "x" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

ECHO_MODEL = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        {initialize}

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.get_input_tensor_by_name(r, "x")]) for r in requests]
"""


def _repository(root: Path, config: str = ECHO_CONFIG, initialize: str = "pass") -> Path:
    model = root / "repo" / "echo"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(config)
    (model / "1" / "model.py").write_text(ECHO_MODEL.replace("{initialize}", initialize))
    return root / "repo"


def _start_expecting_failure(repository, ready_timeout_s=60.0) -> tuple[str, float]:
    server = TritonServer(repository, ready_timeout_s=ready_timeout_s)
    started = time.monotonic()
    with pytest.raises(ServerError) as info:
        server.start()
    elapsed = time.monotonic() - started
    assert server.process is None  # stopped and reaped
    assert not server.workdir.exists()  # a failed start leaves nothing in /tmp
    return str(info.value), elapsed


def test_installation_and_environment():
    installation = find_triton()
    assert installation.binary.is_file()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if installation.stub is not None:
        assert installation.stub.parent.name == version
    env = server_environment(installation, base={"PATH": "/usr/bin"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    import sysconfig

    assert sysconfig.get_config_var("LIBDIR") in env["LD_LIBRARY_PATH"].split(os.pathsep)


def test_a_working_repository_serves_and_stops(tmp_path):
    import numpy as np
    import tritonclient.grpc as grpcclient

    with TritonServer(_repository(tmp_path), ready_timeout_s=60) as server:
        client = grpcclient.InferenceServerClient(server.url)
        x = grpcclient.InferInput("x", [1], "INT32")
        x.set_data_from_numpy(np.array([7], dtype=np.int32))
        assert client.infer("echo", [x]).as_numpy("x").tolist() == [7]
        client.close()
        pid = server.process.pid
        workdir = server.workdir
        assert (workdir / "tritonserver.log").is_file()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not workdir.exists()  # its temporary directory (log, backend copy) goes with it


def test_config_syntax_error_fails_fast(tmp_path):
    message, elapsed = _start_expecting_failure(_repository(tmp_path, ECHO_CONFIG.replace("dims: [ 1 ]", "dims: [ one ]", 1)))
    assert "echo" in message
    assert elapsed < 30


def test_failing_initialize_reports_the_exception(tmp_path):
    message, elapsed = _start_expecting_failure(
        _repository(tmp_path, initialize='raise ValueError("vision_encoder.onnx is missing (xyzzy)")')
    )
    assert "xyzzy" in message
    assert elapsed < 60


def test_hanging_model_hits_the_readiness_deadline(tmp_path):
    message, elapsed = _start_expecting_failure(_repository(tmp_path, initialize="import time; time.sleep(600)"), 6)
    assert "not ready within 6 s" in message
    assert elapsed < 40


def test_missing_artifact_in_a_built_repository(tiny_repository, tmp_path):
    from medgemma_triton.repository.config import read_config, write_config

    repository = tmp_path / "repo"
    shutil.copytree(tiny_repository, repository)
    config = read_config(repository / "llm" / "config.pbtxt")
    config.parameters["onnx_model"].string_value = str(tmp_path / "nowhere" / "decoder.onnx")
    write_config(config, repository / "llm" / "config.pbtxt")
    message, elapsed = _start_expecting_failure(repository, ready_timeout_s=120)
    assert "llm" in message and "nowhere" in message
    assert elapsed < 120


def _serve(repository, *extra, tmp_path):
    """`medgemma-triton serve` with its temporary directory (and so the log it keeps) under tmp_path."""
    return subprocess.Popen(
        [sys.executable, "-m", "medgemma_triton.cli", "serve", str(repository), "--grpc-port", "0",
         "--http-port", "0", "--metrics-port", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)},
    )


def test_serve_cli_exits_nonzero_on_a_broken_repository(tmp_path):
    process = _serve(_repository(tmp_path, initialize='raise RuntimeError("plugh")'), "--ready-timeout", "60",
                     tmp_path=tmp_path)
    try:
        _, stderr = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert "plugh" in stderr


def test_serve_cli_runs_until_sigterm(tmp_path):
    process = _serve(_repository(tmp_path), "--ready-timeout", "60", tmp_path=tmp_path)
    try:
        deadline = time.monotonic() + 60
        line = ""
        while "Triton ready" not in line:
            assert time.monotonic() < deadline and process.poll() is None, "serve never became ready"
            line = process.stderr.readline()
        log = Path(process.stderr.readline().removeprefix("log:").strip())
        assert log.is_file() and log.parent.parent == tmp_path
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        # A clean stop leaves nothing in the temporary directory: no log, no copy of Triton's backends.
        assert not log.parent.exists()
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_cli_stops_cleanly_on_sigterm_while_loading(tmp_path):
    marker = tmp_path / "stub.pid"
    initialize = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    process = _serve(_repository(tmp_path, initialize=initialize), "--ready-timeout", "180", tmp_path=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (marker.exists() and marker.read_text()):
            assert time.monotonic() < deadline and process.poll() is None, "the model never started loading"
            time.sleep(0.2)
        stub = int(marker.read_text())
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=40) == 0
        assert "Triton ready" not in process.stderr.read()
        deadline = time.monotonic() + 10
        while process_alive(stub) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not process_alive(stub), "the loading model's stub outlived serve"
    finally:
        if process.poll() is None:
            process.kill()


STREAM_ERROR_BOUND_S = 30  # model process killed -> every open stream has ended with an error


def _stub_pids(serve_pid: int, instance: str) -> list[int]:
    """Stub processes of `instance` (e.g. "llm_0_0") of the tritonserver that `serve_pid` started."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                # argv[5]: the stub's tritonserver, whose parent is serve
                server_parent = Path(f"/proc/{int(argv[5])}/stat").read_text().rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError, ValueError):
                continue
            if argv[0].endswith(b"triton_python_backend_stub") and argv[8] == instance.encode() \
                    and int(server_parent) == serve_pid:
                pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize("instance", ["llm_0_0", "preprocessing_0_0"])
def test_a_killed_model_process_ends_every_open_stream_and_serve(tiny_repository, tmp_path, instance):
    """SIGKILL one model's Python process while streams are open: every stream ends with a clear error
    within STREAM_ERROR_BOUND_S (nothing hangs), readiness fails, and serve exits with
    MODEL_PROCESS_DIED for an orchestrator to restart it."""
    import threading
    import urllib.error
    import urllib.request

    from medgemma_triton.client import MedGemmaClient, MedGemmaError

    process = _serve(tiny_repository, "--ready-timeout", "120", tmp_path=tmp_path)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "Triton ready" not in line:
            assert time.monotonic() < deadline and process.poll() is None, "serve never became ready"
            line = process.stderr.readline()
        grpc_url = line.split("gRPC ", 1)[1].split(",", 1)[0]
        http_url = line.split("HTTP ", 1)[1].split(",", 1)[0]
        outcomes: list = []
        streaming = [threading.Event() for _ in range(3)]

        def long_stream(started: threading.Event):
            try:
                with MedGemmaClient(grpc_url) as client:
                    with client.stream_chat("Write a very long report.", max_tokens=8000) as stream:
                        for _ in stream:
                            started.set()
                outcomes.append(("finished", None, time.monotonic()))
            except MedGemmaError as exc:
                outcomes.append(("error", exc, time.monotonic()))

        threads = [threading.Thread(target=long_stream, args=(event,), daemon=True) for event in streaming]
        for thread in threads:
            thread.start()
        for event in streaming:
            assert event.wait(timeout=60), "a stream never produced text"
        pids = [pid for pid in _stub_pids(process.pid, instance) if process_alive(pid)]
        assert len(pids) == 1, f"{instance} processes of this server: {pids}"
        killed_at = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        for thread in threads:
            thread.join(timeout=STREAM_ERROR_BOUND_S)
        assert not any(t.is_alive() for t in threads), "a stream hung after the model process died"
        assert [o[0] for o in outcomes] == ["error"] * 3, outcomes
        ended_after_s = max(o[2] for o in outcomes) - killed_at
        print(f"\n{instance} killed: streams ended {ended_after_s:.1f} s later with {[repr(o[1]) for o in outcomes]}")
        assert ended_after_s < STREAM_ERROR_BOUND_S
        assert process.wait(timeout=STREAM_ERROR_BOUND_S) == MODEL_PROCESS_DIED
        assert instance in process.stderr.read()
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()


def _image_chat(url: str, seed: int):
    """One image request; its result, or the MedGemmaError it ended with."""
    import io

    from PIL import Image

    from medgemma_triton.client import MedGemmaClient, MedGemmaError

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (seed % 256, 40, 90)).save(buffer, format="PNG")
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                             {"type": "image", "image": buffer.getvalue()}]}]
    try:
        with MedGemmaClient(url) as client:
            return client.chat(messages, max_tokens=4, timeout=60)
    except MedGemmaError as exc:
        return exc


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_vision_encoder_process_that_dies_or_stops_is_replaced(tiny_repository, tmp_path, how):
    """The vision encoder holds no request state: when its process is killed, or stays stopped (as under
    a debugger) while an image request waits for it, serve reloads the model. The waiting request fails
    with a clear error, the next image requests are answered, and serve keeps serving until SIGTERM
    (exit 0). Before, a stopped vision process died when it resumed, Triton 2.51 aborted on the model's
    next request, and serve exited."""
    import threading

    process = _serve(tiny_repository, "--ready-timeout", "120", tmp_path=tmp_path)
    try:
        grpc_url = _wait_ready_line(process).split("gRPC ", 1)[1].split(",", 1)[0]
        assert not isinstance(_image_chat(grpc_url, 1), Exception)
        (pid,) = _stub_pids(process.pid, "vision_encoder_0_0")
        waiting = {}
        if how == "SIGKILL":
            os.kill(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGSTOP)
            thread = threading.Thread(target=lambda: waiting.update(result=_image_chat(grpc_url, 2)))
            thread.start()
            thread.join(timeout=30)
            assert "not healthy" in str(waiting["result"]), waiting  # Triton's health check failed it
        lines = _lines_until(process, "vision_encoder reloaded", timeout_s=60)
        assert any("reloading vision_encoder" in line for line in lines), lines
        deadline = time.monotonic() + 10
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_alive(pid)  # a stopped one is killed, never left to resume
        answers = [_image_chat(grpc_url, 3 + i) for i in range(3)]
        assert not any(isinstance(answer, Exception) for answer in answers), answers
        assert process.poll() is None, "serve exited"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            os.kill(pid, signal.SIGCONT)


def _lines_until(process, text: str, timeout_s: float) -> list[str]:
    """serve's stderr lines up to the first that contains `text`."""
    deadline = time.monotonic() + timeout_s
    lines = []
    while not lines or text not in lines[-1]:
        assert time.monotonic() < deadline and process.poll() is None, f"serve never said {text!r}: {lines}"
        lines.append(process.stderr.readline())
    return lines


def _wait_ready_line(process, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    line = ""
    while "Triton ready" not in line:
        assert time.monotonic() < deadline and process.poll() is None, "serve never became ready"
        line = process.stderr.readline()
    return line


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


DRAIN_S = 20


def _kernel_log() -> str | None:
    """The kernel's log (where a process's segfault is recorded), or None where it cannot be read."""
    try:
        done = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _crashes(kernel_log_before: str | None, pids) -> list[str]:
    """Kernel-log lines, new since `kernel_log_before`, that record a crash of one of `pids`."""
    after = _kernel_log()
    if kernel_log_before is None or after is None:
        print("\nthe kernel log is unreadable here: model-process crashes at stop are not checked")
        return []
    new = after[len(kernel_log_before):] if after.startswith(kernel_log_before) else after
    return [line for line in new.splitlines() if any(f"[{pid}]: segfault" in line for pid in pids)]


def test_sigterm_drains_streams_in_flight_then_unloads_every_model(tiny_repository, tmp_path):
    """SIGTERM: readiness turns false at once, a new request is refused as unavailable, the stream in
    flight finishes with every token, every model unloads (no exit timeout), no model process crashes
    on its way out (after a refused and a streamed request), and serve exits 0 well within its drain
    time."""
    import threading
    import urllib.error
    import urllib.request

    from medgemma_triton.client import InvalidArgumentError, MedGemmaClient, UnavailableError

    log = tmp_path / "triton.log"
    process = _serve(tiny_repository, "--ready-timeout", "120", "--drain-timeout", str(DRAIN_S), "--log-file", str(log),
                     tmp_path=tmp_path)
    try:
        line = _wait_ready_line(process)
        grpc_url = line.split("gRPC ", 1)[1].split(",", 1)[0]
        http_url = line.split("HTTP ", 1)[1].split(",", 1)[0]
        (triton,) = _children(process.pid)
        stubs = _children(triton)
        assert len(stubs) == 4
        kernel_log = _kernel_log()
        with MedGemmaClient(grpc_url) as client, pytest.raises(InvalidArgumentError):
            client.chat("A request preprocessing refuses.", max_tokens=10**6)  # over MEDGEMMA_MAX_NEW_TOKENS
        outcome, streaming = {}, threading.Event()

        def long_stream():
            with MedGemmaClient(grpc_url) as client:
                with client.stream_chat("Write a very long report.", max_tokens=400) as stream:
                    for _ in stream:
                        streaming.set()
                    outcome["result"] = stream.final_result()

        thread = threading.Thread(target=long_stream, daemon=True)
        thread.start()
        assert streaming.wait(timeout=60), "the stream never produced text"
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        ready = True
        while ready and time.monotonic() - stopped_at < 5:
            try:
                urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=1).close()
            except (urllib.error.URLError, OSError):
                ready = False
        assert not ready, "Triton still said ready 5 s after SIGTERM"
        with pytest.raises(UnavailableError):
            with MedGemmaClient(grpc_url) as client:
                client.chat("A new request while stopping.", max_tokens=4)
        thread.join(timeout=DRAIN_S)
        assert outcome["result"].finish_reason == "length"
        assert outcome["result"].completion_tokens == 400
        assert process.wait(timeout=DRAIN_S + 30) == 0
        print(f"\nserve stopped {time.monotonic() - stopped_at:.1f} s after SIGTERM")
        text = log.read_text()
        for model in ("llm", "preprocessing", "vision_encoder"):
            assert f"successfully unloaded '{model}'" in text
        assert "Exit timeout expired" not in text and "not healthy" not in text
        assert not any(process_alive(pid) for pid in [triton, *stubs])
        assert _crashes(kernel_log, [triton, *stubs]) == []
    finally:
        if process.poll() is None:
            process.kill()


def test_sigkill_of_serve_takes_triton_its_models_and_the_gateway_with_it(tiny_repository, tmp_path):
    """serve killed with SIGKILL (no cleanup of its own) while a stream decodes: tritonserver, the model
    processes and the gateway die too, nothing holds the ports, and the next serve removes the old
    temporary directory."""
    import threading

    from medgemma_triton.client import MedGemmaClient, MedGemmaError
    from medgemma_triton.server.launcher import free_port

    def family_of(serve_pid: int) -> list[int]:
        children = _children(serve_pid)
        return children + [pid for child in children for pid in _children(child)]

    def kill_and_expect_its_family_gone(serve: subprocess.Popen, family: list[int]) -> None:
        serve.kill()
        serve.wait()
        deadline = time.monotonic() + 15
        while any(process_alive(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in family if process_alive(pid)], "processes outlived a killed serve"

    def stream_until_killed(url: str, started: threading.Event) -> None:
        try:
            with MedGemmaClient(url) as client:
                with client.stream_chat("Write a very long report.", max_tokens=4000) as stream:
                    for _ in stream:
                        started.set()
        except MedGemmaError:
            pass

    ports = [str(free_port()) for _ in range(4)]
    flags = ["--grpc-port", ports[0], "--http-port", ports[1], "--metrics-port", ports[2], "--openai-port", ports[3],
             "--openai-model-name", "tiny", "--ready-timeout", "120"]
    command = [sys.executable, "-m", "medgemma_triton.cli", "serve", str(tiny_repository), *flags]
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    second = None
    try:
        _wait_ready_line(first)
        while "OpenAI gateway ready" not in first.stderr.readline():
            assert first.poll() is None
        family = family_of(first.pid)
        assert len(family) == 6, family  # tritonserver, its 4 model processes, the gateway
        old_workdirs = list(tmp_path.glob("medgemma-triton-*"))
        assert len(old_workdirs) == 1
        streaming = threading.Event()
        threading.Thread(target=stream_until_killed, args=(f"127.0.0.1:{ports[0]}", streaming), daemon=True).start()
        assert streaming.wait(timeout=60), "the stream never produced text"
        kill_and_expect_its_family_gone(first, family)
        second = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        _wait_ready_line(second)
        assert not old_workdirs[0].exists(), "the killed serve's temporary directory was left behind"
        kill_and_expect_its_family_gone(second, family_of(second.pid))
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def test_serve_refuses_a_port_that_is_taken_before_saying_ready(tmp_path):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, "-m", "medgemma_triton.cli", "serve", str(_repository(tmp_path)), "--grpc-port", "0",
             "--http-port", str(taken), "--metrics-port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)},
        )
        try:
            _, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 1
    assert f"HTTP port {taken} on 127.0.0.1 is already in use" in stderr
    assert "Triton ready" not in stderr
    assert not list(tmp_path.glob("medgemma-triton-*"))


def test_serve_exits_with_its_own_status_when_the_gateway_dies(tiny_repository, tmp_path):
    from medgemma_triton.server.launcher import free_port
    from medgemma_triton.server.supervisor import GATEWAY_DIED

    process = _serve(tiny_repository, "--openai-port", str(free_port()), "--openai-model-name", "tiny",
                     "--ready-timeout", "120", tmp_path=tmp_path)
    try:
        _wait_ready_line(process)
        while "OpenAI gateway ready" not in process.stderr.readline():
            assert process.poll() is None
        (gateway,) = [pid for pid in _children(process.pid)
                      if b"tritonserver" not in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]]
        os.kill(gateway, signal.SIGKILL)
        assert process.wait(timeout=60) == GATEWAY_DIED
        assert "the OpenAI gateway exited" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
