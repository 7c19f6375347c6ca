"""One stage run, wherever it executes: a :class:`StageRequest` in, a committed artifact out (no Prefect here).

The in-process Prefect task (backend ``local``) and ``python -m tasks.worker REQUEST`` (backends ``torchrun`` and
``skypilot``) both call :func:`execute`: look up ``{stage}/{key}`` (a valid manifest → nothing to do), fetch the
upstream artifacts to verified local directories, run the stage's ``bitnet`` function into the work directory
(the trainer resumes from ``train/checkpoints/`` there) and commit it (files first, manifest last).
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts import ArtifactRef, ArtifactStore, StoreConfig

log = logging.getLogger("bitdistill.execute")

Progress = Callable[[str, Path, int], AbstractContextManager[Any]]


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quant: Literal["tq2_0", "tq1_0", "f16"] = Field(default="tq2_0", description="GGUF type of the ternary matrices")


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    split: Literal["test", "validation"] = "test"
    batch_size: int = Field(default=16, ge=1)
    max_batches: int | None = Field(default=32, ge=1, description="cap on held-out batches")


class StageRequest(BaseModel):
    """Everything a worker needs to produce ``{store.root}/{stage}/{key}/`` (JSON, no tensors, no secrets)."""

    model_config = ConfigDict(extra="forbid")

    format: int = 1
    op: str = Field(description="what to run: a key of OPS (world, teacher, convert, student, export, eval, ...)")
    stage: str = Field(description="the stage directory name (the student ops run as layerwise/cpt/kd/lrc)")
    key: str
    config: dict[str, Any] = Field(default_factory=dict, description="the stage config (model_dump, JSON)")
    params: dict[str, Any] = Field(default_factory=dict, description="op inputs that are not config")
    upstream: dict[str, ArtifactRef] = Field(default_factory=dict)
    store: StoreConfig
    code: str = Field(default="", description="digest of the code the stage runs (recorded in the manifest)")
    producer: dict[str, Any] = Field(default_factory=dict)


@dataclass
class OpContext:
    req: StageRequest
    store: ArtifactStore
    work: Path
    up: dict[str, Path]
    progress: Progress
    extra: dict[str, Any] = field(default_factory=dict)

    def teacher_source(self) -> str:
        """What ``load_teacher`` gets: a pretrained model id recorded in the manifest, else the local ``model/``."""
        manifest = self.store.read_manifest(self.req.upstream["teacher"])
        return str(manifest.metrics.get("hf_model") or self.up["teacher"] / "model")


@contextlib.contextmanager
def no_progress(stage: str, work: Path, max_steps: int) -> Iterator[None]:
    yield


# --------------------------------------------------------------------------------------------------- ops
def _world(cfg: Any, c: OpContext) -> dict[str, Any]:
    from bitnet.world import build_world

    info = build_world(cfg, c.work).info
    return {k: info[k] for k in ("vocab_size", "splits", "unigram_test_ppl")}


def _teacher(cfg: Any, c: OpContext) -> dict[str, Any]:
    from bitnet.stages import train_teacher
    from bitnet.world import open_world

    with c.progress("teacher", c.work, cfg.train.max_steps):
        return train_teacher(cfg, open_world(c.up["world"]), c.work)


def _pretrained_teacher(cfg: Any, c: OpContext) -> dict[str, Any]:
    return {"hf_model": c.req.params["hf_model"]}


def _convert(cfg: Any, c: OpContext) -> dict[str, Any]:
    from bitnet.stages import convert_teacher

    return convert_teacher(cfg, c.teacher_source(), c.work / "model")


def _student(cfg: Any, c: OpContext) -> dict[str, Any]:
    from bitnet.stages import run_student_stage
    from bitnet.world import open_world

    with c.progress(cfg.kind, c.work, cfg.train.max_steps):
        return run_student_stage(cfg, c.up["student"] / "model", c.teacher_source(), open_world(c.up["world"]),
                                 c.work)


def _export(cfg: ExportConfig, c: OpContext) -> dict[str, Any]:
    from bitnet.export.gguf import export_gguf

    res = export_gguf(c.up["student"] / "model", c.work / "student.gguf", weight_type=cfg.quant,
                      lora_out=c.work / "lrc-lora.gguf")
    return {"gguf": "student.gguf", "lora": res.lora_path.name if res.lora_path else None,
            "weight_type": res.weight_type, "file_bytes": res.file_bytes, "n_tensors": res.n_tensors,
            "ternary_params": res.ternary_params, "bits_per_ternary_weight": res.bits_per_ternary_weight}


def _eval(cfg: EvalConfig, c: OpContext) -> dict[str, Any]:
    from bitnet.data import iter_eval_batches
    from bitnet.evaluate import compare_to_teacher, perplexity
    from bitnet.student import load_student
    from bitnet.teacher import load_teacher
    from bitnet.world import open_world

    data = open_world(c.up["world"]).dataset(cfg.split)
    batches = lambda: iter_eval_batches(data, cfg.batch_size, cfg.max_batches)  # noqa: E731
    teacher_model = load_teacher(c.teacher_source())
    out: dict[str, Any] = {"split": cfg.split, "teacher_ppl": perplexity(teacher_model, batches())}
    for name in ("naive", "student"):
        m = compare_to_teacher(load_student(c.up[name] / "model"), teacher_model, batches())
        out.update({f"{name}_ppl": m["ppl"], f"{name}_top1_agreement": m["top1_agreement"], f"{name}_kl": m["kl"]})
    out["val_ppl"] = out["student_ppl"]  # the summary table's perplexity column
    return out


OPS: dict[str, Callable[[Any, OpContext], dict[str, Any]]] = {
    "world": _world, "teacher": _teacher, "pretrained-teacher": _pretrained_teacher, "convert": _convert,
    "student": _student, "export": _export, "eval": _eval,
}


def config_class(op: str, stage: str) -> type[BaseModel] | None:
    """The pydantic class of a request's config (``None``: the op takes no config)."""
    from bitnet.stages import (
        ConvertStageConfig,
        CPTStageConfig,
        KDStageConfig,
        LayerwiseStageConfig,
        LRCStageConfig,
        TeacherStageConfig,
    )
    from bitnet.world import WorldConfig

    students: dict[str, type[BaseModel]] = {"layerwise": LayerwiseStageConfig, "cpt": CPTStageConfig,
                                            "kd": KDStageConfig, "lrc": LRCStageConfig}
    classes: dict[str, type[BaseModel] | None] = {
        "world": WorldConfig, "teacher": TeacherStageConfig, "pretrained-teacher": None,
        "convert": ConvertStageConfig, "export": ExportConfig, "eval": EvalConfig, "student": students.get(stage),
    }
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(OPS)}")
    if op == "student" and stage not in students:
        raise ValueError(f"unknown student stage {stage!r}; expected one of {sorted(students)}")
    return classes[op]


