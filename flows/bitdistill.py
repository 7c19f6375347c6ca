"""Flow ``bitdistill``: world → teacher → convert → layer-wise → CPT → KD → LRC → GGUF export → eval.

Every stage is a cached Prefect task (see ``tasks/stages.py``): a second run with the same config finishes with
every stage ``Cached``; changing one stage's config or the ``bitnet/`` code re-runs that stage and those after it.
"""

from __future__ import annotations

from prefect import flow

from flows.config import STUDENT_STAGES, PipelineConfig
from flows.report import RunSummary
from flows.runner import StageRunner
from tasks.stages import (
    STUDENT_TASKS,
    convert_task,
    eval_task,
    export_available,
    export_task,
    pretrained_teacher_task,
    teacher_task,
    world_task,
)


@flow(name="bitdistill", validate_parameters=True)
def bitdistill(config: PipelineConfig = PipelineConfig()) -> RunSummary:  # noqa: B008 (the tiny preset)
    cfg = config.resolved()
    run = StageRunner(cfg)

    world = run.stage("world", cfg.world, world_task, cfg=cfg.world.config)
    if cfg.teacher.pretrained:
        teacher = run.stage("teacher", cfg.teacher, pretrained_teacher_task, model=cfg.teacher.pretrained)
    else:
        teacher = run.stage("teacher", cfg.teacher, teacher_task, cfg=cfg.teacher.config, world=world)
    student = naive = run.stage("convert", cfg.convert, convert_task, cfg=cfg.convert.config, teacher=teacher)
    for name in STUDENT_STAGES:
        step = getattr(cfg, name)
        student = run.stage(name, step, STUDENT_TASKS[name], cfg=step.config, student=student, teacher=teacher,
                            world=world) or student

    if export_available():
        gguf = run.stage("export", cfg.export, export_task, cfg=cfg.export.config, student=student)
    else:
        gguf = run.skip("export", cfg.export, "bitnet.export not available")
    run.stage("eval", cfg.eval, eval_task, cfg=cfg.eval.config, student=student, naive=naive, teacher=teacher,
              world=world)
    return run.finish(student, gguf)


if __name__ == "__main__":
    bitdistill()
