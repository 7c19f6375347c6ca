"""Crash recovery without hands (issue #22 item 4): a real Prefect server and the supervised worker
(``deployments/worker-supervised.sh``). The worker and its flow-run process are SIGKILLed by PID mid-run; the
supervisor restarts the worker; ``prefect flow-run retry`` of the crashed run completes on the restarted worker, and
nothing in the test starts a second worker. SIGTERM to the supervisor then stops the worker too (no orphan)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bitdistill-prefect-"))
os.environ.pop("PREFECT_API_URL", None)

from tests.support import ServerSession, api_json, descendants, free_port, stop, wait_http  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUPERVISOR = REPO / "deployments" / "worker-supervised.sh"
SYSTEMD_UNIT = REPO / "deployments" / "bitdistill-worker.service"
POOL = "bitdistill-process"

# a flow that sleeps on its first attempt (the one that is killed) and returns at once on a retry
FLOW = '''
import os, time
from pathlib import Path
from prefect import flow

@flow(name="sleepy")
def sleepy(marker_dir: str, seconds: float = 600.0) -> int:
    d = Path(marker_dir)
    attempt = len(list(d.glob("attempt-*"))) + 1
    (d / f"attempt-{attempt}").write_text(f"{os.getpid()} {os.getppid()}")
    if attempt == 1:
        time.sleep(seconds)
    return attempt
'''

DEPLOY = '''
import sys
from prefect import flow
flow.from_source(source=sys.argv[1], entrypoint="sleepy.py:sleepy").deploy(
    name="sleepy", work_pool_name=sys.argv[2], print_next_steps=False)
'''


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _worker_of(supervisor: subprocess.Popen[str], timeout: float, not_pid: int | None = None) -> int:
    """PID of the supervisor's running `prefect worker start` child (other than ``not_pid``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert supervisor.poll() is None, "the supervisor exited"
        for pid in _children(supervisor.pid):
            if pid != not_pid and "worker start" in _cmdline(pid) and _alive(pid):
                return pid
        time.sleep(0.2)
    raise AssertionError("the supervisor started no worker")


def test_systemd_unit_restarts_the_worker():
    unit = SYSTEMD_UNIT.read_text()
    for line in ("Restart=always", "RestartSec=", "StartLimitIntervalSec=0", "WorkingDirectory=",
                 "Environment=PREFECT_API_URL=", "Environment=BITDISTILL_HOME=", "KillMode=mixed",
                 f"prefect worker start --pool {POOL}"):
        assert line in unit, line
    assert os.access(SUPERVISOR, os.X_OK)
    assert subprocess.run(["bash", "-n", str(SUPERVISOR)]).returncode == 0


FAKE_WORKER = """#!/usr/bin/env bash
echo "$$ $*" >> "$FAKE_LOG"
[ -e "$FAKE_STAY" ] || exit 3              # exits at once until the test creates $FAKE_STAY
trap 'echo "TERM $$" >> "$FAKE_LOG"' TERM  # then ignores SIGTERM, as a hung Prefect worker does
while true; do sleep 0.1; done
"""


