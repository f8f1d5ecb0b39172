"""Run Triton Inference Server on a model repository: find the binary, build its environment, wait.

Two installations are supported:
- NVIDIA's Triton container: `/opt/tritonserver/bin/tritonserver` with its own backends.
- The `nvidia-pytriton` wheel (the `cpu` profile): `pytriton/tritonserver/bin/tritonserver`, its
  shared libraries in `nvidia_pytriton.libs`, and one Python-backend stub per Python version in
  `pytriton/tritonserver/python_backend_stubs/X.Y/`. The Python backend runs the stub it finds
  next to `libtriton_python.so`, so a backend directory is assembled with the stub that matches
  this interpreter. A mismatched stub makes the server hang at "loading" rather than fail, which
  is why every start has a readiness deadline.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import secrets
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from medgemma_triton.contract import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DRAIN_TIMEOUT_ENV,
    IN_FLIGHT_METRIC,
    TOP_MODEL,
)
from medgemma_triton.processes import die_with_parent, process_alive, process_start_time

CONTAINER_ROOT = Path("/opt/tritonserver")
STUB_NAME = "triton_python_backend_stub"
LOOPBACK = "127.0.0.1"
WORKDIR_PREFIX = "medgemma-triton-"
OWNER_FILE = "owner"  # "<pid> <start time>" of the process that owns a working directory
UNLOAD_MARGIN_S = 10.0  # after the drain: the models' own unloading, within Triton's exit timeout
CONTROL_HEADER = "medgemma-control"  # Triton's model-repository API answers only requests carrying it
ENDPOINT_GRACE_S = 3.0  # models gone, Triton still up: its gRPC shutdown waits on idle client streams


class ServerError(RuntimeError):
    """Triton did not start or did not load the repository; the message carries its own errors."""


@dataclass(frozen=True)
class TritonInstallation:
    binary: Path
    backends: Path  # a backend directory as installed (the wheel's lacks the stub)
    libraries: tuple[Path, ...] = ()  # prepended to LD_LIBRARY_PATH
    stub: Path | None = None  # the wheel's stub for this interpreter; None inside the container
    caches: Path | None = None

    @property
    def needs_assembly(self) -> bool:
        return self.stub is not None


def _wheel_root() -> Path | None:
    spec = importlib.util.find_spec("pytriton")  # no import: pytriton's package pulls in a lot
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_triton() -> TritonInstallation:
    """The Triton installation to run: NVIDIA's container if present, else the pytriton wheel."""
    container_binary = CONTAINER_ROOT / "bin" / "tritonserver"
    if container_binary.is_file():
        return TritonInstallation(binary=container_binary, backends=CONTAINER_ROOT / "backends")
    package = _wheel_root()
    if package is None:
        raise ServerError(
            "no Triton Inference Server found: not in NVIDIA's Triton container (/opt/tritonserver) and "
            "the nvidia-pytriton wheel is not installed (pip install 'medgemma-triton[cpu]')"
        )
    dist = package / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / STUB_NAME
    if not stub.is_file():
        available = sorted(p.name for p in (dist / "python_backend_stubs").glob("*"))
        raise ServerError(
            f"nvidia-pytriton has no Python-backend stub for Python {version} "
            f"(it ships {', '.join(available) or 'none'}); use one of those Python versions"
        )
    return TritonInstallation(
        binary=dist / "bin" / "tritonserver",
        backends=dist / "backends",
        libraries=(package.parent / "nvidia_pytriton.libs",),
        stub=stub,
        caches=dist / "caches",
    )


def assemble_backends(installation: TritonInstallation, directory: Path) -> Path:
    """A backend directory whose Python backend carries the stub for this interpreter."""
    if not installation.needs_assembly:
        return installation.backends
    target = directory / "backends"
    shutil.copytree(installation.backends, target, ignore=shutil.ignore_patterns("__pycache__"))
    stub = target / "python" / STUB_NAME
    shutil.copy2(installation.stub, stub)
    stub.chmod(0o755)
    return target


