"""One thin Prefect task per stage: stage config + upstream ``ArtifactRef``s in, an ``ArtifactRef`` out.

Each task computes the stage's key (config, upstream manifests, code digest) and returns ``{stage}/{key}`` when it
already holds a valid manifest (so results survive the loss of Prefect's own result storage). Otherwise it builds
a :class:`~tasks.execute.StageRequest` and hands it to the stage's compute backend (``tasks/compute.py``: in-process
by default, ``torchrun`` or SkyPilot through ``python -m tasks.worker``), which runs the ``bitnet`` stage function
and commits the artifact (files first, manifest last); a killed stage re-runs in the same directory and the trainer
resumes from its checkpoints. Caching: INPUTS (minus ``reuse_only`` and ``compute``) + TASK_SOURCE + a digest of
the ``bitnet/`` sources, results persisted as JSON.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from pydantic import BaseModel

from bitnet.stages import (
    ConvertStageConfig,
    CPTStageConfig,
    KDStageConfig,
    LayerwiseStageConfig,
    LRCStageConfig,
    TeacherStageConfig,
)
from bitnet.world import WorldConfig
from tasks.artifacts import ArtifactError, ArtifactRef, ArtifactStore, StoreConfig, stage_key
from tasks.caching import SourceDigest, code_digest, stage_cache_policy
from tasks.compute import ComputeConfig, run_request
from tasks.execute import EvalConfig, ExportConfig, StageRequest
from tasks.progress import TrainProgress

__all__ = ["EvalConfig", "ExportConfig", "STUDENT_TASKS", "run_stage"]

StudentConfig = LayerwiseStageConfig | CPTStageConfig | KDStageConfig | LRCStageConfig

# the bitnet modules each stage runs (their import closure is part of the cache key and the artifact key)
WORLD_CODE = ("bitnet.world",)
TRAIN_CODE = ("bitnet.stages",)
EXPORT_CODE = ("bitnet.export.gguf", "bitnet.export.lora")
EVAL_CODE = ("bitnet.evaluate", "bitnet.student", "bitnet.teacher", "bitnet.world", "bitnet.data")

TASK_OPTIONS: dict[str, Any] = {
    "persist_result": True,
    "result_serializer": "json",  # cached results are our small ArtifactRef, never pickles
    "retries": 0,
    "retry_delay_seconds": 10,
}


def _producer() -> dict[str, Any]:
    from prefect.runtime import flow_run, task_run

    return {"flow_run_id": flow_run.id, "flow_run_name": flow_run.name, "task_run_id": task_run.id}


def _train_progress(stage: str, work: Path, max_steps: int) -> TrainProgress:
    return TrainProgress(stage, work / "train" / "metrics.jsonl", max_steps, get_run_logger())


def run_stage(
    op: str,
    stage: str,
    cfg: BaseModel | None,
    store_cfg: StoreConfig,
    upstream: dict[str, ArtifactRef],
    *,
    code_modules: tuple[str, ...],
    compute: ComputeConfig | None = None,
    key_material: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    reuse_only: bool = False,
) -> ArtifactRef:
    """Return the finished ``stage`` output for these inputs, running ``op`` on ``compute`` when needed.

    ``reuse_only`` (eval-only runs): a stage that is not finished yet raises instead of computing.
    """
    logger = get_run_logger()
    store = ArtifactStore.from_config(store_cfg)
    code = code_digest(code_modules)
    config = cfg.model_dump(mode="json") if cfg is not None else {}
    material = {"config": config, "upstream": {k: r.sha256 for k, r in upstream.items()}, "code": code,
                **(key_material or {})}
    key = stage_key(stage, material)
    if (ref := store.lookup(stage, key)) is not None:
        logger.info("%s: %s holds a valid manifest; reusing it", stage, ref.uri)
        return ref
    if reuse_only:
        raise ArtifactError(f"{stage}: no finished artifact at {store.uri(stage, key)} and this run is reuse-only")
    req = StageRequest(op=op, stage=stage, key=key, config=config, params=params or {}, upstream=upstream,
                       store=store_cfg, code=code, producer=_producer())
    return run_request(compute or ComputeConfig(), req, logger, progress=_train_progress)


# ------------------------------------------------------------------------------------------------- tasks
# ``compute`` picks the backend; it is not part of the cache key (where a stage ran does not change its output).
@task(name="world", cache_policy=stage_cache_policy(*WORLD_CODE) + SourceDigest(), **TASK_OPTIONS)
def world_task(
    cfg: WorldConfig, store: StoreConfig, reuse_only: bool = False, compute: ComputeConfig | None = None
) -> ArtifactRef:
    from bitnet.data import source_digest

    return run_stage("world", "world", cfg, store, {}, code_modules=WORLD_CODE, compute=compute,
                     key_material={"source": source_digest(cfg.source)}, reuse_only=reuse_only)


@task(name="teacher", cache_policy=stage_cache_policy(*TRAIN_CODE), **TASK_OPTIONS)
def teacher_task(
    cfg: TeacherStageConfig, world: ArtifactRef, store: StoreConfig, reuse_only: bool = False,
    compute: ComputeConfig | None = None,
) -> ArtifactRef:
    return run_stage("teacher", "teacher", cfg, store, {"world": world}, code_modules=TRAIN_CODE, compute=compute,
                     reuse_only=reuse_only)


@task(name="pretrained-teacher", cache_policy=stage_cache_policy(), **TASK_OPTIONS)
def pretrained_teacher_task(model: str, store: StoreConfig) -> ArtifactRef:
    """A hub id or local path used as the teacher: recorded (not copied) in a manifest without files."""
    return run_stage("pretrained-teacher", "teacher", None, store, {}, code_modules=(),
                     key_material={"hf_model": model}, params={"hf_model": model})


@task(name="convert", cache_policy=stage_cache_policy(*TRAIN_CODE), **TASK_OPTIONS)
def convert_task(
    cfg: ConvertStageConfig, teacher: ArtifactRef, store: StoreConfig, reuse_only: bool = False,
    compute: ComputeConfig | None = None,
) -> ArtifactRef:
    return run_stage("convert", "convert", cfg, store, {"teacher": teacher}, code_modules=TRAIN_CODE,
                     compute=compute, reuse_only=reuse_only)


@task(name="student-stage", cache_policy=stage_cache_policy(*TRAIN_CODE), **TASK_OPTIONS)
def student_task(
    cfg: StudentConfig,
    student: ArtifactRef,
    teacher: ArtifactRef,
    world: ArtifactRef,
    store: StoreConfig,
    reuse_only: bool = False,
    compute: ComputeConfig | None = None,
) -> ArtifactRef:
    return run_stage("student", cfg.kind, cfg, store, {"student": student, "teacher": teacher, "world": world},
                     code_modules=TRAIN_CODE, compute=compute, reuse_only=reuse_only)


layerwise_task = student_task.with_options(name="layerwise")
cpt_task = student_task.with_options(name="cpt")
kd_task = student_task.with_options(name="kd")
lrc_task = student_task.with_options(name="lrc")
STUDENT_TASKS = {"layerwise": layerwise_task, "cpt": cpt_task, "kd": kd_task, "lrc": lrc_task}


# ----------------------------------------------------------------------------------------- export / eval
def export_available() -> bool:
    """GGUF export lives in ``bitnet.export.gguf`` (the flow skips export where it is absent)."""
    try:
        return importlib.util.find_spec("bitnet.export.gguf") is not None
    except ModuleNotFoundError:
        return False


@task(name="export", cache_policy=stage_cache_policy(*EXPORT_CODE), **TASK_OPTIONS)
def export_task(
    cfg: ExportConfig, student: ArtifactRef, store: StoreConfig, compute: ComputeConfig | None = None
) -> ArtifactRef:
    """The final student as a llama.cpp ``bitnet`` GGUF (+ its LRC adapter as a LoRA GGUF when it has one)."""
    return run_stage("export", "export", cfg, store, {"student": student}, code_modules=EXPORT_CODE,
                     compute=compute)


@task(name="eval", cache_policy=stage_cache_policy(*EVAL_CODE), **TASK_OPTIONS)
def eval_task(
    cfg: EvalConfig, student: ArtifactRef, naive: ArtifactRef, teacher: ArtifactRef, world: ArtifactRef,
    store: StoreConfig, compute: ComputeConfig | None = None,
) -> ArtifactRef:
    """Held-out perplexity of teacher, naive ternary (converted, untrained) and final student, with agreement."""
    upstream = {"student": student, "naive": naive, "teacher": teacher, "world": world}
    return run_stage("eval", "eval", cfg, store, upstream, code_modules=EVAL_CODE, compute=compute)
