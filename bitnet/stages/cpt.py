"""Stage ``cpt`` (BitDistill stage 2): continued pre-training (QAT, CE) with the gradual quantization warm-up
``w + λ·(q(w) − w).detach()``, λ: 0 → 1."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bitnet.layers import set_quant_lambda
from bitnet.stages.base import Inputs, Stage
from bitnet.stages.distill import STUDENT_INPUTS, fresh_student, load_pair, train_student
from bitnet.stages.training import Proc, StageData, schedule
from bitnet.trainer import Callback, TrainConfig, causal_lm_loss


class CPTConfig(BaseModel):
    """Continued pre-training with the gradual quantization warm-up."""

    model_config = ConfigDict(extra="forbid")

    lambda_warmup_steps: int = Field(default=20, ge=0, description="steps over which λ ramps 0 → 1; 0 = no warm-up")
    lambda_schedule: Literal["linear", "cosine"] = "linear"
    train: TrainConfig = Field(default_factory=lambda: schedule(60))
    data: StageData = Field(default_factory=StageData)


def quant_lambda_at(step: int, warmup: int, schedule: str) -> float:
    """λ of the gradual quantization warm-up at ``step`` (0 → 1 over ``warmup`` steps)."""
    if warmup <= 0 or step >= warmup:
        return 1.0
    x = step / warmup
    return x if schedule == "linear" else 0.5 * (1 - math.cos(math.pi * x))


def lambda_warmup_callback(cfg: CPTConfig) -> Callback:
    def cb(step: int, model: nn.Module) -> dict[str, float]:
        lam = quant_lambda_at(step, cfg.lambda_warmup_steps, cfg.lambda_schedule)
        set_quant_lambda(model, lam)
        return {"lambda": lam}

    return cb


def run(cfg: CPTConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    proc = Proc.start(cfg.train)
    student, _, world = load_pair(inputs, proc, cfg.train)
    return train_student("cpt", student, world, out, proc=proc, train=cfg.train, data=cfg.data,
                         loss_fn=causal_lm_loss, callbacks=[lambda_warmup_callback(cfg)],
                         rebuild=lambda: fresh_student(inputs))


STAGE = Stage("cpt", CPTConfig, run, inputs=STUDENT_INPUTS,
              help="stage 2: continued pre-training with the λ quantization warm-up")
