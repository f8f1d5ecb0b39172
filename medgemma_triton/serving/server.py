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
import importlib.util
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
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CONTAINER_ROOT = Path("/opt/tritonserver")
STUB_NAME = "triton_python_backend_stub"
LOOPBACK = "127.0.0.1"


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

    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _owned_workdir: bool = field(default=False, init=False, repr=False)
    _assembled: Path | None = field(default=None, init=False, repr=False)  # our copy of the backends

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
            "--exit-timeout-secs=10",
        ]
        if installation.caches is not None:
            cmd.append(f"--cache-directory={installation.caches}")
        return cmd

    def start(self) -> "TritonServer":
        installation = find_triton()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="medgemma-triton-"))
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
        env.update({k: str(v) for k, v in self.env.items()})
        console = open(self.workdir / "tritonserver.console", "wb")
        self.process = subprocess.Popen(
            self.command(backends, installation),
            env=env,
            stdout=console,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its stub processes go with it on stop()
        )
        console.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
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

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        ready_url = f"http://{self.host}:{self.http_port}/v2/health/ready"
        while True:
            code = self.process.poll()
            if code is not None:
                raise self._failure(f"Triton exited with status {code} while loading {self.repository}")
            try:
                with urllib.request.urlopen(ready_url, timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise self._failure(
                    f"Triton was not ready within {self.ready_timeout_s:.0f} s on {self.repository} "
                    "(a model still loading or hung; a Python-backend stub that does not match the "
                    "interpreter hangs this way)"
                )
            time.sleep(0.2)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """Stop the server and its stub processes: SIGTERM, then SIGKILL after `timeout_s`.

        Then remove what start() put on disk: the assembled backend directory (~3 MB per start)
        always, and the whole working directory (logs included) when start() created it.
        """
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            # The stubs share the session; kill stragglers even after a clean exit.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            code = process.returncode
        if self._owned_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self._assembled is not None:
            shutil.rmtree(self._assembled, ignore_errors=True)
        self._assembled = None
        return code

    def model_processes(self) -> dict[int, str]:
        """pid -> model instance (e.g. "llm_0_0") of each Python-backend stub process of this server."""
        return {} if self.process is None else model_processes(self.process.pid)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


MODEL_PROCESS_DIED = 3  # serve's exit status when a model's process died while serving


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


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie nobody has reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def serve_forever(
    repository,
    host: str = LOOPBACK,
    grpc_port: int = 8001,
    http_port: int = 8000,
    metrics_port: int = 8002,
    ready_timeout_s: float = 300.0,
    log_verbose: int = 0,
    gateway=None,
) -> int:
    """`medgemma-triton serve`: run until interrupted; non-zero with Triton's errors if loading fails.

    A model process that dies while serving (killed, out of memory) takes its requests' state with it:
    Triton 2.51 would leave their streams open forever and restart the process for the next request.
    serve stops Triton instead, at once, so every open stream ends with an error, readiness fails,
    and it exits with MODEL_PROCESS_DIED for an orchestrator to restart it with a clean state.

    `gateway` (a gateway.config.GatewayConfig): also run the OpenAI-compatible gateway, as a child
    process started once Triton is ready and stopped before it; either one exiting stops both.
    """
    repository = Path(repository)
    if not repository.is_dir():
        print(f"error: {repository} is not a model repository directory", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="medgemma-triton-"))
    server = TritonServer(
        repository,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        ready_timeout_s=ready_timeout_s,
        log_verbose=log_verbose,
        workdir=workdir,
    )

    def _stop(_signum, _frame):
        raise _Terminated

    # Installed before anything starts: a SIGTERM at any moment, loading included, stops cleanly.
    previous = signal.signal(signal.SIGTERM, _stop)
    sidecar = None
    try:
        try:
            server.start()
        except ServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(
            f"Triton ready: gRPC {server.url}, HTTP {server.http_url}, metrics {server.metrics_url}\n"
            f"log: {server.log_file}",
            file=sys.stderr,
            flush=True,
        )
        if gateway is not None:
            from medgemma_triton.gateway.server import GatewayProcess

            try:
                sidecar = GatewayProcess(gateway).start(server.url)
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(f"OpenAI gateway ready: {sidecar.url}", file=sys.stderr, flush=True)
        model_processes = server.model_processes()
        while True:
            code = server.process.poll()
            if code is not None:
                print(f"error: Triton exited with status {code}; see {server.log_file}", file=sys.stderr)
                return code or 1
            if sidecar is not None and (code := sidecar.poll()) is not None:
                print(f"error: the OpenAI gateway exited with status {code}", file=sys.stderr)
                return code or 1
            dead = sorted(name for pid, name in model_processes.items() if not process_alive(pid))
            if dead:
                print(
                    f"error: the process of model instance {', '.join(dead)} died (killed, or out of memory); "
                    f"stopping Triton so that its open requests end with an error (exit status {MODEL_PROCESS_DIED})",
                    file=sys.stderr, flush=True,
                )
                server.stop(timeout_s=2.0)  # nothing in flight can finish: no graceful wait
                return MODEL_PROCESS_DIED
            time.sleep(0.5)
    except (_Terminated, KeyboardInterrupt):
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stop() is bounded: SIGTERM, then SIGKILL
        if sidecar is not None:
            sidecar.stop()
        server.stop()
        signal.signal(signal.SIGTERM, previous)


class _Terminated(Exception):
    """SIGTERM reached `serve_forever`."""