def server_environment(installation: TritonInstallation, base: dict | None = None) -> dict:
    """Environment for tritonserver and the Python-backend stubs it forks.

    The stub embeds this interpreter: its libpython must be on LD_LIBRARY_PATH, and the
    interpreter's own `bin` first on PATH so the embedded Python finds this environment's
    site-packages (the stub resolves `python3` on PATH to locate its prefix).
    """
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR")
    libraries = [str(p) for p in installation.libraries]
    if libdir:
        libraries.append(libdir)
    if env.get("LD_LIBRARY_PATH"):
        libraries.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libraries)
    interpreter_bin = str(Path(sys.executable).parent)  # the venv's bin, not the resolved symlink
    env["PATH"] = os.pathsep.join([interpreter_bin, env.get("PATH", "")]).rstrip(os.pathsep)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Refuse ports that another process listens on, before anything starts: a server left behind
    (an earlier serve that was killed) would otherwise answer this one's readiness checks."""
    for what, port in ports.items():
        if not port:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton binds: TIME_WAIT is no owner
            try:
                sock.bind((host, port))
            except OSError as exc:
                reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
                raise ServerError(
                    f"the {what} port {port} on {host} {reason}: another server (perhaps an earlier serve that "
                    f"was killed) holds it; stop that process or choose another --{what.lower()}-port"
                ) from None


def model_of(instance: str) -> str:
    return instance.rsplit("_", 2)[0]  # Triton names instances <model>_<group>_<index>


def make_workdir() -> Path:
    """A temporary working directory marked with its owner, after removing those whose owner is gone."""
    sweep_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    (workdir / OWNER_FILE).write_text(f"{os.getpid()} {process_start_time(os.getpid())}")
    return workdir


def sweep_stale_workdirs(root: Path | None = None) -> list[Path]:
    """Remove working directories whose owning process has gone (a serve or test killed by SIGKILL).
    Only directories carrying an owner marker are touched; a kept log has none."""
    removed = []
    for workdir in Path(root or tempfile.gettempdir()).glob(WORKDIR_PREFIX + "*"):
        try:
            pid, started = (workdir / OWNER_FILE).read_text().split()
        except (OSError, ValueError):
            continue
        if process_start_time(int(pid)) != started:  # gone, or its pid reused by another process
            shutil.rmtree(workdir, ignore_errors=True)
            removed.append(workdir)
    return removed


# Lines in Triton's log that explain a failed start (model load errors, bad configs, bind errors).
_ERROR_LINE = re.compile(r"^E\d{4}|error|failed|unable|invalid", re.IGNORECASE)


def error_lines(log_text: str, limit: int = 20) -> list[str]:
    lines = [line for line in log_text.splitlines() if _ERROR_LINE.search(line)]
    return lines[-limit:]


def _model_table(log_text: str) -> list[str]:
    """Triton prints a `| Model | Version | Status |` table when loading ends; keep its failures."""
    return [line for line in log_text.splitlines() if line.startswith("|") and "UNAVAILABLE" in line]


