"""The pipeline config of flow ``bitdistill`` and its presets (no Prefect import here).

Field defaults are the ``tiny`` preset (offline: the Python-docs world, the tiny teacher, a few dozen steps per
student stage), so a partial config (a deployment's per-run parameters, a ``--config`` file) only names what
differs. ``qwen2.5-0.5b`` is the real-model preset: Qwen/Qwen2.5-0.5B teacher, FineWeb-Edu corpus and the
seed's token budgets (layer-wise ~100M, continued pre-training ~10B, LRC ~50M) as steps × batch × seq.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bitnet.convert import BitNetConfig
from bitnet.data import TextSource
from bitnet.stages import (
    ConvertStageConfig,
    CPTStageConfig,
    KDStageConfig,
    LayerwiseStageConfig,
    LRCStageConfig,
    StageData,
    TeacherStageConfig,
)
from bitnet.trainer import TrainConfig
from bitnet.world import WorldConfig
from tasks.artifacts import StoreConfig, local_root_uri
from tasks.compute import ComputeConfig
from tasks.execute import EvalConfig, ExportConfig
from tasks.tracking import TrackingConfig

C = TypeVar("C", bound=BaseModel)

STUDENT_STAGES = ("layerwise", "cpt", "kd", "lrc")
STAGES = ("world", "teacher", "convert", *STUDENT_STAGES, "export", "eval")


class Step(BaseModel, Generic[C]):
    """One stage of the pipeline: switch, retries and the stage's own config."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    retries: int = Field(default=0, ge=0, description="Prefect task retries of this stage")
    retry_delay_s: float = Field(default=10.0, ge=0)
    compute: ComputeConfig = Field(default_factory=ComputeConfig,
                                   description="where the stage runs: backend local | torchrun | skypilot")
    config: C


class TeacherStep(Step[TeacherStageConfig]):
    pretrained: str | None = Field(
        default=None,
        description="HF model id or local path used as the teacher; the tiny teacher is trained when unset",
    )


