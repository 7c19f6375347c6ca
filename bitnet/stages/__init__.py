"""The pipeline's stages, one module each: a pydantic config and ``run(cfg, inputs, out) -> metrics``.

``STAGES`` (``bitnet.stages.registry``) maps a stage name to its :class:`~bitnet.stages.base.Stage`; the CLI, the
Prefect flow and the worker all run a stage through it. See docs/architecture.md ("Adding a stage").

This package's ``__init__`` imports nothing itself: a stage's code digest (``tasks/caching.py``) follows the
imports of the stage's own module, and must not pull in every other stage through the package.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:  # lazy: `from bitnet.stages import STAGES`
    if name in ("STAGES", "stage"):
        return getattr(importlib.import_module("bitnet.stages.registry"), name)
    raise AttributeError(f"module 'bitnet.stages' has no attribute {name!r}")
