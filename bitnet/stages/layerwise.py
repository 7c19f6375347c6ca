"""Stage ``layerwise`` (BitDistill stage 1.9): align every decoder layer with the teacher's.

``target: hidden`` (BitDistill): every student hidden state against the teacher's, each model on its own inputs, so
one layer's error reaches the loss of every layer after it and the gradients run through the whole student.

``target: block`` (block reconstruction, EfficientQAT arXiv 2407.11062 / BRECQ): every student block is fitted to
what the teacher's block makes of the *student's own* input to that block, ``‖S_l(x_l) − T_l(x_l)‖`` with
``x_l`` the student's (detached) output of block ``l − 1``. The losses are local: block ``l``'s gradient comes from
its own term only, and the embeddings get none. All blocks are fitted at once, each step, on the activations that
step's student forward caches (no separate calibration pass): a block sees the inputs the (still training) blocks
before it actually produce, as in GPTQ's true-sequential calibration. Costs one student and one teacher forward a
step, like ``hidden``.

``target: block_sequential`` (EfficientQAT's Block-AP): the same local loss, block after block from cached
activations (:mod:`bitnet.blockwise`): ``train.max_steps`` steps per block on a pool of ``pool_blocks`` training
blocks (default ``max_steps × batch_size``: every block sees each pooled row once, as many rows as a
``max_steps``-step stage shows every block, at about 1/L of its compute), its own warm-up and cosine per block.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from tqdm.auto import tqdm

from bitnet.blockwise import fit_blocks, layer_output
from bitnet.checkpoints import CKPT_DIR
from bitnet.convert import decoder_layers
from bitnet.data import BlockLoader
from bitnet.objectives import hidden_state_loss
from bitnet.stages.base import Inputs, Stage
from bitnet.stages.distill import (
    STUDENT_INPUTS,
    check_same_depth_and_width,
    fresh_student,
    lm_forward,
    load_pair,
    save_trained_student,
    train_student,
)
from bitnet.stages.outputs import run_identity
from bitnet.stages.training import Proc, StageData, peak_rss_gb, schedule, stage_train_data
from bitnet.trainer import Batch, LossFn, TrainConfig, distributed_env
from bitnet.world import World


class LayerwiseConfig(BaseModel):
    """Hidden-state distillation at every layer (teacher frozen)."""

    model_config = ConfigDict(extra="forbid")

    loss: Literal["mse", "cosine"] = "mse"
    target: Literal["hidden", "block", "block_sequential"] = Field(
        default="hidden", description="hidden: every hidden state against the teacher's (BitDistill); block: every "
        "block against the teacher's block on the student's own input, local losses (block reconstruction); "
        "block_sequential: the same, one block after another from cached activations, max_steps steps each")
    pool_blocks: int | None = Field(
        default=None, ge=1, description="block_sequential: training blocks whose activations are cached (default "
        "max_steps × batch_size: one pass per block); a multiple of data.batch_size")
    train: TrainConfig = Field(default_factory=lambda: schedule(40))
    data: StageData = Field(default_factory=StageData)

    @model_validator(mode="after")
    def _check_sequential(self) -> LayerwiseConfig:
        if self.target != "block_sequential":
            if self.pool_blocks is not None:
                raise ValueError("pool_blocks applies to target block_sequential only")
            return self
        if self.pool_blocks is not None and self.pool_blocks % self.data.batch_size:
            raise ValueError(f"pool_blocks {self.pool_blocks} is not a multiple of data.batch_size "
                             f"{self.data.batch_size}")
        if self.train.total_schedule_steps != self.train.max_steps:
            raise ValueError("target block_sequential warms up and decays once per block: a schedule shared "
                             "across stages (schedule_start/schedule_steps) does not apply")
        return self

    @property
    def pool_size(self) -> int:
        return self.pool_blocks or self.train.max_steps * self.data.batch_size


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
                    targets.append(layer_output(t_layers[i](*args, **call)))
                return args, kwargs

            return hook

        def keep(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            outputs.append(layer_output(out))

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
    if cfg.target != "hidden" and distributed_env()[1] > 1:
        raise ValueError(f"layerwise: target {cfg.target} runs in one process (its local losses leave the embeddings "
                         "and the head without gradients, which DDP and FSDP refuse); use target hidden under torchrun")
    proc = Proc.start(cfg.train)
    student, teacher, world = load_pair(inputs, proc, cfg.train)
    check_same_depth_and_width("layerwise", student, teacher)
    if cfg.target == "block_sequential":
        return run_sequential(cfg, student, teacher, world, out)
    return train_student("layerwise", student, world, out, proc=proc, train=cfg.train, data=cfg.data,
                         loss_fn=LOSSES[cfg.target](teacher, cfg.loss), rebuild=lambda: fresh_student(inputs))


def run_sequential(cfg: LayerwiseConfig, student: nn.Module, teacher: nn.Module, world: World, out: Path
                   ) -> dict[str, Any]:
    """Block by block (:func:`bitnet.blockwise.fit_blocks`) on the first ``pool_size`` blocks of the stage's train
    data in its seeded order; ``train/metrics.jsonl`` gets a record per finished block (the stage's progress)."""
    loader = BlockLoader(stage_train_data(cfg.data, world), cfg.data.batch_size, seed=cfg.train.seed)
    ids = torch.cat([next(loader)["input_ids"] for _ in range(cfg.pool_size // cfg.data.batch_size)])
    n_blocks, seq = len(decoder_layers(student)), ids.shape[1]
    per_block = cfg.train.max_steps * cfg.data.batch_size * seq  # tokens through every block
    progress = out / "train" / "metrics.jsonl"
    progress.parent.mkdir(parents=True, exist_ok=True)
    progress.write_text("")
    start = time.perf_counter()
    bar = tqdm(total=n_blocks, desc="layerwise (block by block)", disable=not cfg.train.progress, dynamic_ncols=True)

    def on_block(i: int, block: dict[str, float]) -> None:
        record = {"step": (i + 1) * cfg.train.max_steps // n_blocks, "loss": block["train_loss"], "block": i,
                  "pool_loss_before": block["pool_loss_before"], "pool_loss_after": block["pool_loss_after"],
                  "tokens": (i + 1) * per_block // n_blocks}
        with progress.open("a") as f:
            f.write(json.dumps(record) + "\n")
        bar.set_postfix(pool_loss=f"{block['pool_loss_before']:.4f}→{block['pool_loss_after']:.4f}", refresh=False)
        bar.update(1)

    fit = fit_blocks(student, teacher, ids, train=cfg.train.model_copy(update={"progress": False}),
                     batch_size=cfg.data.batch_size, work=out / "train" / CKPT_DIR / "blocks", kind=cfg.loss,
                     identity=run_identity(out), on_block=on_block)
    bar.close()
    wall = time.perf_counter() - start
    metrics: dict[str, Any] = {
        "stage": "layerwise", "steps": cfg.train.max_steps, "tokens": per_block, "block_steps": fit.block_steps,
        "pool_blocks": len(ids), "blocks_resumed": fit.blocks_loaded,
        **{k: sum(b[k] for b in fit.blocks) / n_blocks for k in ("train_loss", "pool_loss_before", "pool_loss_after")},
        "val_loss": None, "wall_s": wall, "peak_rss_gb": peak_rss_gb(),
        "tokens_per_s": fit.block_steps * cfg.data.batch_size * seq / n_blocks / wall if wall > 0 else None}
    student.eval()
    save_trained_student(student, metrics, world=world, data=cfg.data, out=out)
    return metrics


LOSSES: dict[str, Callable[[nn.Module, str], LossFn]] = {"hidden": layerwise_loss, "block": block_reconstruction_loss}

STAGE = Stage("layerwise", LayerwiseConfig, run, inputs=STUDENT_INPUTS,
              help="stage 1.9: layer-wise hidden-state distillation or block reconstruction")
