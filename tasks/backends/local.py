"""Backend ``local``: the stage runs in the calling process (the Prefect task's), the default."""

from __future__ import annotations

from typing import Literal

from tasks.artifacts import ArtifactRef
from tasks.backends.base import BackendConfig, Logger
from tasks.execute import Progress, StageRequest, execute, no_progress


class LocalCompute(BackendConfig):
    """In the calling process; no settings."""

    backend: Literal["local"] = "local"


def run(request: StageRequest, cfg: LocalCompute, logger: Logger, *, progress: Progress = no_progress) -> ArtifactRef:
    """Execute ``request`` here and return the committed artifact."""
    ref = execute(request, progress=progress, logger=logger, check_existing=False)
    assert ref is not None
    return ref
