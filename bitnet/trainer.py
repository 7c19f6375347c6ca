"""The one training loop every stage uses.

AdamW, linear warm-up (clamped to the step budget) + cosine decay, gradient accumulation, gradient clipping, a
non-finite guard, bf16 autocast where the device has it, tqdm progress (loss, tokens/s), periodic validation,
and, when started under ``torchrun``, DDP (``parallel: ddp``) or FSDP2 (``parallel: fsdp``, parameters, gradients
and optimizer states sharded per decoder block; see :mod:`bitnet.parallel`), with optional activation
checkpointing per decoder block.

Checkpoints every N steps hold model, optimizer, scheduler, RNG and data position and resume exactly
(:mod:`bitnet.checkpoints`, the :class:`~bitnet.checkpoints.Checkpoints` half of :class:`Trainer`).

A stage supplies the model, a loss function ``loss_fn(model, batch) -> (loss, metrics)`` and the data;
callbacks run before every optimizer step (e.g. the λ warm-up schedule of continued pre-training).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from bitnet.checkpoints import Checkpoints, ResumableLoader
from bitnet.parallel import (
    ParallelConfigError,
    apply_activation_checkpointing,
    require_fsdp_world,
    shard_model,
)
from bitnet.student import CheckpointError

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]
Callback = Callable[[int, nn.Module], dict[str, float] | None]


log = logging.getLogger("bitnet.trainer")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss or gradient, or would start from non-finite weights."""


