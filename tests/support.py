"""Helpers shared by the tests that start servers: a free loopback port, waiting for a server, and stopping a process
by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, *, group: bool = False, timeout: float = 20) -> None:
    """SIGTERM the process (its whole process group with ``group``, for ``start_new_session`` children), then SIGKILL
    when it has not exited within ``timeout`` seconds. By PID, never by name."""
    kill = os.killpg if group else os.kill
    kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    """Poll ``url`` until it answers 200; fail at once when the server process ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)
