"""Run the gateway under uvicorn, alone (`medgemma-triton openai`) or beside Triton (`serve --openai-port`).

Beside Triton it is a child process rather than a thread of `serve`: its event loop then competes
with nothing in the parent, a crash in one is seen by the other, and both stop together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

from medgemma_triton.contract import DEFAULT_DRAIN_TIMEOUT_S, DRAIN_TIMEOUT_ENV, drain_timeout_s
from medgemma_triton.gateway.config import API_KEY_ENV, GatewayConfig
from medgemma_triton.processes import die_with_parent

log = logging.getLogger("medgemma_triton.gateway")

# uvicorn's access log is one line per request (client, method, path, status); query strings and
# bodies are never logged
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "default": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "access": {"()": "medgemma_triton.gateway.logs.PathOnlyAccessFormatter",
                   "fmt": '%(asctime)s %(levelname)s access: %(client_addr)s "%(request_line)s" %(status_code)s'},
    },
    "handlers": {
        "default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"},
        "access": {"class": "logging.StreamHandler", "formatter": "access", "stream": "ext://sys.stderr"},
    },
    "loggers": {
        "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
        "uvicorn.error": {"level": "INFO"},
        "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        "medgemma_triton.gateway": {"handlers": ["default"], "level": "INFO", "propagate": False},
    },
}


def raise_open_file_limit() -> None:
    """Raise this process's soft open-file limit to its hard limit: each connection holds a file
    descriptor, and the common soft default of 1024 is few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def connection_cap(max_connections: int, open_files: int) -> int:
    """max_connections, kept to half the open-file limit: the other half is for the process's own
    files and sockets and for connections over the cap while they are answered 503, so a request
    past the cap gets that answer instead of waiting unaccepted."""
    cap = min(max_connections, max(1, open_files // 2))
    if cap < max_connections:
        log.warning("the open-file limit of %d allows %d connections, not %d (raise the hard limit: ulimit -Hn)",
                    open_files, cap, max_connections)
    return cap


def uvicorn_config(config: GatewayConfig, **overrides):
    import uvicorn

    from medgemma_triton.gateway.app import create_app
    from medgemma_triton.gateway.connections import guarded_protocol

    limits = config.connections
    cap = connection_cap(limits.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    options = dict(
        host=config.host,
        port=config.port,
        ssl_certfile=config.ssl_certfile,
        ssl_keyfile=config.ssl_keyfile,
        log_config=LOG_CONFIG,
        access_log=True,
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=drain_timeout_s(),  # streams in flight finish, as Triton's do
        http=guarded_protocol(limits, cap),
        timeout_keep_alive=limits.keep_alive_timeout_s,
    )
    options.update(overrides)
    return uvicorn.Config(create_app(config), **options)


def run_gateway(config: GatewayConfig) -> int:
    """`medgemma-triton openai`: serve until interrupted (uvicorn handles SIGINT and SIGTERM)."""
    import uvicorn

    raise_open_file_limit()
    server = uvicorn.Server(uvicorn_config(config))
    server.run()
    return 0 if server.started else 1


def gateway_command(config: GatewayConfig) -> list[str]:
    """The `medgemma-triton openai` command line for `config` (its API key travels in the environment)."""
    command = [sys.executable, "-m", "medgemma_triton.cli", "openai", "--triton-url", config.triton_url,
               "--host", config.host, "--port", str(config.port)]
    for flag, value in (("--ssl-certfile", config.ssl_certfile), ("--ssl-keyfile", config.ssl_keyfile),
                        ("--allowed-local-media", config.allowed_local_media), ("--model-name", config.model_name)):
        if value is not None:
            command += [flag, str(value)]
    return command


class GatewayProcess:
    """The gateway as a child process of `serve`, pointed at the Triton server it started."""

    def __init__(self, config: GatewayConfig, ready_timeout_s: float = 60.0,
                 drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S):
        self.config = config
        self.ready_timeout_s = ready_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.config.ssl_certfile else "http"
        return f"{scheme}://{self.config.host}:{self.config.port}/v1"

    def start(self, triton_url: str) -> "GatewayProcess":
        self.config = replace(self.config, triton_url=triton_url)
        env = {**os.environ, **self.config.connections.as_env()}
        if self.config.api_key:
            env[API_KEY_ENV] = self.config.api_key
        env[DRAIN_TIMEOUT_ENV] = str(self.drain_timeout_s)
        self.process = subprocess.Popen(gateway_command(self.config), env=env, stdin=subprocess.DEVNULL,
                                        preexec_fn=die_with_parent(signal.SIGTERM))  # never outlive serve
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._listening():
            if self.process.poll() is not None:
                raise RuntimeError(f"the OpenAI gateway exited with status {self.process.returncode} while starting")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the OpenAI gateway was not listening on port {self.config.port} "
                                   f"within {self.ready_timeout_s:g} s")
            time.sleep(0.1)
        return self

    def _listening(self) -> bool:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        with contextlib.suppress(OSError), socket.create_connection((host, self.config.port), timeout=0.5):
            return True
        return False

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def begin_stop(self) -> None:
        """SIGTERM: uvicorn stops accepting and lets open streams finish (for the drain time)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    @property
    def stop_timeout_s(self) -> float:
        return self.drain_timeout_s + 5.0

    def stop(self, timeout_s: float | None = None) -> None:
        """begin_stop(), then wait for the gateway to exit; SIGKILL after `timeout_s` (default stop_timeout_s)."""
        process = self.process
        if process is None:
            return
        self.begin_stop()
        try:
            process.wait(timeout=self.stop_timeout_s if timeout_s is None else timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        self.process = None
