"""The one training loop every stage uses.

AdamW, linear warm-up + cosine decay, gradient accumulation, gradient clipping, a non-finite guard,
bf16 autocast where the device has it, tqdm progress (loss, tokens/s), periodic validation, DDP when
started under ``torchrun``, and checkpoints every N steps (model, optimizer, scheduler, RNG, data
position; safetensors + JSON) with exact resume: a run killed at any point and restarted reaches the
same weights as an uninterrupted run.

A stage supplies the model, a loss function ``loss_fn(model, batch) -> (loss, metrics)`` and the data;
callbacks run before every optimizer step (e.g. the λ warm-up schedule of continued pre-training).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file, save_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from bitnet.io import atomic_dir, write_json_atomic
from bitnet.student import CheckpointError, load_state_dict_checked

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]
Callback = Callable[[int, nn.Module], dict[str, float] | None]

CKPT_DIR = "checkpoints"
CKPT_RE = re.compile(r"^step-(\d{8})$")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss or gradient."""


class ResumableLoader(Protocol):
    def __iter__(self) -> Iterator[Batch]: ...
    def __next__(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainConfig(BaseModel):
    """Optimisation and bookkeeping of one training run (a stage's ``train`` section)."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(gt=0, description="optimizer steps")
    lr: float = Field(default=3e-4, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1, description="final lr of the cosine, as a fraction of lr")
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_accum: int = Field(default=1, ge=1)
    clip_grad: float | None = Field(default=1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    eval_every: int = Field(default=0, ge=0, description="validate every N steps; 0 = only at the end")
    eval_batches: int = Field(default=8, ge=1)
    ckpt_every: int = Field(default=0, ge=0, description="checkpoint every N steps; 0 = never")
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=10, ge=1)
    seed: int = 0
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        return self


@dataclass
class TrainResult:
    steps: int
    tokens: int
    train_loss: float
    val_loss: float | None
    resumed_from: int | None
    wall_s: float
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def val_ppl(self) -> float | None:
        return math.exp(self.val_loss) if self.val_loss is not None else None


def causal_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy of a HF causal LM on packed blocks (labels = inputs, shifted inside)."""
    out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    return out.loss, {}


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
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
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed() -> tuple[int, int, torch.device]:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); returns (rank, world, device)."""
    rank, world, local_rank = distributed_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


class Trainer:
    """Runs ``cfg.max_steps`` optimizer steps of ``loss_fn`` over ``train_loader``."""

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
    ) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.val_batches = val_batches
        self.callbacks = list(callbacks)
        self.loader = train_loader
        self.desc = desc
        self.rank, self.world, default_device = (
            (dist.get_rank(), dist.get_world_size(), None) if dist.is_initialized() else (0, 1, None)
        )
        self.device = device or default_device or next(model.parameters()).device
        self.model = model.to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=cfg.betas,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.wrapped: nn.Module = (
            DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.world > 1
            else model
        )
        self.step = 0
        self.tokens = 0
        self.history: list[dict[str, float]] = []

    # ----------------------------------------------------------------------------------------- checkpoints
    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / CKPT_DIR

    def checkpoints(self) -> list[tuple[int, Path]]:
        if not self.ckpt_root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.ckpt_root.iterdir() if (m := CKPT_RE.match(p.name))]
        return sorted(found)

    def _rng_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": _jsonable(random.getstate()),
            "numpy": _jsonable(np.random.get_state()),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return state

    def save_checkpoint(self) -> Path | None:
        rng = self._rng_state()
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, rng)
        else:
            gathered = [rng]
        path = self.ckpt_root / f"step-{self.step:08d}"
        if self.rank == 0:
            opt_tensors, opt_meta = _flatten_optimizer(self.optimizer.state_dict())
            rng_tensors = {f"rank{r}.torch": s["torch"] for r, s in enumerate(gathered)}
            rng_tensors.update({f"rank{r}.cuda": s["cuda"] for r, s in enumerate(gathered) if s.get("cuda") is not None})
            with atomic_dir(path, marker="trainer.json") as tmp:
                save_model(self.model, str(tmp / "model.safetensors"))
                save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
                save_file(rng_tensors, str(tmp / "rng.safetensors"))
                write_json_atomic(
                    tmp / "trainer.json",
                    {
                        "step": self.step,
                        "tokens": self.tokens,
                        "world_size": self.world,
                        "optimizer": opt_meta,
                        "scheduler": self.scheduler.state_dict(),
                        "loader": self.loader.state_dict(),
                        "rng": [{"python": s["python"], "numpy": s["numpy"]} for s in gathered],
                        "history": self.history,
                        "config": self.cfg.model_dump(mode="json"),
                    },
                )
            for _, old in self.checkpoints()[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        if self.world > 1:
            dist.barrier()
        return path

    def load_checkpoint(self, path: Path) -> None:
        try:
            meta = json.loads((path / "trainer.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable trainer state ({e})") from e
        if meta.get("world_size", 1) != self.world:
            raise CheckpointError(
                f"{path} was written by {meta.get('world_size')} processes, this run has {self.world}"
            )
        load_state_dict_checked(self.model, path / "model.safetensors")
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        try:
            self.optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, meta["optimizer"]))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit this model ({e})") from e
        self.scheduler.load_state_dict(meta["scheduler"])
        self.loader.load_state_dict(meta["loader"])
        rng_tensors = load_file(str(path / "rng.safetensors"))
        py = meta["rng"][self.rank]
        random.setstate(_tuplify(py["python"]))
        np_state = py["numpy"]
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
        torch.set_rng_state(rng_tensors[f"rank{self.rank}.torch"])
        if self.device.type == "cuda" and f"rank{self.rank}.cuda" in rng_tensors:
            torch.cuda.set_rng_state(rng_tensors[f"rank{self.rank}.cuda"], self.device)
        self.step = int(meta["step"])
        self.tokens = int(meta["tokens"])
        self.history = list(meta["history"])

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.val_batches is None:
            return None
        was_training = self.model.training
        self.model.eval()
        total, n = 0.0, 0
        for i, batch in enumerate(self.val_batches()):
            if i >= self.cfg.eval_batches:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with autocast_context(self.device, self.cfg.precision):
                loss, _ = self.eval_fn(self.model, batch)
            total += float(loss)
            n += 1
        self.model.train(was_training)
        if n == 0:
            return None
        if self.world > 1:
            t = torch.tensor([total, n], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            total, n = float(t[0]), int(t[1])
        return total / n

    # -------------------------------------------------------------------------------------------- training
    def fit(self) -> TrainResult:
        cfg = self.cfg
        start = time.perf_counter()
        resumed_from = None
        if ckpts := self.checkpoints():
            self.load_checkpoint(ckpts[-1][1])
            resumed_from = self.step
        else:
            torch.manual_seed(cfg.seed + self.rank)
            random.seed(cfg.seed + self.rank)
            np.random.seed(cfg.seed + self.rank)
        self.model.train()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=self.desc,
            disable=not cfg.progress or self.rank != 0,
            dynamic_ncols=True,
        )
        last_loss = float("nan")
        val_loss: float | None = None
        metrics_file = self.out_dir / "metrics.jsonl"
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _rewrite_history(metrics_file, self.history)
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            extra: dict[str, float] = {}
            for cb in self.callbacks:
                extra.update(cb(self.step, self.model) or {})
            self.optimizer.zero_grad(set_to_none=True)
            step_loss, step_tokens = 0.0, 0
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(self.device) for k, v in next(self.loader).items()}
                sync = micro == cfg.grad_accum - 1 or self.world == 1
                ctx = nullcontext() if sync else self.wrapped.no_sync()  # type: ignore[operator]
                with ctx, autocast_context(self.device, cfg.precision):
                    loss, m = self.loss_fn(self.wrapped, batch)
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(f"{self.desc}: non-finite loss ({float(loss.detach())}) at step {self.step}")
                    (loss / cfg.grad_accum).backward()
                step_loss += float(loss.detach()) / cfg.grad_accum
                step_tokens += int(batch["input_ids"].numel())
                for k, v in m.items():
                    extra[k] = extra.get(k, 0.0) + float(v) / cfg.grad_accum
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if cfg.clip_grad is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad))
            else:
                grad_norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(f"{self.desc}: non-finite gradient norm at step {self.step}")
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.tokens += step_tokens * self.world
            last_loss = step_loss
            dt = time.perf_counter() - t0
            record = {"step": self.step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens}
            record.update(extra)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                val_loss = self.evaluate()
                if val_loss is not None:
                    record["val_loss"] = val_loss
            if self.step % cfg.log_every == 0 or "val_loss" in record or self.step == cfg.max_steps:
                self.history.append(record)
                if self.rank == 0:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{step_tokens * self.world / dt:,.0f}", refresh=False)
            bar.update(1)
            if cfg.ckpt_every and (self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps):
                self.save_checkpoint()
        bar.close()
        val_loss = self.evaluate()
        if val_loss is not None and self.history:
            self.history[-1]["val_loss"] = val_loss
            if self.rank == 0:
                _rewrite_history(metrics_file, self.history)
        return TrainResult(
            steps=self.step,
            tokens=self.tokens,
            train_loss=last_loss if self.history else float("nan"),
            val_loss=val_loss,
            resumed_from=resumed_from,
            wall_s=time.perf_counter() - start,
            history=list(self.history),
        )


# ---------------------------------------------------------------------------------------------- helpers
def _rewrite_history(path: Path, history: list[dict[str, float]]) -> None:
    """metrics.jsonl holds exactly the history of the current (possibly resumed) run."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple | list):
        return [_jsonable(o) for o in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _tuplify(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_tuplify(o) for o in obj)
    return obj


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, pstate in state["state"].items():
        entry: dict[str, Any] = {}
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
                entry[k] = {"tensor": f"{idx}.{k}"}
            else:
                entry[k] = v
        meta["state"][str(idx)] = entry
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {
            k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in entry.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}
