"""One stage run, wherever it executes: a :class:`StageRequest` in, a committed artifact out (no Prefect here).

The in-process Prefect task (backend ``local``) and ``python -m tasks.worker REQUEST`` (backends ``torchrun`` and
``skypilot``) both call :func:`execute`: look up ``{stage}/{key}`` (a valid manifest → nothing to do), fetch the
upstream artifacts to verified local directories, run ``STAGES[req.stage]`` into the work directory (the trainer
resumes from ``train/checkpoints/`` there) and commit it (files first, manifest last). No stage behaviour lives
here: it is all in ``bitnet/stages/``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts import ArtifactLockedError, ArtifactRef, ArtifactStore, StoreConfig

log = logging.getLogger("bitdistill.execute")

Progress = Callable[[str, Path, int], AbstractContextManager[Any]]


class StageRequest(BaseModel):
    """Everything a worker needs to produce ``{store.root}/{stage}/{key}/`` (JSON, no tensors, no secrets)."""

    model_config = ConfigDict(extra="forbid")

    format: int = 2
    stage: str = Field(description="the stage to run: a key of bitnet.stages.STAGES")
    key: str
    config: dict[str, Any] = Field(default_factory=dict, description="the stage config (model_dump, JSON)")
    upstream: dict[str, ArtifactRef] = Field(default_factory=dict, description="input name → upstream artifact")
    store: StoreConfig
    code: str = Field(default="", description="digest of the code the stage runs (recorded in the manifest)")
    producer: dict[str, Any] = Field(default_factory=dict)

    def stage_config(self) -> BaseModel:
        """The request's config, validated by its stage's config class (one-line errors)."""
        from bitnet.config import validate
        from bitnet.stages import stage

        return validate(stage(self.stage).config, self.config)


@contextlib.contextmanager
def no_progress(stage: str, work: Path, max_steps: int) -> Iterator[None]:
    yield


# ----------------------------------------------------------------------------------------------- execute
def execute(
    req: StageRequest,
    *,
    progress: Progress = no_progress,
    logger: logging.Logger | logging.LoggerAdapter[Any] = log,
    check_existing: bool = True,
    commit: bool = True,
    fetch_lock: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    before_compute: Callable[[ArtifactStore, Path], AbstractContextManager[Any]] | None = None,
) -> ArtifactRef | None:
    """Produce ``req``'s artifact and return its ref (``None`` on a non-committing rank).

    ``check_existing``: first look for a valid manifest without taking the lock (off when the caller has just
    looked, as the flow's stage task does). Whatever it says, a committing run looks again once it holds the lock
    and reuses what another run finished while it waited: recomputing would remove that run's manifest (which it
    has already handed to its next stage) and rewrite it. ``commit`` is false on torchrun ranks other than 0.
    ``fetch_lock`` serialises upstream downloads of processes sharing a cache directory; ``before_compute`` wraps
    the computation (the worker restores and uploads trainer checkpoints with it).
    """
    cfg = req.stage_config()
    store = ArtifactStore.from_config(req.store)
    if check_existing and (ref := store.lookup(req.stage, req.key)) is not None:
        logger.info("%s: %s holds a valid manifest; nothing to do", req.stage, ref.uri)
        return ref
    if not commit:
        return _compute(req, cfg, store, progress=progress, logger=logger, commit=False, fetch_lock=fetch_lock,
                        before_compute=before_compute)
    with _stage_lock(store, req, logger):
        if (ref := store.lookup(req.stage, req.key)) is not None:  # finished by another run while this one waited
            logger.info("%s: %s was finished by another run; reusing it", req.stage, ref.uri)
            return ref
        return _compute(req, cfg, store, progress=progress, logger=logger, commit=True, fetch_lock=fetch_lock,
                        before_compute=before_compute)


LOCK_WAIT_S = 7 * 24 * 3600.0  # a holder that dies releases the lock (flock) or lets it go stale (object stores)


@contextlib.contextmanager
def _stage_lock(store: ArtifactStore, req: StageRequest, logger: Any) -> Iterator[None]:
    """Serialise runs computing the same ``{stage}/{key}``: the second waits, then reuses the first one's result."""
    try:
        with store.lock(req.stage, req.key):
            yield
        return
    except ArtifactLockedError as e:
        logger.warning("%s: %s; waiting", req.stage, e)
    with store.lock(req.stage, req.key, wait_s=LOCK_WAIT_S):
        yield


def _compute(
    req: StageRequest,
    cfg: BaseModel,
    store: ArtifactStore,
    *,
    progress: Progress,
    logger: Any,
    commit: bool,
    fetch_lock: Callable[[], AbstractContextManager[Any]],
    before_compute: Callable[[ArtifactStore, Path], AbstractContextManager[Any]] | None,
) -> ArtifactRef | None:
    from bitnet.stages.outputs import forget_output
    from bitnet.stages.registry import run_stage

    if commit:
        store.invalidate(req.stage, req.key)  # a stale manifest must not survive a crash of the recomputation
    with fetch_lock():
        local = {name: store.fetch(ref) for name, ref in req.upstream.items()}
    work = store.work_dir(req.stage, req.key)
    if commit:  # the store, not the directory, says what is done: no valid manifest → recompute (resuming)
        forget_output(work)
    logger.info("%s: computing into %s", req.stage, work)
    with before_compute(store, work) if before_compute else contextlib.nullcontext():
        train = getattr(cfg, "train", None)
        with progress(req.stage, work, train.max_steps) if train is not None else contextlib.nullcontext():
            metrics = run_stage(req.stage, cfg, local, work)
    if not commit:
        return None
    ref = store.commit(req.stage, req.key, work, config=req.config, upstream=req.upstream, metrics=metrics,
                       code=req.code, producer={**req.producer, "host": socket.gethostname()})
    logger.info("%s: committed %s", req.stage, ref.uri)
    return ref
