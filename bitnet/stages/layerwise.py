"""Stage ``layerwise`` (BitDistill stage 1.9): align every decoder layer's hidden states with the teacher's."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bitnet.objectives import hidden_state_loss
from bitnet.stages.base import Inputs, Stage
from bitnet.stages.distill import (
    STUDENT_INPUTS,
    check_same_depth_and_width,
    fresh_student,
    lm_forward,
    load_pair,
    train_student,
)
from bitnet.stages.training import Proc, StageData, schedule
from bitnet.trainer import Batch, LossFn, TrainConfig


class LayerwiseConfig(BaseModel):
    """Hidden-state distillation at every layer (teacher frozen)."""

    model_config = ConfigDict(extra="forbid")

    loss: Literal["mse", "cosine"] = "mse"
    train: TrainConfig = Field(default_factory=lambda: schedule(40))
    data: StageData = Field(default_factory=StageData)


def layerwise_loss(teacher: nn.Module, kind: str) -> LossFn:
    def fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        ids = batch["input_ids"]
        with torch.no_grad():
            t_hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        out = lm_forward(model, ids, output_hidden_states=True)
        # hidden_states[0] is the (shared, full-precision) embedding output: align the decoder layers only
        loss = hidden_state_loss(out.hidden_states[1:], t_hidden[1:], kind=kind)
        return loss, {"ce": float(out.loss.detach())}

    return fn


def run(cfg: LayerwiseConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    proc = Proc.start(cfg.train)
    student, teacher, world = load_pair(inputs, proc, cfg.train)
    check_same_depth_and_width("layerwise", student, teacher)
    return train_student("layerwise", student, world, out, proc=proc, train=cfg.train, data=cfg.data,
                         loss_fn=layerwise_loss(teacher, cfg.loss), rebuild=lambda: fresh_student(inputs))


STAGE = Stage("layerwise", LayerwiseConfig, run, inputs=STUDENT_INPUTS,
              help="stage 1.9: layer-wise hidden-state distillation")
