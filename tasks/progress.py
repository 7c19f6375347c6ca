"""Training progress of a running stage, reported to Prefect without touching the training code.

The trainer appends a JSON line per logged step to ``OUT/train/metrics.jsonl``; :class:`TrainProgress` tails that
file from a side thread, logs the loss through the task's Prefect logger and updates a progress artifact. A stage
that starts over a checkpoint of a killed attempt logs ``resumed from step N (checkpoint …)`` first, and the step
the trainer really resumed from (``resumed_from`` in the stage's ``metrics.json``) when it ends.

The flow run's progress artifact of a stage is replaced, not added to: a retried stage (a Prefect task retry or a
retried flow run) deletes the artifacts its earlier attempts left in the flow run before it creates its own. Whoever
set :data:`ATTEMPT_LISTENER` (the flow's MLflow lineage, :func:`listening`) hears each new step with the tokens this
attempt trained (the step's cumulative ``tokens`` less those of the checkpoint it resumed from), failed attempts
included.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from uuid import UUID

CKPT_RE = re.compile(r"^step-(\d{8})$")  # bitnet.trainer's checkpoint directories

# each new logged step of the running stage: {"step", "tokens" (trained by this attempt), "loss" (when logged)}
AttemptListener = Callable[[dict[str, float]], None]
ATTEMPT_LISTENER: contextvars.ContextVar[AttemptListener | None] = contextvars.ContextVar(
    "bitdistill_attempt_listener", default=None)


@contextlib.contextmanager
def listening(listener: AttemptListener | None) -> Iterator[None]:
    """Let the :class:`TrainProgress` of stages run in this context report their steps to ``listener``."""
    token = ATTEMPT_LISTENER.set(listener)
    try:
        yield
    finally:
        ATTEMPT_LISTENER.reset(token)


def latest_checkpoint(train_dir: Path) -> tuple[int, Path] | None:
    """The newest finished checkpoint under ``train_dir/checkpoints`` (a ``step-N`` directory with its
    ``trainer.json``), the one the trainer resumes from."""
    root = train_dir / "checkpoints"
    if not root.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in root.iterdir()
                   if (m := CKPT_RE.match(p.name)) and (p / "trainer.json").is_file())
    return found[-1] if found else None


def last_record(metrics_file: Path) -> dict[str, Any] | None:
    try:
        lines = metrics_file.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
    return None


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def checkpoint_tokens(checkpoint: tuple[int, Path] | None) -> int:
    """The cumulative tokens a checkpoint holds (0 without one): what a resumed attempt did not train itself."""
    if checkpoint is None:
        return 0
    try:
        return int(json.loads((checkpoint[1] / "trainer.json").read_text()).get("tokens", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def description(stage: str) -> str:
    return f"{stage}: training progress"


class TrainProgress:
    """Context manager: while the body trains, report ``metrics.jsonl`` progress every ``interval`` seconds."""

    def __init__(self, stage: str, metrics_file: Path, max_steps: int, logger: logging.Logger | logging.LoggerAdapter,
                 interval: float = 5.0, artifact: bool = True) -> None:
        self.stage, self.metrics_file, self.max_steps = stage, metrics_file, max_steps
        self.artifact = artifact  # False outside a Prefect run (the worker): log lines only
        self.logger, self.interval = logger, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._artifact: UUID | None = None
        self._last_step = -1
        self._stale: tuple[int, int] | None = None
        self.listener = ATTEMPT_LISTENER.get()
        self.start_tokens = 0

    def __enter__(self) -> TrainProgress:
        self.resumed = latest_checkpoint(self.metrics_file.parent)
        self.start_tokens = checkpoint_tokens(self.resumed)
        self._stale = _stat(self.metrics_file)  # a killed attempt's records, until the trainer rewrites the file
        if self.resumed is not None:
            step, path = self.resumed
            self.logger.info("%s: resumed from step %d/%d (checkpoint %s)", self.stage, step, self.max_steps, path)
        if self.artifact:
            try:
                from prefect.artifacts import create_progress_artifact

                self._replace_stale()
                start = 100.0 * self.resumed[0] / max(1, self.max_steps) if self.resumed else 0.0
                self._artifact = create_progress_artifact(min(100.0, start), description=description(self.stage))
            except Exception as e:  # reporting must never break training
                self.logger.debug("no progress artifact: %s", e)
        ctx = contextvars.copy_context()
        self._thread = threading.Thread(target=ctx.run, args=(self._loop,), name=f"{self.stage}-progress", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        if self._stale is not None and _stat(self.metrics_file) == self._stale:
            return
        self._stale = None
        rec = last_record(self.metrics_file)
        if not rec or rec.get("step", -1) == self._last_step:
            return
        self._last_step = int(rec["step"])
        loss = rec.get("loss")
        self.logger.info("%s: step %d/%d loss %s", self.stage, self._last_step, self.max_steps,
                         f"{loss:.4f}" if isinstance(loss, float) else loss)
        self._update(100.0 * self._last_step / max(1, self.max_steps))
        if self.listener is not None:
            self._tell(rec)

    def _tell(self, rec: dict[str, Any]) -> None:
        heard = {"step": float(self._last_step)}
        if isinstance(tokens := rec.get("tokens"), int):
            heard["tokens"] = float(max(0, tokens - self.start_tokens))
        if isinstance(loss := rec.get("loss"), int | float):
            heard["loss"] = float(loss)
        try:
            assert self.listener is not None
            self.listener(heard)
        except Exception as e:  # noqa: BLE001 — reporting must never break training
            self.logger.debug("attempt listener failed: %s", e)

    def _replace_stale(self) -> None:
        """Delete this stage's progress artifacts that earlier attempts left in this flow run."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType
        from prefect.runtime import flow_run

        if flow_run.id is None:
            return
        flt = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(str(flow_run.id))]),
                             type=ArtifactFilterType(any_=["progress"]))
        with get_client(sync_client=True) as client:
            for old in client.read_artifacts(artifact_filter=flt):
                if old.description == description(self.stage):
                    client.delete_artifact(old.id)

    def _update(self, pct: float) -> None:
        if self._artifact is None:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact, min(100.0, pct))
        except Exception as e:
            self.logger.debug("progress artifact update failed: %s", e)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.poll()  # a failed attempt's last steps count too
        if et is None:
            self._update(100.0)
            self._report_resume()

    def _report_resume(self) -> None:
        """Say so when the trainer resumed from another step than announced (e.g. it fell back to an older,
        intact checkpoint)."""
        try:
            metrics = json.loads((self.metrics_file.parent.parent / "metrics.json").read_text())
        except (OSError, json.JSONDecodeError):
            return
        actual = metrics.get("resumed_from")
        announced = self.resumed[0] if self.resumed else None
        if actual != announced:
            where = f"step {actual}" if actual is not None else "step 0 (no usable checkpoint)"
            self.logger.info("%s: the trainer resumed from %s", self.stage, where)
