"""Processes that cannot outlive their parent, and facts about processes read from /proc (Linux).

Standard library only: the launcher and the gateway both use it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGKILL):
    """A Popen preexec_fn: the child gets `signum` when this process dies, SIGKILL of it included.

    Linux delivers it when the thread that started the child exits, so start children from a thread
    that lives as long as they should (serve and the test fixtures use their main thread)."""
    parent = os.getpid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: nothing to load in the child
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def process_start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_state(pid: int) -> str | None:
    """The state letter of `pid` in /proc (R, S, T, Z, ...), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie nobody has reaped yet counts as gone)."""
    return _process_state(pid) not in (None, "Z")


def process_stopped(pid: int) -> bool:
    """True while `pid` is stopped: by SIGSTOP (state T) or by a debugger (state t)."""
    return _process_state(pid) in ("T", "t")


# Waits while the parent ($1) lives, then kills the model process ($2); a shell, not a Python thread.
_WATCHER = 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; kill -9 "$2"'


def exit_when_parent_exits() -> subprocess.Popen:
    """In a Triton model process: end it as soon as tritonserver, its parent, has gone. Some calls of
    Triton's Python backend (a metric update, a response) wait on the server while holding the GIL;
    with the server killed such a call never returns, so no Python thread of this process could act.
    A small watcher process does it instead, and dies with this process."""
    return subprocess.Popen(
        ["sh", "-c", _WATCHER, "medgemma-watcher", str(os.getppid()), str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent(signal.SIGKILL),
    )