class TrainConfig(BaseModel):
    """Optimisation and bookkeeping of one training run (a stage's ``train`` section)."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(gt=0, description="optimizer steps")
    lr: float = Field(default=3e-4, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="final lr of the cosine, as a fraction of lr")
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up; clamped to max_steps")
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_accum: int = Field(default=1, ge=1)
    clip_grad: float | None = Field(default=1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    parallel: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="ddp: the model replicated on every process; fsdp: FSDP2, parameters, gradients and optimizer "
        "states sharded per decoder block (needs >= 2 processes)",
    )
    cpu_offload: bool = Field(default=False, description="fsdp only: keep parameters, gradients and optimizer on CPU")
    activation_checkpointing: bool = Field(default=False, description="recompute each decoder block in backward")
    teacher_placement: Literal["auto", "replicate", "shard"] = Field(
        default="auto", description="the frozen teacher of a distillation stage: replicated, sharded, or by size"
    )
    eval_every: int = Field(default=0, ge=0, description="validate every N steps; 0 = only at the end")
    ckpt_every: int = Field(default=0, ge=0, description="checkpoint every N steps; 0 = never")
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=10, ge=1)
    seed: int = 0
    progress: bool = True
    schedule_start: int = Field(
        default=0, ge=0, description="steps of a schedule shared across stages taken by earlier stages (0: own)")
    schedule_steps: int | None = Field(
        default=None, gt=0, description="length of that shared schedule (None: this stage's max_steps)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.cpu_offload and self.parallel != "fsdp":
            raise ValueError("cpu_offload needs parallel: fsdp")
        if self.schedule_start + self.max_steps > self.total_schedule_steps:
            raise ValueError(f"schedule_start {self.schedule_start} + max_steps {self.max_steps} exceeds "
                             f"schedule_steps {self.schedule_steps}")
        return self

    @property
    def total_schedule_steps(self) -> int:
        """The length of the LR schedule this stage is a window of (its own ``max_steps`` unless shared)."""
        return self.schedule_steps if self.schedule_steps is not None else self.max_steps

    @property
    def effective_warmup(self) -> int:
        """``warmup_steps`` clamped to the schedule (a 2-step run with a 15-step default warm-up is valid)."""
        return min(self.warmup_steps, self.total_schedule_steps)


def share_schedule(trains: list[TrainConfig]) -> list[TrainConfig]:
    """Consecutive stages' train sections as windows of one LR schedule: the first one's warm-up, the sum of their
    steps, each stage starting where the previous one stopped (so a split budget warms up once and decays once)."""
    total, start = sum(t.max_steps for t in trains), 0
    warmup = trains[0].warmup_steps if trains else 0
    shared = []
    for t in trains:
        shared.append(t.model_copy(update={"schedule_start": start, "schedule_steps": total, "warmup_steps": warmup}))
        start += t.max_steps
    return shared


def validate_parallel(cfg: TrainConfig, n_processes: int) -> None:
    """One-line refusal of a layout that cannot run, before any work (FSDP with one process)."""
    require_fsdp_world(cfg.parallel, n_processes)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    train_loss: float
    val_loss: float | None
    resumed_from: int | None
    wall_s: float  # of this attempt
    tokens_this_run: int = 0  # trained by this attempt (``tokens`` counts the resumed ones too): tokens/s
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_checkpoints: list[str] = field(default_factory=list)


def causal_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy of a HF causal LM on packed blocks (labels = inputs, shifted inside)."""
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    return out.loss, {}


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """The LR multiplier at a stage's step: linear warm-up then cosine decay to ``min_lr_ratio``, over the stage's
    own steps, or over a schedule shared by consecutive stages (``schedule_start``/``schedule_steps``: the stage
    takes steps ``[start, start + max_steps)`` of it, so a budget split into stages warms up once and decays once)."""
    warmup, total, start = cfg.effective_warmup, cfg.total_schedule_steps, cfg.schedule_start

    def fn(step: int) -> float:
        step += start
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def autocast_context(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    ):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0"))


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); returns (rank, world_size, device)."""
    rank, world_size, local_rank = distributed_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups: matrices decay; biases, norms and learned quantizer scales do not (decay would pull
    a scale towards 0, and its whole group of weights with it)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and not n.endswith("weight_scales")]
    no_decay = [p for n, p in params if p.ndim < 2 or n.endswith("weight_scales")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer(Checkpoints):
    """Runs ``cfg.max_steps`` optimizer steps of ``loss_fn`` over ``train_loader``.

    ``identity`` (e.g. ``{"student": digest, "config": digest}``) is written into every checkpoint; a resume from
    checkpoints of another identity is refused. Under ``parallel: fsdp`` the model is sharded in place: after
    :meth:`fit`, :meth:`full_state_dict` (called on every rank) gives rank 0 the whole state for saving.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: ResumableLoader,
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        loss_fn: LossFn = causal_lm_loss,
        val_batches: Callable[[], Iterable[Batch]] | None = None,
        eval_fn: LossFn = causal_lm_loss,
        callbacks: Iterable[Callback] = (),
        device: torch.device | None = None,
        desc: str = "train",
        identity: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.val_batches = val_batches
        self.callbacks = list(callbacks)
        self.loader = train_loader
        self.desc = desc
        self.identity = dict(identity) if identity is not None else None
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        validate_parallel(cfg, self.world_size)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no trainable parameters")
        self.device = device or next(model.parameters()).device
        self.fsdp = cfg.parallel == "fsdp"
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(model)
        if self.fsdp:
            self.model = shard_model(model, self.device, precision=cfg.precision, cpu_offload=cfg.cpu_offload)
        else:
            self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(optimizer_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                                           betas=cfg.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.wrapped: nn.Module = (
            DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.world_size > 1 and not self.fsdp
            else self.model
        )
        self.step = 0
        self.tokens = 0
        self.last_loss = float("nan")
        self.history: list[dict[str, float]] = []
        self.skipped: list[str] = []

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_batches is None:
            return None
        was_training = self.model.training
        self.model.eval()
        total, n = 0.0, 0
        for batch in self.val_batches():
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with autocast_context(self.device, self.cfg.precision):
                loss, _ = self.eval_fn(self.model, batch)
            total += float(loss)
            n += 1
        self.model.train(was_training)
        if n == 0:
            return None
        if self.world_size > 1:
            t = torch.tensor([total, n], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            total, n = float(t[0]), int(t[1])
        return total / n

    # -------------------------------------------------------------------------------------------- training
    def _clip(self, params: list[nn.Parameter]) -> float:
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.cfg.clip_grad is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.clip_grad, norm)
        return float(norm)

    def _start(self) -> int | None:
        """Sweep stale checkpoint temporaries and resume from the newest intact checkpoint (its step), or seed a
        fresh run and check that the model to train is finite (None)."""
        cfg = self.cfg
        self.sweep_stale()
        resumed_from = self.resume()
        if resumed_from is None:
            torch.manual_seed(cfg.seed + self.rank)
            random.seed(cfg.seed + self.rank)
            np.random.seed(cfg.seed + self.rank)
            if (bad := self._non_finite_weights()) is not None:
                raise NonFiniteLossError(f"{self.desc}: the model to train has non-finite values in {bad}")
        if cfg.effective_warmup < cfg.warmup_steps and self.rank == 0:
            log.warning("%s: warm-up of %d steps clamped to the %d-step budget", self.desc, cfg.warmup_steps,
                        cfg.max_steps)
        return resumed_from

    def _train_step(self, params: list[nn.Parameter]) -> tuple[dict[str, float], int]:
        """One optimizer step (callbacks, ``grad_accum`` micro-batches, clipping, the schedule): its record for
        the history and the tokens this process trained on."""
        cfg = self.cfg
        extra: dict[str, float] = {}
        for cb in self.callbacks:
            extra.update(cb(self.step, self.model) or {})
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, step_tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(self.device) for k, v in next(self.loader).items()}
            sync = micro == cfg.grad_accum - 1 or self.world_size == 1 or self.fsdp
            ctx = nullcontext() if sync else self.wrapped.no_sync()  # type: ignore[operator]
            with ctx, autocast_context(self.device, cfg.precision):
                loss, m = self.loss_fn(self.wrapped, batch)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"{self.desc}: non-finite loss ({float(loss.detach())}) at step {self.step}")
                (loss / cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum
            step_tokens += int(batch["input_ids"].numel())
            for k, v in m.items():
                extra[k] = extra.get(k, 0.0) + float(v) / cfg.grad_accum
        grad_norm = self._clip(params)
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(f"{self.desc}: non-finite gradient norm at step {self.step}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.tokens += step_tokens * self.world_size
        self.last_loss = step_loss
        record = {"step": self.step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens}
        return {**record, **extra}, step_tokens

    def fit(self) -> TrainResult:
        """Train to ``max_steps`` (resuming where a checkpoint says), validating, logging and checkpointing on the
        configured steps; then a final validation."""
        cfg = self.cfg
        start = time.perf_counter()
        resumed_from = self._start()
        tokens_before = self.tokens  # what earlier attempts trained (0 on a fresh start)
        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.desc, disable=not cfg.progress or self.rank != 0,
                   dynamic_ncols=True)
        metrics_file = self.out_dir / "metrics.jsonl"
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _rewrite_history(metrics_file, self.history)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            record, step_tokens = self._train_step(params)
            dt = time.perf_counter() - t0
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                if (val := self.evaluate()) is not None:
                    record["val_loss"] = val
            if self.step % cfg.log_every == 0 or "val_loss" in record or self.step == cfg.max_steps:
                self.history.append(record)
                if self.rank == 0:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{step_tokens * self.world_size / dt:,.0f}",
                            refresh=False)
            bar.update(1)
            if cfg.ckpt_every and (self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps):
                self.save_checkpoint()
        bar.close()
        val_loss = self.evaluate()
        if val_loss is not None and self.history:
            self.history[-1]["val_loss"] = val_loss
            if self.rank == 0:
                _rewrite_history(metrics_file, self.history)
        return TrainResult(steps=self.step, tokens=self.tokens, tokens_this_run=self.tokens - tokens_before,
                           train_loss=self.last_loss, val_loss=val_loss, resumed_from=resumed_from,
                           wall_s=time.perf_counter() - start, history=list(self.history),
                           skipped_checkpoints=list(self.skipped))


# ---------------------------------------------------------------------------------------------- helpers
def _rewrite_history(path: Path, history: list[dict[str, float]]) -> None:
    """metrics.jsonl holds exactly the history of the current (possibly resumed) run."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, path)


__all__ = [
    "Batch",
    "Callback",
    "CheckpointError",
    "LossFn",
    "NonFiniteLossError",
    "ParallelConfigError",
    "ResumableLoader",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "autocast_context",
    "causal_lm_loss",
    "distributed_env",
    "init_distributed",
    "lr_lambda",
    "validate_parallel",
]
