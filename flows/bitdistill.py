"""Flow ``bitdistill``: world → teacher → convert → layer-wise → CPT → KD → LRC → GGUF export → eval.

Every stage runs through one cached Prefect task (``tasks/stages.py``), wired here by name: a second run with the
same config finishes with every stage ``Cached``; changing one stage's config or the ``bitnet/`` code it imports
re-runs that stage and those after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import flow

from flows.config import STUDENT_STAGES, PipelineConfig, pipeline_config
from flows.report import RunSummary
from flows.runner import StageRunner


@flow(name="bitdistill", validate_parameters=False)
def bitdistill(config: PipelineConfig | Mapping[str, Any] | None = None, preset: str | None = None) -> RunSummary:
    """``config``: a full config, or a partial mapping merged over ``preset`` (default: the mapping's
    ``preset``, else ``tiny``)."""
    cfg = pipeline_config(config, preset).resolved()
    run = StageRunner(cfg)

    world = run.stage("world")
    teacher = run.stage("teacher", world=None if cfg.teacher.pretrained else world)
    student = naive = run.stage("convert", teacher=teacher)
    for name in STUDENT_STAGES:
        student = run.stage(name, student=student, teacher=teacher, world=world) or student
    gguf = run.stage("export", student=student)
    run.stage("eval", student=student, naive=naive, teacher=teacher, world=world)
    return run.finish(student, gguf)


if __name__ == "__main__":
    bitdistill()
