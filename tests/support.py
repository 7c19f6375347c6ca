"""Helpers shared by the tests that start servers: a free loopback port, waiting for a server, stopping a process
by PID, and a session of processes and CLI calls against a real Prefect server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any


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


def api_json(url: str, body: dict[str, Any] | None = None) -> Any:
    """GET ``url`` (POST ``body`` as JSON when given) and decode the JSON answer (Prefect's REST API)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class ServerSession:
    """The processes and CLI calls of a test against a real Prefect server at ``api``: each process in its own
    session with its output in ``logs/<n>-NAME.log``, all with ``env``; leaving the ``with`` block stops every
    process still running, by PID (its process group)."""

    def __init__(self, api: str, env: dict[str, str], logs: Path, cwd: Path) -> None:
        self.api, self.env, self.logs, self.cwd = api, env, logs, cwd
        self.procs: list[subprocess.Popen[str]] = []

    def __enter__(self) -> ServerSession:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                stop(p, group=True, timeout=20)

    def start(self, name: str, *args: str) -> subprocess.Popen[str]:
        """Start ``args`` (output to a file: a full pipe would stall a chatty worker)."""
        with open(self.logs / f"{len(self.procs)}-{name}.log", "w") as log:
            p = subprocess.Popen(list(args), cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)
        self.procs.append(p)
        return p

    def cli(self, *args: str, timeout: float = 180, ok: bool = True, cwd: Path | None = None) -> str:
        """Run a command to its end; its stdout + stderr (with ``ok``, it must exit 0)."""
        r = subprocess.run(list(args), cwd=cwd or self.cwd, env=self.env, capture_output=True, text=True,
                           timeout=timeout)
        assert r.returncode == 0 or not ok, (args, r.stdout[-3000:], r.stderr[-3000:])
        return r.stdout + r.stderr

    def state(self, run_id: str) -> str:
        """A flow run's state type (``RUNNING``, ``CRASHED``, ...)."""
        return api_json(f"{self.api}/flow_runs/{run_id}")["state"]["type"]

    def wait_state(self, run_id: str, want: set[str], timeout: float, poll: float = 1.0) -> str:
        deadline = time.monotonic() + timeout
        while (s := self.state(run_id)) not in want:
            assert time.monotonic() < deadline, f"flow run {run_id} still {s} after {timeout} s"
            time.sleep(poll)
        return s
