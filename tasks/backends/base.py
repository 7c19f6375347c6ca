"""What every compute backend shares: the config base class, the one-line error, log streaming, the result lookup.

No Prefect or SkyPilot import here (``flows/config.py`` imports the backends' configs).
"""

from __future__ import annotations

import io
import logging
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.artifacts import ArtifactRef, ArtifactStore
from tasks.execute import StageRequest

PROJECT_ROOT = Path(__file__).resolve().parents[2]

Logger = logging.Logger | logging.LoggerAdapter[Any]


class ComputeError(RuntimeError):
    """A backend cannot run a stage (bad settings, missing credentials, failed job): one line."""


class BackendConfig(BaseModel):
    """Base of a backend's config: frozen, unknown keys refused; a subclass adds ``backend: Literal["<name>"]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @property
    def remote(self) -> bool:
        """Whether the stage runs on another machine (then it needs an s3:// or gs:// artifact root)."""
        return False


class LogStream(io.TextIOBase):
    """A text stream that forwards complete lines to ``emit`` with secret values masked."""

    def __init__(self, emit: Callable[[str], None], secrets: Mapping[str, str] | None = None) -> None:
        self._emit, self._buf = emit, ""
        self._secrets = sorted((v for v in (secrets or {}).values() if len(v) >= 4), key=len, reverse=True)

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._buf += s
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            self._line(line)
        return len(s)

    def _line(self, line: str) -> None:
        for v in self._secrets:
            line = line.replace(v, "***")
        if line.strip():
            self._emit(line.rstrip("\r"))

    def flush(self) -> None:
        if self._buf:
            self._line(self._buf)
            self._buf = ""


def stream_process(cmd: list[str], env: Mapping[str, str], cwd: Path, log: LogStream) -> int:
    """Run ``cmd``, its stdout and stderr line by line to ``log``; its exit code."""
    proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
    log.flush()
    return proc.wait()


def committed(store: ArtifactStore, req: StageRequest, code: int | None, backend: str, logger: Logger) -> ArtifactRef:
    """The artifact an out-of-process run committed; a one-line error when it left no valid manifest."""
    ref = store.lookup(req.stage, req.key)
    if ref is None:
        raise ComputeError(f"{req.stage} on backend {backend} ended with exit code {code} and no valid "
                           f"manifest at {store.uri(req.stage, req.key)}")
    if code not in (0, None):
        logger.warning("%s: the job exited with %s but its manifest is valid; using it", req.stage, code)
    return ref
