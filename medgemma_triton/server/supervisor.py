"""`medgemma-triton serve`: run Triton (and the OpenAI gateway) until told to stop, and supervise them:
reload a stateless model whose process died, stop everything with a distinct exit status otherwise."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from medgemma_triton.contract import DEFAULT_DRAIN_TIMEOUT_S, VISION_ENCODER_MODEL
from medgemma_triton.processes import process_alive, process_stopped
from medgemma_triton.server.launcher import LOOPBACK, ServerError, TritonServer, model_of, check_ports_free

# Models whose process holds no request state between calls (no streams, not decoupled): when it dies,
# or stays stopped past Triton's health check, serve reloads the model instead of stopping Triton.
# At most MAX_RELOADS in RELOAD_WINDOW_S.
RELOADABLE_MODELS = frozenset({VISION_ENCODER_MODEL})
STOPPED_RELOAD_S = 1.0  # Triton 2.51's Python backend fails a stub's request after about a second
MAX_RELOADS = 3
RELOAD_WINDOW_S = 600.0
SUPERVISE_INTERVAL_S = 0.2

# serve's exit statuses (docs/kubernetes.md)
EXIT_STOPPED = 0
EXIT_START_FAILED = 1
EXIT_USAGE = 2
MODEL_PROCESS_DIED = 3  # a model's process died while serving
GATEWAY_DIED = 4  # the OpenAI gateway exited while serving
TRITON_DIED = 5  # tritonserver exited by itself while serving


def serve_forever(
    repository,
    host: str = LOOPBACK,
    grpc_port: int = 8001,
    http_port: int = 8000,
    metrics_port: int = 8002,
    ready_timeout_s: float = 300.0,
    log_verbose: int = 0,
    gateway=None,
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
    log_file=None,
) -> int:
    """`medgemma-triton serve`: run until SIGTERM or SIGINT, then stop gracefully (TritonServer.stop).

    A model process that dies while serving (killed, out of memory) takes its requests' state with it:
    Triton 2.51 would leave their streams open forever and restart the process for the next request.
    serve stops Triton instead, at once, so every open stream ends with an error, readiness fails,
    and it exits with MODEL_PROCESS_DIED for an orchestrator to restart it with a clean state.

    `gateway` (a gateway.config.GatewayConfig): also run the OpenAI-compatible gateway, as a child
    process started once Triton is ready; either one exiting stops both. Both children die with serve,
    even when serve itself is killed (die_with_parent). The working directory goes on a clean exit;
    after a failure its logs stay, and serve says where.
    """
    repository = Path(repository)
    if not repository.is_dir():
        print(f"error: {repository} is not a model repository directory", file=sys.stderr)
        return EXIT_USAGE
    server = TritonServer(
        repository,
        host=host,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        ready_timeout_s=ready_timeout_s,
        log_verbose=log_verbose,
        drain_timeout_s=drain_timeout_s,
        log_file=None if log_file is None else Path(log_file).absolute(),
    )

    def _stop(_signum, _frame):
        raise _Terminated

    # Installed before anything starts: a SIGTERM at any moment, loading included, stops cleanly.
    previous = signal.signal(signal.SIGTERM, _stop)
    sidecar = None
    status = EXIT_START_FAILED
    try:
        try:
            if gateway is not None:
                check_ports_free(gateway.host, {"OpenAI": gateway.port})
            server.start()
        except ServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_START_FAILED
        print(
            f"Triton ready: gRPC {server.url}, HTTP {server.http_url}, metrics {server.metrics_url}\n"
            f"log: {server.log_file}",
            file=sys.stderr,
            flush=True,
        )
        if gateway is not None:
            from medgemma_triton.gateway.server import GatewayProcess

            try:
                sidecar = GatewayProcess(gateway, drain_timeout_s=drain_timeout_s).start(server.url)
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_START_FAILED
            print(f"OpenAI gateway ready: {sidecar.url}", file=sys.stderr, flush=True)
        status = _supervise(server, sidecar)
        return status
    except (_Terminated, KeyboardInterrupt):
        status = EXIT_STOPPED
        print(f"stopping: draining requests in flight for up to {drain_timeout_s:g} s", file=sys.stderr, flush=True)
        return status
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the stops below are bounded
        if sidecar is not None:
            sidecar.begin_stop()  # the gateway and Triton drain together
        died = status == MODEL_PROCESS_DIED  # nothing in flight can finish: no drain
        server.stop(timeout_s=2.0 if died else None, keep_log=status != EXIT_STOPPED, drain=not died)
        if sidecar is not None:
            sidecar.stop(timeout_s=5.0)  # its streams ended with Triton's
        if status != EXIT_STOPPED and server.log_file is not None and server.log_file.exists():
            print(f"Triton's log is kept at {server.log_file}", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, previous)


def _supervise(server: TritonServer, sidecar) -> int:
    """Watch Triton, its model processes and the gateway; the exit status when one of them ends.

    A RELOADABLE_MODELS model (the vision encoder: no streams, no state between calls) whose process
    dies, or stays stopped (SIGSTOP, a debugger) for STOPPED_RELOAD_S, is reloaded: the request it was
    serving fails, the others go on. A stopped process is not left to resume: Triton 2.51 fails its
    waiting request and frees that request's shared memory, the process dies when it resumes, and the
    model's next request aborts tritonserver; so the model is reloaded while it is still stopped, and
    the old process killed. Any other model process that dies ends the server: a decoupled model's
    process holds its streams' state, which Triton 2.51 would leave open forever, so an orchestrator's
    restart is the one clean recovery. So does a reloadable one failing more than MAX_RELOADS times in
    RELOAD_WINDOW_S."""
    model_processes = server.model_processes()
    stopped_since: dict[int, float] = {}
    reloads: list[float] = []
    while True:
        code = server.process.poll()
        if code is not None:
            print(f"error: Triton exited with status {code}; see {server.log_file}", file=sys.stderr)
            return TRITON_DIED
        if sidecar is not None and (code := sidecar.poll()) is not None:
            print(f"error: the OpenAI gateway exited with status {code}; stopping Triton (exit status {GATEWAY_DIED})",
                  file=sys.stderr, flush=True)
            return GATEWAY_DIED
        now = time.monotonic()
        dead = sorted(name for pid, name in model_processes.items() if not process_alive(pid))
        for pid in model_processes:
            if process_stopped(pid):
                stopped_since.setdefault(pid, now)
            else:
                stopped_since.pop(pid, None)
        hung = {pid: model_processes[pid] for pid, since in stopped_since.items() if now - since >= STOPPED_RELOAD_S}
        failed = {model_of(name) for name in [*dead, *hung.values()]}
        reloads = [at for at in reloads if now - at < RELOAD_WINDOW_S]
        if failed and failed <= RELOADABLE_MODELS and len(reloads) < MAX_RELOADS:
            for model in sorted(failed):
                print(f"warning: the process of model {model} died or stopped answering; reloading {model}",
                      file=sys.stderr, flush=True)
                reloads.append(now)
                try:
                    server.reload(model)
                except ServerError as exc:
                    print(f"error: {exc}; stopping Triton (exit status {MODEL_PROCESS_DIED})", file=sys.stderr, flush=True)
                    return MODEL_PROCESS_DIED
                print(f"{model} reloaded", file=sys.stderr, flush=True)
            for pid in hung:  # the unloaded instance's process, still stopped: it must never resume
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            gone = {pid for pid, name in model_processes.items() if model_of(name) in failed}
            model_processes = {pid: name for pid, name in server.model_processes().items() if pid not in gone}
            stopped_since = {}
            continue
        if dead:
            print(
                f"error: the process of model instance {', '.join(dead)} died (killed, paused past Triton's health "
                f"check, or out of memory); stopping Triton so that its open requests end with an error "
                f"(exit status {MODEL_PROCESS_DIED})",
                file=sys.stderr, flush=True,
            )
            return MODEL_PROCESS_DIED
        time.sleep(SUPERVISE_INTERVAL_S)


class _Terminated(Exception):
    """SIGTERM reached `serve_forever`."""