def finite(obj: Any) -> Any:
    """Metrics as strict JSON: non-finite floats become None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------- execute
def execute(
    req: StageRequest,
    *,
    progress: Progress = no_progress,
    logger: logging.Logger | logging.LoggerAdapter[Any] = log,
    check_existing: bool = True,
    commit: bool = True,
    fetch_lock: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    before_compute: Callable[[ArtifactStore, Path], AbstractContextManager[Any]] | None = None,
) -> ArtifactRef | None:
    """Produce ``req``'s artifact and return its ref (``None`` on a non-committing rank).

    ``check_existing``: return a valid existing manifest without computing. ``commit`` is false on torchrun ranks
    other than 0. ``fetch_lock`` serialises upstream downloads of processes sharing a cache directory;
    ``before_compute`` wraps the computation (the worker restores and uploads trainer checkpoints with it).
    """
    cls = config_class(req.op, req.stage)
    cfg = cls.model_validate(req.config) if cls is not None else None
    store = ArtifactStore.from_config(req.store)
    if check_existing and (ref := store.lookup(req.stage, req.key)) is not None:
        logger.info("%s: %s holds a valid manifest; nothing to do", req.stage, ref.uri)
        return ref
    if commit:
        store.invalidate(req.stage, req.key)  # a stale manifest must not survive a crash of the recomputation
    with fetch_lock():
        local = {name: store.fetch(ref) for name, ref in req.upstream.items()}
    work = store.work_dir(req.stage, req.key)
    logger.info("%s: computing into %s", req.stage, work)
    with before_compute(store, work) if before_compute else contextlib.nullcontext():
        metrics = OPS[req.op](cfg, OpContext(req, store, work, local, progress))
    if not commit:
        return None
    ref = store.commit(req.stage, req.key, work, config=req.config, upstream=req.upstream, metrics=finite(metrics),
                       code=req.code, producer={**req.producer, "host": socket.gethostname()})
    logger.info("%s: committed %s", req.stage, ref.uri)
    return ref
