"""Compute backends: where one stage runs. One module per backend, each exposing its config class (a
:class:`~tasks.backends.base.BackendConfig` with ``backend: Literal["<name>"]``) and
``run(request, cfg, logger, *, progress) -> ArtifactRef`` (optionally ``preflight(cfg, store, env) -> secrets``,
checks made before any stage runs). :data:`ComputeConfig` is the union of the configs, discriminated by
``backend``; :data:`BACKENDS` maps each name to its module. Adding a backend: its module here, imported below and
named in the import of the modules and in :data:`Backend` (docs/architecture.md § Adding a compute backend).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Annotated, Any, Union, get_args

from pydantic import BeforeValidator, Field

from tasks.backends import local, skypilot, torchrun
from tasks.backends.base import BackendConfig, ComputeError
from tasks.backends.local import LocalCompute
from tasks.backends.skypilot import SkyPilotCompute
from tasks.backends.torchrun import TorchrunCompute

# one member per backend (its module's config class); the registry below and the config schema follow from it
Backend = Union[local.LocalCompute, torchrun.TorchrunCompute, skypilot.SkyPilotCompute]  # noqa: UP007 — for get_args

# backend name → the module that runs it (the one that defines its config class)
BACKENDS: dict[str, ModuleType] = {cls.model_fields["backend"].default: sys.modules[cls.__module__]
                                   for cls in get_args(Backend)}


def _known_backend(value: Any) -> Any:
    """A one-line error naming the backends for an unknown ``backend`` (before the union picks a member)."""
    name = value.get("backend") if isinstance(value, Mapping) else None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown compute backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return value


ComputeConfig = Annotated[Backend, Field(discriminator="backend"), BeforeValidator(_known_backend)]
"""Where one stage runs (``Step.compute`` in the pipeline config): one of the backends' configs."""


def backend_module(compute: BackendConfig) -> ModuleType:
    """The module of ``compute``'s backend."""
    return BACKENDS[compute.backend]  # type: ignore[attr-defined]


__all__ = ["BACKENDS", "Backend", "BackendConfig", "ComputeConfig", "ComputeError", "LocalCompute",
           "SkyPilotCompute", "TorchrunCompute", "backend_module", "local", "skypilot", "torchrun"]
