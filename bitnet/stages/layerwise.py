"""Stage ``layerwise`` (BitDistill stage 1.9): align every decoder layer with the teacher's.

``target: hidden`` (BitDistill): every student hidden state against the teacher's, each model on its own inputs, so
one layer's error reaches the loss of every layer after it and the gradients run through the whole student.

``target: block`` (block reconstruction, EfficientQAT arXiv 2407.11062 / BRECQ): every student block is fitted to
what the teacher's block makes of the *student's own* input to that block, ``‖S_l(x_l) − T_l(x_l)‖`` with
``x_l`` the student's (detached) output of block ``l − 1``. The losses are local: block ``l``'s gradient comes from
its own term only, and the embeddings get none. All blocks are fitted at once, each step, on the activations that
step's student forward caches (no separate calibration pass): a block sees the inputs the (still training) blocks
before it actually produce, as in GPTQ's true-sequential calibration. Costs one student and one teacher forward a
step, like ``hidden``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bitnet.convert import decoder_layers
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
from bitnet.trainer import Batch, LossFn, TrainConfig, distributed_env


class LayerwiseConfig(BaseModel):
    """Hidden-state distillation at every layer (teacher frozen)."""

    model_config = ConfigDict(extra="forbid")

    loss: Literal["mse", "cosine"] = "mse"
    target: Literal["hidden", "block"] = Field(
        default="hidden", description="hidden: every hidden state against the teacher's (BitDistill); block: every "
        "block against the teacher's block on the student's own input, local losses (block reconstruction)")
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


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # transformers 5 layers return the tensor; older ones a tuple


def block_reconstruction_loss(teacher: nn.Module, kind: str) -> LossFn:
    """Block reconstruction (module docstring): a pre-hook on every student block detaches its input and runs the
    teacher's block on it with the same call (mask, position embeddings; no cache), a hook keeps the student block's
    output; the loss is :func:`hidden_state_loss` over the pairs."""
    t_layers = decoder_layers(teacher)

    def fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        s_layers = decoder_layers(model)
        outputs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []

        def pre(i: int) -> Callable[..., Any]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                if args:
                    args = (args[0].detach(), *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}
                call = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
                with torch.no_grad():
                    targets.append(_layer_output(t_layers[i](*args, **call)))
                return args, kwargs

            return hook

        def keep(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            outputs.append(_layer_output(out))

        handles = [h for i, layer in enumerate(s_layers)
                   for h in (layer.register_forward_pre_hook(pre(i), with_kwargs=True),
                             layer.register_forward_hook(keep))]
        try:
            out = lm_forward(model, batch["input_ids"], use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return hidden_state_loss(outputs, targets, kind=kind), {"ce": float(out.loss.detach())}

    return fn


def run(cfg: LayerwiseConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    if cfg.target == "block" and distributed_env()[1] > 1:
        raise ValueError("layerwise: target block runs in one process (its local losses leave the embeddings and the "
                         "head without gradients, which DDP and FSDP refuse); use target hidden under torchrun")
    proc = Proc.start(cfg.train)
    student, teacher, world = load_pair(inputs, proc, cfg.train)
    check_same_depth_and_width("layerwise", student, teacher)
    return train_student("layerwise", student, world, out, proc=proc, train=cfg.train, data=cfg.data,
                         loss_fn=LOSSES[cfg.target](teacher, cfg.loss), rebuild=lambda: fresh_student(inputs))


LOSSES: dict[str, Callable[[nn.Module, str], LossFn]] = {"hidden": layerwise_loss, "block": block_reconstruction_loss}

STAGE = Stage("layerwise", LayerwiseConfig, run, inputs=STUDENT_INPUTS,
              help="stage 1.9: layer-wise hidden-state distillation or block reconstruction")
