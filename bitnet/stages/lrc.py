"""Stage ``lrc``: low-rank correction y = BitLinear(x) + U·(Vᵀ·x); closed-form init from calibration activations
(LRC, arXiv 2412.07902), then only U, V are trained against the teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bitnet.convert import add_lrc
from bitnet.data import iter_eval_batches
from bitnet.layers import bit_linears
from bitnet.lrc import calibrate_lrc
from bitnet.objectives import hidden_state_loss, logits_kd_loss
from bitnet.stages.base import Inputs, Stage
from bitnet.stages.distill import (
    STUDENT_INPUTS,
    check_same_depth_and_width,
    fresh_student,
    lm_forward,
    load_pair,
    train_student,
)
from bitnet.stages.training import Proc, StageData, schedule, stage_train_data
from bitnet.trainer import Batch, LossFn, TrainConfig


class LRCConfig(BaseModel):
    """Low-rank correction: closed-form init, then only U, V trained against the teacher."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(default=16, ge=1)
    init: Literal["auto", "closed_form", "svd", "zero"] = Field(
        default="auto",
        description="closed_form: reduced-rank fit on calibration activations (LRC paper); svd: truncated SVD of "
        "W − Wq; zero: U = 0 (the adapter starts as a no-op and is only trained); auto: closed_form on a freshly "
        "converted student (latent weights = the teacher's: the paper's PTQ setting), zero after QAT, where the "
        "closed form pulls single layers away from the co-adapted network (docs/ablation.md)",
    )
    reference: Literal["teacher", "latent"] = Field(
        default="teacher",
        description="W the init corrects towards: the teacher's layer (right after convert, the PTQ setting of the "
        "paper) or the student's own full-precision latent weight",
    )
    calib_batches: int = Field(default=4, ge=1)
    loss: Literal["logits", "hidden", "both"] = "logits"
    temperature: float = Field(default=1.0, gt=0)
    train: TrainConfig = Field(default_factory=lambda: schedule(30))
    data: StageData = Field(default_factory=StageData)


def lrc_loss(teacher: nn.Module, cfg: LRCConfig) -> LossFn:
    want_hidden = cfg.loss in ("hidden", "both")

    def fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        ids = batch["input_ids"]
        with torch.no_grad():
            t_out = teacher(input_ids=ids, output_hidden_states=want_hidden)
        out = lm_forward(model, ids, output_hidden_states=want_hidden)
        loss = out.logits.new_zeros(())
        metrics = {"ce": float(out.loss.detach())}
        if cfg.loss in ("logits", "both"):
            kl = logits_kd_loss(out.logits, t_out.logits, cfg.temperature)
            loss = loss + kl
            metrics["kl"] = float(kl.detach())
        if want_hidden:
            h = hidden_state_loss(out.hidden_states[1:], t_out.hidden_states[1:])
            loss = loss + h
            metrics["hidden"] = float(h.detach())
        return loss, metrics

    return fn


def freshly_converted(student: nn.Module, teacher: nn.Module) -> bool:
    """True when every BitLinear's latent weight still equals the teacher's linear at the same path."""
    modules = dict(teacher.named_modules())
    for name, layer in bit_linears(student):
        ref = modules.get(name)
        if not isinstance(ref, nn.Linear) or ref.weight.shape != layer.weight.shape:
            return False
        if not torch.equal(ref.weight.to(layer.weight.device, layer.weight.dtype), layer.weight):
            return False
    return True


def check_rank(cfg: LRCConfig, student: nn.Module) -> None:
    for name, layer in bit_linears(student):
        limit = min(layer.in_features, layer.out_features)
        if cfg.rank >= limit:
            raise ValueError(f"lrc: rank {cfg.rank} must be < min(in, out) = {limit} of {name}")


def run(cfg: LRCConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    proc = Proc.start(cfg.train)
    student, teacher, world = load_pair(inputs, proc, cfg.train)
    if cfg.loss != "logits":
        check_same_depth_and_width("lrc", student, teacher)
    check_rank(cfg, student)
    init = cfg.init
    if init == "auto":
        init = "closed_form" if freshly_converted(student, teacher) else "zero"
    extra: dict[str, Any] = {"lrc_init": init}
    if not (out / "train" / "checkpoints").is_dir() and init != "zero":
        calib = iter_eval_batches(stage_train_data(cfg.data, world), cfg.data.batch_size, cfg.calib_batches)
        reference = teacher if cfg.reference == "teacher" else None
        improvement = calibrate_lrc(student, reference, calib, cfg.rank, init)
        extra["lrc_init_improvement"] = sum(improvement.values()) / len(improvement)
    else:  # resuming (the checkpoint holds the adapters) or a zero init: only the module tree is needed
        add_lrc(student, cfg.rank, seed=cfg.train.seed)
    for name, p in student.named_parameters():
        p.requires_grad_(name.endswith(("lrc_u", "lrc_v")))
    return train_student("lrc", student, world, out, proc=proc, train=cfg.train, data=cfg.data,
                         loss_fn=lrc_loss(teacher, cfg), extra=extra,
                         rebuild=lambda: fresh_student(inputs, cfg.rank))


STAGE = Stage("lrc", LRCConfig, run, inputs=STUDENT_INPUTS,
              help="low-rank correction: closed-form init, then train only U, V")
