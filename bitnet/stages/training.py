"""The one training skeleton every training stage runs (teacher, layer-wise, CPT, KD, LRC).

process group → data (the world's splits, or a selection) → :class:`~bitnet.trainer.Trainer` (checkpoints and
resume under ``out/train``) → rank 0 evaluates and saves → barrier. A stage supplies only its model, loss,
callbacks and how it saves.
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bitnet.data import BlockLoader, PackedDataset, iter_eval_batches
from bitnet.evaluate import perplexity
from bitnet.stages.outputs import run_identity
from bitnet.trainer import (
    Callback,
    LossFn,
    TrainConfig,
    Trainer,
    causal_lm_loss,
    distributed_env,
    init_distributed,
    validate_parallel,
)
from bitnet.world import World


def schedule(steps: int, **kw: Any) -> TrainConfig:
    """The default optimisation of a stage that trains ``steps`` optimizer steps (tiny-preset values):
    10 % linear warm-up, four checkpoints, no weight decay, validation at the end only."""
    defaults: dict[str, Any] = {"lr": 1e-3, "warmup_steps": max(1, steps // 10), "weight_decay": 0.0,
                                "ckpt_every": max(1, steps // 4), "eval_every": 0}
    return TrainConfig(max_steps=steps, **{**defaults, **kw})


class StageData(BaseModel):
    """Batching of a training stage over a world's packed splits."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=8, ge=1, description="blocks per micro-batch per process")
    eval_batch_size: int = Field(default=16, ge=1)
    eval_max_batches: int | None = Field(default=8, ge=1, description="cap on held-out batches: the validation "
                                         "during training and the perplexities after it (None: the whole split)")
    train_data: str | None = Field(
        default=None,
        description="a packed dataset to train on instead of the world's train split "
        "(e.g. an influence selection from `bitdistill select`); same tokenizer as the world",
    )


def stage_train_data(data: StageData, world: World) -> PackedDataset:
    """The packed dataset a stage trains on: ``data.train_data`` or the world's train split."""
    train = world.dataset("train")
    if data.train_data is None:
        return train
    chosen = PackedDataset(data.train_data)
    if chosen.meta.get("tokenizer_digest") != train.meta.get("tokenizer_digest"):
        raise ValueError(f"train_data {data.train_data} was tokenized with another tokenizer than the world's")
    if chosen.seq_len != train.seq_len:
        raise ValueError(f"train_data {data.train_data} has seq_len {chosen.seq_len}, the world {train.seq_len}")
    return chosen


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class Proc:
    """This process's place in the job: rank, world size (number of processes) and device."""

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def start(cls, train: TrainConfig | None = None) -> Proc:
        """Join the torchrun process group when there is one; a single process otherwise. With ``train``, refuse
        a parallel layout this job cannot run (FSDP on one process) before any work."""
        if train is not None:
            validate_parallel(train, distributed_env()[1])
        if distributed_env()[1] > 1:
            return cls(*init_distributed())
        return cls(0, 1, default_device())

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def held_out_perplexity(model: nn.Module, world: World, split: str, data: StageData) -> float:
    return perplexity(model, iter_eval_batches(world.dataset(split), data.eval_batch_size, data.eval_max_batches))


def train_and_save(
    model: nn.Module,
    *,
    proc: Proc,
    train: TrainConfig,
    data: StageData,
    world: World,
    out: Path,
    save: Callable[[nn.Module, dict[str, Any]], None],
    loss_fn: LossFn = causal_lm_loss,
    callbacks: Iterable[Callback] = (),
    desc: str = "",
    rebuild: Callable[[], nn.Module] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (resuming from ``out/train``), then on rank 0 call ``save(model, metrics)``, which may add
    metrics and writes the model; every rank waits for it and returns the metrics.

    Under FSDP the trained weights are gathered (every rank takes part) into ``rebuild()``, a fresh unsharded
    module of the same structure, which rank 0 evaluates and saves: the artifact is consolidated."""
    val = world.dataset("validation")
    loader = BlockLoader(stage_train_data(data, world), data.batch_size, seed=train.seed, rank=proc.rank,
                         world_size=proc.world_size)
    trainer = Trainer(model, loader, train, out / "train", loss_fn=loss_fn,
                      val_batches=lambda: iter_eval_batches(val, data.eval_batch_size, data.eval_max_batches),
                      callbacks=list(callbacks),
                      device=proc.device, desc=desc, identity=run_identity(out))
    result = trainer.fit()
    metrics: dict[str, Any] = {"steps": result.steps, "tokens": result.tokens, "train_loss": result.train_loss,
                               "val_loss": result.val_loss, "wall_s": result.wall_s,
                               "tokens_per_s": result.tokens_this_run / result.wall_s if result.wall_s > 0 else None,
                               "peak_rss_gb": peak_rss_gb(), "resumed_from": result.resumed_from}
    if torch.cuda.is_available():
        metrics["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if train.parallel == "fsdp":
        state = trainer.full_state_dict()  # a collective: every rank
        if proc.rank == 0:
            if rebuild is None:
                raise ValueError(f"{desc}: this stage cannot consolidate an FSDP-trained model (no rebuild)")
            model = rebuild()
            model.load_state_dict(state)
    if proc.rank == 0:
        model.eval()
        save(model, metrics)
    proc.barrier()
    return metrics
