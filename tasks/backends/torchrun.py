"""Backend ``torchrun``: ``python -m torch.distributed.run --standalone -m tasks.worker REQUEST`` on this machine."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Literal

from pydantic import Field

from tasks.artifacts import ArtifactRef, ArtifactStore
from tasks.backends.base import PROJECT_ROOT, BackendConfig, Logger, LogStream, committed, stream_process
from tasks.execute import Progress, StageRequest, no_progress


class TorchrunCompute(BackendConfig):
    """Local processes under torchrun (DDP: gloo on CPU, NCCL on GPU; rank 0 commits)."""

    backend: Literal["torchrun"] = "torchrun"
    nproc_per_node: int = Field(default=1, ge=1, description="processes on this machine")
    env: dict[str, str] = Field(default_factory=dict, description="extra env vars for the processes")


def run(request: StageRequest, cfg: TorchrunCompute, logger: Logger, *,
        progress: Progress = no_progress) -> ArtifactRef:
    """Write the request next to the stage's work, run the worker under torchrun, read the manifest back."""
    store = ArtifactStore.from_config(request.store)
    path = store.work_dir(request.stage, request.key) / ".request.json"  # hidden: not part of the artifact
    path.write_text(request.model_dump_json(indent=2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={cfg.nproc_per_node}", "-m", "tasks.worker", str(path)]
    logger.info("%s: %s", request.stage, shlex.join(cmd))
    code = stream_process(cmd, {**os.environ, **cfg.env}, PROJECT_ROOT, LogStream(logger.info))
    return committed(store, request, code, cfg.backend, logger)
