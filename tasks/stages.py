"""One thin Prefect task per stage: stage config + upstream ``ArtifactRef``s in, an ``ArtifactRef`` out.

Each task resolves its upstream artifacts to verified local directories, runs the ``bitnet`` stage function
into the stage's work directory and commits it to the artifact store (files first, manifest last). A stage whose
``{stage}/{key}`` already holds a valid manifest returns it without recomputing (so results survive the loss of
Prefect's own result storage); a killed stage re-runs in the same directory and the trainer resumes from its
checkpoints. Caching: INPUTS + TASK_SOURCE + a digest of the ``bitnet/`` sources, results persisted as JSON.
"""

from __future__ import annotations

import importlib.util
import math
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from pydantic import BaseModel, ConfigDict, Field

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
from tasks.progress import TrainProgress

StudentConfig = LayerwiseStageConfig | CPTStageConfig | KDStageConfig | LRCStageConfig
Compute = Callable[[Path, dict[str, Path]], dict[str, Any]]

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

    return {"flow_run_id": flow_run.id, "flow_run_name": flow_run.name, "task_run_id": task_run.id,
            "host": socket.gethostname()}


def _finite(obj: Any) -> Any:
    """Metrics as strict JSON: non-finite floats become None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def run_stage(
    stage: str,
    cfg: BaseModel | None,
    store_cfg: StoreConfig,
    upstream: dict[str, ArtifactRef],
    compute: Compute,
    *,
    code_modules: tuple[str, ...],
    key_material: dict[str, Any] | None = None,
    reuse_only: bool = False,
) -> ArtifactRef:
    """Return the finished ``stage`` output for these inputs, computing and committing it when needed.

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
    store.invalidate(stage, key)  # a corrupt or stale manifest must not survive a crash of the recomputation
    local = {name: store.fetch(ref) for name, ref in upstream.items()}
    work = store.work_dir(stage, key)
    logger.info("%s: computing into %s", stage, work)
    metrics = compute(work, local)
    ref = store.commit(stage, key, work, config=config, upstream=upstream, metrics=_finite(metrics), code=code,
                       producer=_producer())
    logger.info("%s: committed %s", stage, ref.uri)
    return ref


def teacher_source(store_cfg: StoreConfig, teacher: ArtifactRef, local: Path) -> str:
    """What ``load_teacher`` gets: a pretrained model id recorded in the manifest, else the local ``model/`` dir."""
    manifest = ArtifactStore.from_config(store_cfg).read_manifest(teacher)
    return str(manifest.metrics.get("hf_model") or local / "model")


def _train_progress(stage: str, work: Path, max_steps: int) -> TrainProgress:
    return TrainProgress(stage, work / "train" / "metrics.jsonl", max_steps, get_run_logger())


# ------------------------------------------------------------------------------------------------- tasks
@task(name="world", cache_policy=stage_cache_policy(*WORLD_CODE) + SourceDigest(), **TASK_OPTIONS)
def world_task(cfg: WorldConfig, store: StoreConfig, reuse_only: bool = False) -> ArtifactRef:
    from bitnet.data import source_digest
    from bitnet.world import build_world

    def compute(work: Path, _: dict[str, Path]) -> dict[str, Any]:
        info = build_world(cfg, work).info
        return {k: info[k] for k in ("vocab_size", "splits", "unigram_test_ppl")}

    return run_stage("world", cfg, store, {}, compute, code_modules=WORLD_CODE,
                     key_material={"source": source_digest(cfg.source)}, reuse_only=reuse_only)


@task(name="teacher", cache_policy=stage_cache_policy(*TRAIN_CODE), **TASK_OPTIONS)
def teacher_task(
    cfg: TeacherStageConfig, world: ArtifactRef, store: StoreConfig, reuse_only: bool = False
) -> ArtifactRef:
    from bitnet.stages import train_teacher
    from bitnet.world import open_world

    def compute(work: Path, up: dict[str, Path]) -> dict[str, Any]:
        with _train_progress("teacher", work, cfg.train.max_steps):
            return train_teacher(cfg, open_world(up["world"]), work)

    return run_stage("teacher", cfg, store, {"world": world}, compute, code_modules=TRAIN_CODE, reuse_only=reuse_only)


@task(name="pretrained-teacher", cache_policy=stage_cache_policy(), **TASK_OPTIONS)
def pretrained_teacher_task(model: str, store: StoreConfig) -> ArtifactRef:
    """A hub id or local path used as the teacher: recorded (not copied) in a manifest without files."""
    return run_stage("teacher", None, store, {}, lambda work, up: {"hf_model": model}, code_modules=(),
                     key_material={"hf_model": model})


