"""Flow ``bitdistill``: world → teacher → convert → layer-wise → CPT → KD → LRC → eval → GGUF export.

Every stage runs through one cached Prefect task (``tasks/stages.py``), wired here by name: a second run with the
same config finishes with every stage ``Cached``; changing one stage's config or the ``bitnet/`` code it imports
re-runs that stage and those after it. A killed run (``Crashed``) resumes by ``prefect flow-run retry`` or a new
run: finished stages come from the cache, the killed stage from its last trainer checkpoint.

Parameters: ``preset`` (one of ``flows.config.PRESETS``) and ``config``, a partial mapping merged over it; their
types (:mod:`flows.params`) are the deployment's parameter schema, so a server refuses a typo before any process
starts (a plain mapping is accepted too when the flow is called from Python). A
deployment's own settings are never inside ``config`` (a user's ``--params '{"config": ...}'`` replaces that
parameter as a whole): ``eval-only`` is its own entry point, :func:`bitdistill_eval_only`, which cannot train.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry from a local server

from prefect import flow  # noqa: E402
from prefect.states import State  # noqa: E402

from flows.config import STUDENT_STAGES, PipelineConfig, pipeline_config  # noqa: E402
from flows.params import PipelineOverrides, PresetName  # noqa: E402
from flows.preflight import preflight  # noqa: E402
from flows.report import RunSummary  # noqa: E402
from flows.runner import StageRunner, close_lineage  # noqa: E402


def pipeline(run: StageRunner) -> RunSummary:
    """The stages, in order, each fed the outputs it needs."""
    cfg = run.cfg
    world = run.stage("world")
    teacher = run.stage("teacher", world=None if cfg.teacher.pretrained else world)
    # the world only when convert calibrates: an uncalibrated student does not depend on it (nor does its cache key)
    student = naive = run.stage("convert", teacher=teacher, world=world if cfg.convert.calibration.enabled else None)
    for name in STUDENT_STAGES:
        student = run.stage(name, student=student, teacher=teacher, world=world) or student
    # eval first: it reads only the PyTorch student, and a student whose shape no GGUF graph takes is still measured
    run.stage("eval", student=student, naive=naive, teacher=teacher, world=world)
    gguf = run.stage("export", student=student)
    return run.finish(student, gguf)


# a cancelled, crashed or failed flow run closes its MLflow runs when Prefect marks the state, not at the next run
@flow(name="bitdistill", validate_parameters=False, on_cancellation=[close_lineage], on_crashed=[close_lineage],
      on_failure=[close_lineage])
def bitdistill(
    config: PipelineOverrides | PipelineConfig | None = None, preset: PresetName | None = None
) -> RunSummary | State:
    """``preset``: tiny (default), smoke or a real-model preset; ``config``: a full config, or a partial mapping
    merged over the preset (``{"kd": {"temperature": 2.0}}``). A student no llama.cpp graph takes is refused before
    the first stage (:func:`flows.preflight.preflight`)."""
    cfg = pipeline_config(config, preset)
    preflight(cfg)
    return StageRunner.execute(pipeline, cfg)


# a cancelled, crashed or failed flow run closes its MLflow runs when Prefect marks the state, not at the next run
@flow(name="bitdistill", validate_parameters=False, on_cancellation=[close_lineage], on_crashed=[close_lineage],
      on_failure=[close_lineage])
def bitdistill_eval_only(
    config: PipelineOverrides | PipelineConfig | None = None, preset: PresetName | None = None
) -> RunSummary | State:
    """Deployment ``eval-only``: export and evaluate the finished student. Every training stage must already be
    finished; whatever ``config`` says, nothing is trained (``reuse_only`` is forced on)."""
    cfg = pipeline_config(config, preset)
    return StageRunner.execute(pipeline, cfg.model_copy(update={"reuse_only": True}))


if __name__ == "__main__":
    bitdistill()
