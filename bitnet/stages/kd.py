"""Stage ``kd`` (BitDistill stage 3): CE + β·τ²·KL(p_T^τ ‖ p_S^τ) + γ·attention-relation loss (``bitdistill``),
or CE + β·τ²·top-k KL (``tcs``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from bitnet.attention import capture_qkv
from bitnet.objectives import attention_relation_loss, logits_kd_loss, topk_kd_loss
from bitnet.stages.base import Inputs, Stage
from bitnet.stages.distill import STUDENT_INPUTS, fresh_student, lm_forward, load_pair, train_student, unwrap
from bitnet.stages.training import Proc, StageData, schedule
from bitnet.trainer import Batch, LossFn, TrainConfig


class KDConfig(BaseModel):
    """Knowledge distillation (BitDistill or TCS objective)."""

    model_config = ConfigDict(extra="forbid")

    objective: Literal["bitdistill", "tcs"] = "bitdistill"
    temperature: float = Field(default=5.0, gt=0)
    beta: float = Field(default=10.0, ge=0, description="weight of τ²·KL(p_T ‖ p_S)")
    gamma: float = Field(default=1e5, ge=0, description="weight of the attention-relation loss")
    ce_weight: float = Field(default=1.0, ge=0)
    ad_layers: list[int] = Field(default_factory=lambda: [-1], description="layers for attention relations")
    split_heads: int = Field(default=32, ge=1)
    tcs_k: int = Field(default=100, ge=1)
    train: TrainConfig = Field(default_factory=lambda: schedule(40))
    data: StageData = Field(default_factory=StageData)

    @model_validator(mode="after")
    def _check(self) -> KDConfig:
        if self.objective == "bitdistill" and self.gamma > 0 and not self.ad_layers:
            raise ValueError("gamma > 0 needs at least one layer in ad_layers (or set gamma: 0)")
        return self

    @property
    def uses_attention(self) -> bool:
        return self.objective == "bitdistill" and self.gamma > 0


def check_attention_layers(cfg: KDConfig, student: nn.Module, teacher: nn.Module) -> None:
    """``ad_layers`` exist in both models and ``split_heads`` divides their merged q/k/v widths."""
    if not cfg.uses_attention:
        return
    for who, c in (("student", student.config), ("teacher", teacher.config)):
        n = c.num_hidden_layers
        if bad := [i for i in cfg.ad_layers if not -n <= i < n]:
            raise ValueError(f"kd: ad_layers {bad} out of range for the {who} ({n} layers)")
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        for heads in (c.num_attention_heads, c.num_key_value_heads):
            if (heads * head_dim) % cfg.split_heads:
                raise ValueError(f"kd: split_heads ({cfg.split_heads}) does not divide the {who}'s merged q/k/v "
                                 f"width {heads}*{head_dim}")


def kd_loss(teacher: nn.Module, cfg: KDConfig) -> LossFn:
    tau = cfg.temperature
    layers = cfg.ad_layers if cfg.uses_attention else []

    def fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        ids = batch["input_ids"]
        with torch.no_grad(), capture_qkv(teacher, layers) as t_qkv:
            t_logits = teacher(input_ids=ids).logits
        with capture_qkv(unwrap(model), layers) as s_qkv:
            out = lm_forward(model, ids)
        metrics = {"ce": float(out.loss.detach())}
        loss = cfg.ce_weight * out.loss
        if cfg.objective == "bitdistill":
            kl = logits_kd_loss(out.logits, t_logits, tau)
            metrics["kl"] = float(kl.detach())
        else:
            kl = topk_kd_loss(out.logits, t_logits, cfg.tcs_k, tau)
            metrics["topk_kl"] = float(kl.detach())
        loss = loss + cfg.beta * tau * tau * kl
        if layers:
            ad = sum(attention_relation_loss(s_qkv[i], t_qkv[i], cfg.split_heads) for i in layers) / len(layers)
            loss = loss + cfg.gamma * ad
            metrics["ad"] = float(ad.detach())
        return loss, metrics

    return fn


def run(cfg: KDConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    proc = Proc.start(cfg.train)
    student, teacher, world = load_pair(inputs, proc, cfg.train)
    check_attention_layers(cfg, student, teacher)
    return train_student("kd", student, world, out, proc=proc, train=cfg.train, data=cfg.data,
                         loss_fn=kd_loss(teacher, cfg), rebuild=lambda: fresh_student(inputs))


STAGE = Stage("kd", KDConfig, run, inputs=STUDENT_INPUTS,
              help="stage 3: knowledge distillation (logits + attention relations, or TCS)")