def _student_train(steps: int, **kw: Any) -> TrainConfig:
    defaults: dict[str, Any] = {"lr": 1e-3, "warmup_steps": max(1, steps // 10), "weight_decay": 0.0,
                                "ckpt_every": max(1, steps // 4), "eval_every": 0}
    return TrainConfig(max_steps=steps, **{**defaults, **kw})


_TINY_DATA = StageData(batch_size=8, eval_batch_size=16, eval_max_batches=8)


class PipelineConfig(BaseModel):
    """Everything one run of flow ``bitdistill`` needs; defaults are the ``tiny`` preset."""

    model_config = ConfigDict(extra="forbid")

    preset: str = "tiny"
    reuse_only: bool = Field(
        default=False, description="eval-only runs: training stages must already be finished (nothing is trained)"
    )
    store: StoreConfig = Field(default_factory=lambda: StoreConfig(root="runs/tiny/artifacts"))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    world: Step[WorldConfig] = Field(default_factory=lambda: Step[WorldConfig](config=WorldConfig()))
    teacher: TeacherStep = Field(default_factory=lambda: TeacherStep(config=TeacherStageConfig()))
    convert: Step[ConvertStageConfig] = Field(
        default_factory=lambda: Step[ConvertStageConfig](
            config=ConvertStageConfig(bitnet=BitNetConfig(subln="standard")))
    )
    layerwise: Step[LayerwiseStageConfig] = Field(default_factory=lambda: Step[LayerwiseStageConfig](
        config=LayerwiseStageConfig(train=_student_train(40), data=_TINY_DATA)))
    cpt: Step[CPTStageConfig] = Field(default_factory=lambda: Step[CPTStageConfig](
        config=CPTStageConfig(lambda_warmup_steps=20, train=_student_train(60), data=_TINY_DATA)))
    kd: Step[KDStageConfig] = Field(default_factory=lambda: Step[KDStageConfig](
        config=KDStageConfig(train=_student_train(40), data=_TINY_DATA)))
    lrc: Step[LRCStageConfig] = Field(default_factory=lambda: Step[LRCStageConfig](
        config=LRCStageConfig(rank=16, calib_batches=4, train=_student_train(30), data=_TINY_DATA)))
    export: Step[ExportConfig] = Field(default_factory=lambda: Step[ExportConfig](config=ExportConfig()))
    eval: Step[EvalConfig] = Field(default_factory=lambda: Step[EvalConfig](config=EvalConfig()))

    @model_validator(mode="before")
    @classmethod
    def _over_tiny_defaults(cls, data: Any) -> Any:
        """A partial mapping (e.g. ``{"kd": {"enabled": false}}``) fills what it omits from the tiny preset."""
        if not isinstance(data, dict):
            return data
        return deep_merge(_tiny_defaults(), data)

    @model_validator(mode="after")
    def _chain(self) -> PipelineConfig:
        students = [s for s in STUDENT_STAGES if getattr(self, s).enabled]
        if students and not self.convert.enabled:
            raise ValueError(f"stages {students} need the convert stage (convert.enabled is false)")
        if not self.teacher.pretrained and not self.world.enabled and (self.teacher.enabled or students):
            raise ValueError("training the tiny teacher needs the world stage (world.enabled is false)")
        if students and not self.world.enabled:
            raise ValueError(f"stages {students} need the world stage (world.enabled is false)")
        if (self.convert.enabled or students) and not self.teacher.enabled:
            raise ValueError("the student stages need a teacher (teacher.enabled is false)")
        remote = [name for name in STAGES if getattr(self, name).enabled and getattr(self, name).compute.remote]
        if remote and not self.store.root.startswith(("s3://", "gs://")):
            raise ValueError(f"stages {remote} run on a remote backend and need an s3:// or gs:// store.root "
                             f"(got {self.store.root})")
        return self

    def resolved(self) -> PipelineConfig:
        """A copy whose artifact root is absolute (a ``file://`` URI for local paths)."""
        store = self.store.model_copy(update={"root": local_root_uri(self.store.root)})
        return self.model_copy(update={"store": store})


# ------------------------------------------------------------------------------------------------ presets
def steps_for(tokens: float, batch_size: int, grad_accum: int, seq_len: int, processes: int = 1) -> int:
    """Optimizer steps that consume ``tokens`` at batch × accumulation × sequence length × processes per step."""
    return math.ceil(tokens / (batch_size * grad_accum * seq_len * processes))


def tiny() -> PipelineConfig:
    return PipelineConfig()


QWEN = "Qwen/Qwen2.5-0.5B"
_SEQ, _BATCH, _ACCUM = 2048, 8, 4  # 65,536 tokens per optimizer step and process


def _real_step(cls: type[C], tokens: float, **kw: Any) -> Step[C]:
    steps = steps_for(tokens, _BATCH, _ACCUM, _SEQ)
    train = TrainConfig(max_steps=steps, lr=kw.pop("lr", 1e-4), warmup_steps=min(1000, steps // 20), weight_decay=0.0,
                        grad_accum=_ACCUM, precision="bf16", ckpt_every=200, eval_every=1000, progress=True)
    data = StageData(batch_size=_BATCH, eval_batch_size=_BATCH, eval_max_batches=64)
    return Step[cls](config=cls(train=train, data=data, **kw), retries=2, retry_delay_s=60)  # type: ignore[index]


def qwen25_05b() -> PipelineConfig:
    """Qwen2.5-0.5B → ternary student on FineWeb-Edu; budgets: layer-wise 100M, CPT 10B, KD 100M, LRC 50M tokens."""
    world = WorldConfig(
        source=TextSource(kind="hf", name="HuggingFaceFW/fineweb-edu", config_name="sample-10BT", split="train",
                          streaming=True),
        clean_rst=False,
        split_fractions=(0.998, 0.001, 0.001),
        tokenizer=QWEN,
        seq_len=_SEQ,
    )
    return PipelineConfig(
        preset="qwen2.5-0.5b",
        store=StoreConfig(root="runs/qwen2.5-0.5b/artifacts"),
        world=Step[WorldConfig](config=world, retries=2, retry_delay_s=60),
        teacher=TeacherStep(config=TeacherStageConfig(), pretrained=QWEN),
        convert=Step[ConvertStageConfig](config=ConvertStageConfig(bitnet=BitNetConfig(subln="standard"))),
        layerwise=_real_step(LayerwiseStageConfig, 100e6, lr=1e-4),
        cpt=_real_step(CPTStageConfig, 10e9, lr=1e-4, lambda_warmup_steps=1000),
        kd=_real_step(KDStageConfig, 100e6, lr=5e-5),
        lrc=_real_step(LRCStageConfig, 50e6, lr=1e-4, rank=64, calib_batches=32),
    )


PRESETS = {"tiny": tiny, "qwen2.5-0.5b": qwen25_05b}


def preset(name: str) -> PipelineConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, recursively; a mapping with a different ``kind`` replaces the base one."""
    out = dict(base)
    for k, v in over.items():
        b = out.get(k)
        same_kind = isinstance(v, dict) and isinstance(b, dict) and v.get("kind", b.get("kind")) == b.get("kind")
        out[k] = deep_merge(b, v) if same_kind else v  # type: ignore[arg-type]
    return out


@functools.cache
def _tiny_defaults_cached() -> str:
    fields = PipelineConfig.model_fields
    return json.dumps({name: f.default_factory().model_dump(mode="json")  # type: ignore[call-arg, misc]
                       for name, f in fields.items() if f.default_factory is not None})


def _tiny_defaults() -> dict[str, Any]:
    return json.loads(_tiny_defaults_cached())