@task(name="convert", cache_policy=stage_cache_policy(*TRAIN_CODE), **TASK_OPTIONS)
def convert_task(
    cfg: ConvertStageConfig, teacher: ArtifactRef, store: StoreConfig, reuse_only: bool = False
) -> ArtifactRef:
    from bitnet.stages import convert_teacher

    def compute(work: Path, up: dict[str, Path]) -> dict[str, Any]:
        return convert_teacher(cfg, teacher_source(store, teacher, up["teacher"]), work / "model")

    return run_stage("convert", cfg, store, {"teacher": teacher}, compute, code_modules=TRAIN_CODE,
                     reuse_only=reuse_only)


@task(name="student-stage", cache_policy=stage_cache_policy(*TRAIN_CODE), **TASK_OPTIONS)
def student_task(
    cfg: StudentConfig,
    student: ArtifactRef,
    teacher: ArtifactRef,
    world: ArtifactRef,
    store: StoreConfig,
    reuse_only: bool = False,
) -> ArtifactRef:
    from bitnet.stages import run_student_stage
    from bitnet.world import open_world

    def compute(work: Path, up: dict[str, Path]) -> dict[str, Any]:
        with _train_progress(cfg.kind, work, cfg.train.max_steps):
            return run_student_stage(cfg, up["student"] / "model", teacher_source(store, teacher, up["teacher"]),
                                     open_world(up["world"]), work)

    return run_stage(cfg.kind, cfg, store, {"student": student, "teacher": teacher, "world": world}, compute,
                     code_modules=TRAIN_CODE, reuse_only=reuse_only)


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


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quant: Literal["tq2_0", "tq1_0", "f16"] = Field(default="tq2_0", description="GGUF type of the ternary matrices")


@task(name="export", cache_policy=stage_cache_policy(*EXPORT_CODE), **TASK_OPTIONS)
def export_task(cfg: ExportConfig, student: ArtifactRef, store: StoreConfig) -> ArtifactRef:
    """The final student as a llama.cpp ``bitnet`` GGUF (+ its LRC adapter as a LoRA GGUF when it has one)."""
    from bitnet.export.gguf import export_gguf

    def compute(work: Path, up: dict[str, Path]) -> dict[str, Any]:
        res = export_gguf(up["student"] / "model", work / "student.gguf", weight_type=cfg.quant,
                          lora_out=work / "lrc-lora.gguf")
        return {"gguf": "student.gguf", "lora": res.lora_path.name if res.lora_path else None,
                "weight_type": res.weight_type, "file_bytes": res.file_bytes, "n_tensors": res.n_tensors,
                "ternary_params": res.ternary_params, "bits_per_ternary_weight": res.bits_per_ternary_weight}

    return run_stage("export", cfg, store, {"student": student}, compute, code_modules=EXPORT_CODE)


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["test", "validation"] = "test"
    batch_size: int = Field(default=16, ge=1)
    max_batches: int | None = Field(default=32, ge=1, description="cap on held-out batches")


@task(name="eval", cache_policy=stage_cache_policy(*EVAL_CODE), **TASK_OPTIONS)
def eval_task(
    cfg: EvalConfig, student: ArtifactRef, naive: ArtifactRef, teacher: ArtifactRef, world: ArtifactRef,
    store: StoreConfig,
) -> ArtifactRef:
    """Held-out perplexity of teacher, naive ternary (converted, untrained) and final student, with agreement."""
    from bitnet.data import iter_eval_batches
    from bitnet.evaluate import compare_to_teacher, perplexity
    from bitnet.student import load_student
    from bitnet.teacher import load_teacher
    from bitnet.world import open_world

    def compute(work: Path, up: dict[str, Path]) -> dict[str, Any]:
        data = open_world(up["world"]).dataset(cfg.split)
        batches = lambda: iter_eval_batches(data, cfg.batch_size, cfg.max_batches)  # noqa: E731
        teacher_model = load_teacher(teacher_source(store, teacher, up["teacher"]))
        out: dict[str, Any] = {"split": cfg.split, "teacher_ppl": perplexity(teacher_model, batches())}
        for name in ("naive", "student"):
            m = compare_to_teacher(load_student(up[name] / "model"), teacher_model, batches())
            out.update({f"{name}_ppl": m["ppl"], f"{name}_top1_agreement": m["top1_agreement"], f"{name}_kl": m["kl"]})
        out["val_ppl"] = out["student_ppl"]  # the summary table's perplexity column
        return out

    upstream = {"student": student, "naive": naive, "teacher": teacher, "world": world}
    return run_stage("eval", cfg, store, upstream, compute, code_modules=EVAL_CODE)