@dataclass
class TritonServer:
    """Triton on a model repository, as a context manager: starts, waits for readiness, stops.

    Ports default to free loopback ports; `url` is the gRPC address for tritonclient.
    """

    repository: Path
    host: str = LOOPBACK
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    ready_timeout_s: float = 120.0
    log_verbose: int = 0
    env: dict = field(default_factory=dict)  # extra environment (limits such as MEDGEMMA_MAX_*)
    log_file: Path | None = None
    workdir: Path | None = None
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S  # how long a stop lets requests in flight finish

    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _owned_workdir: bool = field(default=False, init=False, repr=False)
    _assembled: Path | None = field(default=None, init=False, repr=False)  # our copy of the backends
    _control_key: str = field(default_factory=lambda: secrets.token_hex(16), init=False, repr=False)

    @property
    def url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def log_text(self) -> str:
        if self.log_file is None or not self.log_file.exists():
            return ""
        return self.log_file.read_text(encoding="utf-8", errors="replace")

    def command(self, backends: Path, installation: TritonInstallation) -> list[str]:
        cmd = [
            str(installation.binary),
            f"--model-repository={Path(self.repository).absolute()}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            f"--log-file={self.log_file}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            "--disable-auto-complete-config",  # our config.pbtxt files are complete
            # Explicit control lets stop() unload the top model first; only this process holds the key.
            "--model-control-mode=explicit",
            "--load-model=*",
            f"--http-restricted-api=model-repository:{CONTROL_HEADER}={self._control_key}",
            f"--grpc-restricted-protocol=model-repository:{CONTROL_HEADER}={self._control_key}",
            f"--exit-timeout-secs={int(self.drain_timeout_s + UNLOAD_MARGIN_S)}",
        ]
        if installation.caches is not None:
            cmd.append(f"--cache-directory={installation.caches}")
        return cmd

    def start(self) -> "TritonServer":
        installation = find_triton()
        check_ports_free(self.host, {"gRPC": self.grpc_port, "HTTP": self.http_port, "metrics": self.metrics_port})
        if self.workdir is None:
            self.workdir = make_workdir()
            self._owned_workdir = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.log_file is None:
            self.log_file = self.workdir / "tritonserver.log"
        for name in ("grpc_port", "http_port", "metrics_port"):
            if not getattr(self, name):
                setattr(self, name, free_port(self.host))
        backends = assemble_backends(installation, self.workdir)
        self._assembled = backends if installation.needs_assembly else None
        env = server_environment(installation)
        env[DRAIN_TIMEOUT_ENV] = str(self.drain_timeout_s)
        env.update({k: str(v) for k, v in self.env.items()})
        console = open(self.workdir / "tritonserver.console", "wb")
        self.process = subprocess.Popen(
            self.command(backends, installation),
            env=env,
            stdout=console,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its stub processes go with it on stop()
            preexec_fn=die_with_parent(signal.SIGKILL),  # never outlive this process (its stubs follow Triton)
        )
        console.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop(timeout_s=15.0)  # nothing is in flight yet: no drain
            raise
        return self

    def console_text(self) -> str:
        path = self.workdir / "tritonserver.console" if self.workdir else None
        return path.read_text(encoding="utf-8", errors="replace") if path and path.exists() else ""

    def _failure(self, what: str) -> ServerError:
        text = self.log_text() + "\n" + self.console_text()
        details = _model_table(text) + error_lines(text)
        seen = []
        for line in details:
            if line not in seen:
                seen.append(line)
        body = "\n".join(seen) or text.strip()[-2000:] or "(the server wrote no log)"
        return ServerError(f"{what}\nTriton's log ({self.log_file}):\n{body}")

    def _answers_ok(self, path: str, timeout_s: float) -> bool:
        """True when Triton's HTTP endpoint answers GET `path` with 200 (its health and readiness checks)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout_s) as response:
                return response.status == 200
        except OSError:  # URLError and ConnectionError among them
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise self._failure(f"Triton exited with status {code} while loading {self.repository}")
            if self._answers_ok("/v2/health/ready", timeout_s=1.0):
                return
            if time.monotonic() > deadline:
                raise self._failure(
                    f"Triton was not ready within {self.ready_timeout_s:.0f} s on {self.repository} "
                    "(a model still loading or hung; a Python-backend stub that does not match the "
                    "interpreter hangs this way)"
                )
            time.sleep(0.2)

    @property
    def stop_timeout_s(self) -> float:
        """The longest stop() waits for Triton before SIGKILL: the drain, the unload, and a margin."""
        return self.drain_timeout_s + UNLOAD_MARGIN_S + 5.0

    def stop(self, timeout_s: float | None = None, keep_log: bool = False, drain: bool = True) -> int | None:
        """Stop gracefully, in two phases (docs/kubernetes.md, "Stopping"):

        1. drain: unload the top model. Triton turns not-ready at once and refuses new requests to it;
           requests in flight go on through the other models, which stay loaded, until the top model's
           in-flight gauge reads 0 or the drain time passes.
        2. SIGTERM to tritonserver alone: every model unloads. Once every model process is gone, Triton
           gets ENDPOINT_GRACE_S to exit, then SIGKILL (Triton 2.51 keeps a model loaded, and its own
           exit waiting, while a client holds a gRPC stream open, even an idle one); the same after
           `timeout_s` (default stop_timeout_s). A signal to the whole process group would reach the
           model processes mid-request and crash them.

        Then remove what start() put on disk: the whole working directory when start() created it
        (with `keep_log`, all but the logs), else the assembled backend directory."""
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                started = time.monotonic()
                limit = self.stop_timeout_s if timeout_s is None else timeout_s
                stubs = model_processes(process.pid)
                if drain:
                    self._drain(process, min(self.drain_timeout_s, limit))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
                self._wait_stopped(process, stubs, max(0.0, limit - (time.monotonic() - started)))
            with contextlib.suppress(ProcessLookupError, PermissionError):  # stragglers of its session
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            code = process.returncode
        if self._owned_workdir and self.workdir is not None:
            if keep_log:
                for path in self.workdir.iterdir():
                    if path.name not in ("tritonserver.log", "tritonserver.console"):
                        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
        elif self._assembled is not None:
            shutil.rmtree(self._assembled, ignore_errors=True)
        self._assembled = None
        return code

    def _control(self, model: str, action: str, timeout_s: float) -> None:
        """POST the model-repository API's `action` (load, unload) for `model`; raises ServerError."""
        request = urllib.request.Request(
            f"http://{self.http_url}/v2/repository/models/{model}/{action}", data=b"{}", method="POST",
            headers={CONTROL_HEADER: self._control_key, "Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(request, timeout=timeout_s).close()
        except OSError as exc:
            raise ServerError(f"could not {action} {model}: {exc}") from None

    def model_ready(self, model: str) -> bool:
        return self._answers_ok(f"/v2/models/{model}/ready", timeout_s=2.0)

    def reload(self, model: str, timeout_s: float = 60.0) -> None:
        """Replace `model`'s instances with new ones: unload, wait until it is gone, load. Requests to it
        meanwhile are refused (model not ready); raises ServerError if it does not come back."""
        deadline = time.monotonic() + timeout_s
        self._control(model, "unload", timeout_s)
        while self.model_ready(model):
            if time.monotonic() > deadline:
                raise ServerError(f"{model} did not unload within {timeout_s:.0f} s")
            time.sleep(0.1)
        self._control(model, "load", max(1.0, deadline - time.monotonic()))
        if not self.model_ready(model):
            raise ServerError(f"{model} did not load again")

    def _drain(self, process: subprocess.Popen, timeout_s: float) -> None:
        """Phase 1 of stop(): no new requests, and those in flight finish (bounded by `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        # Triton answers once the unload has begun; a model pinned by an open client stream stays behind.
        with contextlib.suppress(ServerError):
            self._control(TOP_MODEL, "unload", 2.0)
        while process.poll() is None and time.monotonic() < deadline:
            in_flight = self._in_flight()
            if in_flight is None or in_flight == 0:
                return
            time.sleep(0.1)

    def _in_flight(self) -> float | None:
        """The top model's requests in flight, from its gauge; None when unreadable (nothing to wait on)."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2.0) as response:
                text = response.read().decode("utf-8", "replace")
        except OSError:
            return None
        for family in text_string_to_metric_families(text):
            if family.name == IN_FLIGHT_METRIC:
                return sum(sample.value for sample in family.samples)
        return None

    @staticmethod
    def _wait_stopped(process: subprocess.Popen, stubs: dict[int, str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        models_gone_at = None
        # The top model's process may stay: a client's open stream keeps it loaded, drained by now.
        others = [pid for pid, instance in stubs.items() if model_of(instance) != TOP_MODEL]
        while process.poll() is None and time.monotonic() < deadline:
            if models_gone_at is None and not any(process_alive(pid) for pid in others):
                models_gone_at = time.monotonic()
            if models_gone_at is not None and time.monotonic() - models_gone_at > ENDPOINT_GRACE_S:
                return
            time.sleep(0.1)

    def model_processes(self) -> dict[int, str]:
        """pid -> model instance (e.g. "llm_0_0") of each Python-backend stub process of this server."""
        return {} if self.process is None else model_processes(self.process.pid)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def model_processes(server_pid: int) -> dict[int, str]:
    """pid -> model instance (e.g. "llm_0_0") of each Python-backend stub process of the tritonserver
    with pid `server_pid`. Read from /proc: a stub's argv is the stub binary, the model file,
    shared-memory settings, the server's pid (argv[5]) and the instance name (argv[8]) in the 2.51
    Python backend."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 8 and argv[0].endswith(b"triton_python_backend_stub") and argv[5] == str(server_pid).encode():
            found[int(entry.name)] = argv[8].decode("utf-8", "replace")
    return found
