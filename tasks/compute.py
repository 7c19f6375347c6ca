"""Where a stage run goes: :func:`run_request` hands it to its backend's module (``tasks/backends/``: ``local``
in-process, ``torchrun`` local processes, ``skypilot`` GCP/RunPod), picked by ``compute.backend``.

Every backend runs the same thing, :func:`tasks.execute.execute`; the out-of-process ones through
``python -m tasks.worker REQUEST``, then read the result manifest from the artifact root. This module also
re-exports the backends' public names (``ComputeConfig``, ``render_task``, launchers, ...).

No Prefect or SkyPilot import at module level (``flows/config.py`` imports :data:`ComputeConfig`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from tasks.artifacts import ArtifactRef, StoreConfig
from tasks.backends import (
    BACKENDS,
    Backend,
    BackendConfig,
    ComputeConfig,
    ComputeError,
    LocalCompute,
    SkyPilotCompute,
    TorchrunCompute,
    backend_module,
)
from tasks.backends.base import PROJECT_ROOT, Logger, LogStream
from tasks.backends.skypilot import (
    Launcher,
    local_launcher,
    render_task,
    request_uri,
    required_secrets,
    resolve_secrets,
    sky_launcher,
)
from tasks.execute import Progress, StageRequest, no_progress


def preflight(compute: BackendConfig, store: StoreConfig, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The backend's checks before anything is launched; returns the resolved secrets (empty when it has none)."""
    check = getattr(backend_module(compute), "preflight", None)
    return check(compute, store, os.environ if env is None else env) if check else {}


def run_request(
    compute: BackendConfig,
    req: StageRequest,
    logger: Logger,
    *,
    progress: Progress = no_progress,
    launcher: Launcher | None = None,
) -> ArtifactRef:
    """Run ``req`` on ``compute``'s backend and return the committed artifact (``launcher``: skypilot only)."""
    options = {} if launcher is None else {"launcher": launcher}
    ref: ArtifactRef = backend_module(compute).run(req, compute, logger, progress=progress, **options)
    return ref


__all__ = ["BACKENDS", "PROJECT_ROOT", "Backend", "BackendConfig", "ComputeConfig", "ComputeError", "Launcher",
           "LocalCompute", "LogStream", "SkyPilotCompute", "TorchrunCompute", "local_launcher", "preflight",
           "render_task", "request_uri", "required_secrets", "resolve_secrets", "run_request", "sky_launcher"]