def test_loop_backs_off_forwards_sigterm_and_kills_a_hung_worker(tmp_path):
    """Without a server: a worker that exits at once is restarted after 1, 2, 4 ... s; SIGTERM to the loop reaches
    the worker, and one that ignores it is SIGKILLed after BITDISTILL_STOP_GRACE_S; the loop exits 0, nothing left."""
    fake, log, stay = tmp_path / "prefect", tmp_path / "calls", tmp_path / "stay"
    fake.write_text(FAKE_WORKER)
    fake.chmod(0o755)
    env = {**os.environ, "PREFECT": str(fake), "FAKE_LOG": str(log), "FAKE_STAY": str(stay),
           "BITDISTILL_RESTART_MIN_S": "1", "BITDISTILL_RESTART_MAX_S": "2", "BITDISTILL_STOP_GRACE_S": "2"}
    with open(tmp_path / "supervisor.log", "w") as out:
        loop = subprocess.Popen([str(SUPERVISOR), "--pool", "p", "--", "--limit", "1"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):  # starts at t=0, 1, 3 (then 5, 7 ...)
            assert time.monotonic() < deadline and loop.poll() is None
            time.sleep(0.1)
        stay.touch()
        worker = _worker_of(loop, 30)
        calls = log.read_text().splitlines()
        assert all(c.split(" ", 1)[1] == "worker start --pool p --limit 1" for c in calls), calls
        t_term = time.monotonic()
        os.kill(loop.pid, signal.SIGTERM)
        assert loop.wait(timeout=30) == 0
        assert 1.5 < time.monotonic() - t_term < 20
        assert f"TERM {worker}" in log.read_text() and not _alive(worker)
        text = (tmp_path / "supervisor.log").read_text()
        assert "restarting in 1 s" in text and "restarting in 2 s" in text and "restarting in 4 s" not in text, text
    finally:
        if loop.poll() is None:
            stop(loop, group=True, timeout=5)


@pytest.mark.timeout(600)
def test_supervised_worker_retries_a_crashed_run_without_hands(tmp_path):
    bindir = Path(sys.executable).parent
    prefect = str(bindir / "prefect")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/server.db",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "OMP_NUM_THREADS": "1", "PREFECT": prefect, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
           "BITDISTILL_RESTART_MIN_S": "1", "BITDISTILL_STOP_GRACE_S": "5"}
    flow_dir, markers = tmp_path / "flow", tmp_path / "markers"
    flow_dir.mkdir()
    markers.mkdir()
    (flow_dir / "sleepy.py").write_text(FLOW)
    with ServerSession(api, env, tmp_path, REPO) as s:
        start, cli, state = s.start, s.cli, s.state

        def wait_state(run_id: str, want: set[str], timeout: float) -> str:
            return s.wait_state(run_id, want, timeout, poll=0.5)

        server = start("server", prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port))
        wait_http(f"{api}/health", 180, server)
        cli(prefect, "work-pool", "create", POOL, "--type", "process")
        cli(sys.executable, "-c", DEPLOY, str(flow_dir), POOL)
        supervisor = start("supervisor", str(SUPERVISOR), "--pool", POOL)
        worker = _worker_of(supervisor, 60)

        out = cli(prefect, "deployment", "run", "sleepy/sleepy", "--params",
                  f'{{"marker_dir": "{markers}"}}')
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)  # type: ignore[union-attr]
        deadline = time.monotonic() + 180
        while not (markers / "attempt-1").exists():
            assert time.monotonic() < deadline and state(run_id) in ("SCHEDULED", "PENDING", "RUNNING"), state(run_id)
            time.sleep(0.5)
        assert wait_state(run_id, {"RUNNING"}, 30) == "RUNNING"

        t_kill = time.monotonic()
        for pid in [*descendants(worker), worker]:  # the flow-run process and the worker, by PID; not the supervisor
            os.kill(pid, signal.SIGKILL)
        restarted = _worker_of(supervisor, 60, not_pid=worker)  # the supervisor, not this test, starts it
        t_restart = time.monotonic()
        assert not _alive(worker)
        assert state(run_id) == "RUNNING"  # nothing reported the kill
        # what the heartbeat automation (bitdistill-crash-zombie-flow-runs, 90 s; tests/test_ops.py) does
        api_json(f"{api}/flow_runs/{run_id}/set_state", {"state": {"type": "CRASHED", "name": "Crashed",
                                                                   "message": "worker killed (test)"}, "force": True})
        assert state(run_id) == "CRASHED"

        cli(prefect, "flow-run", "retry", run_id)
        t_retry = time.monotonic()
        assert wait_state(run_id, {"COMPLETED", "FAILED", "CRASHED"}, 240) == "COMPLETED"
        t_done = time.monotonic()
        assert (markers / "attempt-2").exists() and not (markers / "attempt-3").exists()
        flow_pid, flow_ppid = map(int, (markers / "attempt-2").read_text().split())
        assert flow_ppid == restarted or flow_ppid in descendants(restarted), (flow_ppid, restarted)
        assert _worker_of(supervisor, 5) == restarted and len(s.procs) == 2  # one supervisor, no worker started here
        print(f"kill -> worker restarted {t_restart - t_kill:.1f} s; retry -> Completed {t_done - t_retry:.1f} s")

        deadline = time.monotonic() + 30
        while _alive(flow_pid) and time.monotonic() < deadline:  # the flow-run process reports, then exits
            time.sleep(0.2)
        # SIGTERM to the supervisor (what `systemctl stop` / a shell's kill sends) stops the worker too
        t_term = time.monotonic()
        os.kill(supervisor.pid, signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0
        assert not _alive(restarted), "the worker outlived its supervisor"
        assert not _children(supervisor.pid)
        print(f"SIGTERM -> supervisor and worker stopped in {time.monotonic() - t_term:.1f} s")
        log = next(tmp_path.glob("*-supervisor.log")).read_text()
        assert log.count("worker-supervised[") >= 4 and "exited with status 137" in log, log[-3000:]
