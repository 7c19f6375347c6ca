"""Training progress of a running stage, reported to Prefect without touching the training code.

The trainer appends a JSON line per logged step to ``OUT/train/metrics.jsonl``; :class:`TrainProgress` tails that
file from a side thread, logs the loss through the task's Prefect logger and updates a progress artifact. A stage
that starts over a checkpoint of a killed attempt logs ``resumed from step N (checkpoint …)`` first, and the step
the trainer really resumed from (``resumed_from`` in the stage's ``metrics.json``) when it ends.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import threading
from pathlib import Path
from types import TracebackType
from typing import Any
from uuid import UUID

CKPT_RE = re.compile(r"^step-(\d{8})$")  # bitnet.trainer's checkpoint directories


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

    def __enter__(self) -> TrainProgress:
        self.resumed = latest_checkpoint(self.metrics_file.parent)
        if self.resumed is not None:
            step, path = self.resumed
            self.logger.info("%s: resumed from step %d/%d (checkpoint %s)", self.stage, step, self.max_steps, path)
        if self.artifact:
            try:
                from prefect.artifacts import create_progress_artifact

                self._artifact = create_progress_artifact(0.0, description=f"{self.stage}: training progress")
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
        rec = last_record(self.metrics_file)
        if not rec or rec.get("step", -1) == self._last_step:
            return
        self._last_step = int(rec["step"])
        loss = rec.get("loss")
        self.logger.info("%s: step %d/%d loss %s", self.stage, self._last_step, self.max_steps,
                         f"{loss:.4f}" if isinstance(loss, float) else loss)
        self._update(100.0 * self._last_step / max(1, self.max_steps))

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
        if et is None:
            self.poll()
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
