"""Block-by-block reconstruction from cached activations (EfficientQAT's Block-AP, arXiv 2407.11062; BRECQ).

The student's decoder blocks are fitted one after another. For block ``l``: the student's own inputs to it over a
fixed pool of training blocks (``x_l``, cached), the teacher block's outputs on those inputs (``T_l(x_l)``, cached
once), then ``steps`` optimizer steps of ``‖S_l(x) − T_l(x)‖`` (:func:`~bitnet.objectives.hidden_state_loss`) over
mini-batches of the pool, with block ``l``'s parameters only and a fresh optimizer and LR schedule (warm-up and
cosine of ``train``) per block. Then ``x_{l+1} = S_l(x_l)`` (the fitted, quantized block) and the next block.

Every block sees ``steps × batch`` rows of the pool, as many as a ``steps``-step stage shows every block, at about
1/L of its compute a step (one block forward and backward, the teacher's targets computed once). Memory is one
block's inputs and targets over the pool (2 × pool × seq × hidden floats) besides the two models.

Each block trains in a :class:`~bitnet.trainer.Trainer` of its own (checkpoints, resume and metrics under
``work/block-NNN``); a finished block's weights are written to ``work/block-NNN.safetensors`` and its checkpoints
removed, so a resumed run loads the finished blocks, recomputes the cache through them (deterministic) and goes on
with the first unfinished block.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bitnet.calibrate import Record, capture_inputs
from bitnet.convert import decoder_layers
from bitnet.io import sweep_temporaries, temp_name, write_json_atomic
from bitnet.objectives import hidden_state_loss
from bitnet.trainer import TrainConfig, Trainer

__all__ = ["PoolLoader", "BlockFitResult", "fit_blocks"]


def layer_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states (transformers 5 layers return the tensor; older ones a tuple)."""
    return out[0] if isinstance(out, tuple) else out


class PoolLoader:
    """Resumable iterator of mini-batches of pool rows: ``{"input_ids": (B, T), "index": (B,)}``, epochs of the pool
    in a seeded order (each epoch its own permutation, leftover rows dropped)."""

    def __init__(self, ids: torch.Tensor, batch_size: int, seed: int) -> None:
        if batch_size < 1 or len(ids) < batch_size:
            raise ValueError(f"a pool of {len(ids)} rows holds no batch of {batch_size}")
        self.ids, self.batch_size, self.seed = ids, batch_size, seed
        self.epoch = self.position = 0

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.ids), generator=g)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if (self.position + 1) * self.batch_size > len(self.ids):
            self.epoch, self.position = self.epoch + 1, 0
        index = self._order()[self.position * self.batch_size:(self.position + 1) * self.batch_size]
        self.position += 1
        return {"input_ids": self.ids[index], "index": index}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "rows": len(self.ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed or state.get("rows") != len(self.ids):
            raise ValueError(f"pool loader state {state} is for another pool (seed {self.seed}, {len(self.ids)} rows)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


@dataclass
class BlockFitResult:
    blocks: list[dict[str, float]]  # per block: pool_loss_before / pool_loss_after (the whole pool), train_loss
    blocks_loaded: int  # finished blocks read back from an earlier attempt
    block_steps: int  # optimizer steps of this attempt, all blocks


def _run_layer(layer: nn.Module, x: torch.Tensor, call: Record) -> torch.Tensor:
    rest, kwargs = call
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
    return layer_output(layer(x, *rest, **kwargs))


@torch.no_grad()
def _through(layer: nn.Module, pool: torch.Tensor, calls: list[Record], batch: int) -> torch.Tensor:
    """``layer`` over the pool, ``batch`` rows at a time (the shape the calls were recorded for)."""
    return torch.cat([_run_layer(layer, pool[i:i + batch], calls[i // batch]) for i in range(0, len(pool), batch)])


def _block_loss(layer_calls: list[Record], pool: torch.Tensor, targets: torch.Tensor, batch: int, kind: str
                ) -> Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]:
    call = layer_calls[0]  # every recorded chunk has the same shape, so any chunk's call fits a mini-batch

    def fn(block: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        index = b["index"].to(pool.device)
        return hidden_state_loss([_run_layer(block, pool[index], call)], [targets[index]], kind=kind), {}

    return fn


def fit_blocks(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, *, train: TrainConfig, batch_size: int,
               work: Path, kind: str = "mse", identity: dict[str, str] | None = None,
               on_block: Callable[[int, dict[str, float]], None] | None = None) -> BlockFitResult:
    """Fit every decoder block of ``student`` to ``teacher``'s (module docstring) on the pool ``ids`` (rows × seq,
    a multiple of ``batch_size`` rows), ``train.max_steps`` steps per block; ``on_block(l, summary)`` after each,
    with the block's loss over the whole pool before and after its fit and its last training loss."""
    s_layers, t_layers = decoder_layers(student), decoder_layers(teacher)
    if len(s_layers) != len(t_layers):
        raise ValueError(f"student has {len(s_layers)} decoder blocks, teacher {len(t_layers)}")
    if len(ids) % batch_size:
        raise ValueError(f"the pool's {len(ids)} rows are not a multiple of the batch size {batch_size}")
    work.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(work)
    chunks = list(ids.split(batch_size))
    student.eval()
    hidden, calls = capture_inputs(student, s_layers, chunks)
    x = torch.cat(hidden).detach()
    result = BlockFitResult([], 0, 0)
    for i, (s_layer, t_layer) in enumerate(zip(s_layers, t_layers, strict=True)):
        layer_calls = [c[i] for c in calls]
        done, summary = work / f"block-{i:03d}.safetensors", work / f"block-{i:03d}.json"
        if done.is_file():
            s_layer.load_state_dict(load_file(done), strict=True)
            result.blocks_loaded += 1
            result.blocks.append(json.loads(summary.read_text()))
            s_layer.eval()
            x = _through(s_layer, x, layer_calls, batch_size)
        else:
            targets = _through(t_layer, x, layer_calls, batch_size)
            s_layer.eval()
            before = float(hidden_state_loss([_through(s_layer, x, layer_calls, batch_size)], [targets], kind=kind))
            trainer = Trainer(s_layer, PoolLoader(ids, batch_size, train.seed + i), train, work / f"block-{i:03d}",
                              loss_fn=_block_loss(layer_calls, x, targets, batch_size, kind),
                              desc=f"block {i}", identity={**(identity or {}), "block": str(i)})
            fit = trainer.fit()
            result.block_steps += fit.steps - (fit.resumed_from or 0)
            s_layer.eval()
            x = _through(s_layer, x, layer_calls, batch_size)  # the next block's input: this (fitted) block's output
            after = float(hidden_state_loss([x], [targets], kind=kind))
            del targets
            result.blocks.append({"pool_loss_before": before, "pool_loss_after": after, "train_loss": fit.train_loss,
                                  "steps": fit.steps})
            write_json_atomic(summary, result.blocks[-1])
            tmp = done.with_name(temp_name(done.name) + "w")
            save_file({k: v.detach().contiguous() for k, v in s_layer.state_dict().items()}, str(tmp))
            os.replace(tmp, done)  # the weights last: their presence marks the block finished
            shutil.rmtree(work / f"block-{i:03d}", ignore_errors=True)
        if on_block is not None:
            on_block(i, result.blocks[-1])
    return result
