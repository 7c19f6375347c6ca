"""Stages: what each one trains, on which data, with which losses (a stage = data + losses + schedule).

This module holds the ``teacher`` stage of the offline preset (pretrain the tiny Llama teacher on the
world's corpus) and ``convert`` (BitDistill stage 1). Every stage writes its output directory atomically
and a ``metrics.json`` last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoTokenizer

from bitnet.convert import BitNetConfig, convert_to_bitnet
from bitnet.data import BlockLoader, iter_eval_batches
from bitnet.evaluate import perplexity
from bitnet.io import atomic_dir, write_json_atomic
from bitnet.student import save_student
from bitnet.teacher import TinyTeacherConfig, build_tiny_teacher, count_parameters, load_teacher
from bitnet.trainer import Trainer, TrainConfig, distributed_env, init_distributed
from bitnet.world import World


def _default_teacher_train() -> TrainConfig:
    return TrainConfig(max_steps=150, lr=2e-3, warmup_steps=15, weight_decay=0.1, ckpt_every=25, eval_every=50)


class TeacherStageConfig(BaseModel):
    """Pretraining of the tiny teacher."""

    model_config = ConfigDict(extra="forbid")

    model: TinyTeacherConfig = Field(default_factory=TinyTeacherConfig)
    train: TrainConfig = Field(default_factory=_default_teacher_train)
    batch_size: int = Field(default=16, ge=1, description="blocks per micro-batch per process")
    eval_batch_size: int = Field(default=16, ge=1)
    eval_max_batches: int | None = Field(default=None, ge=1, description="cap on held-out batches for perplexity")


def held_out_perplexity(model: torch.nn.Module, world: World, split: str, batch_size: int, max_batches: int | None) -> float:
    return perplexity(model, iter_eval_batches(world.dataset(split), batch_size, max_batches))


def train_teacher(cfg: TeacherStageConfig, world: World, out_dir: str | Path) -> dict[str, Any]:
    """Pretrain the tiny Llama teacher on the world's train split; resumable from ``out_dir/train``.

    Writes ``out_dir/model`` (an HF checkpoint with the tokenizer) and ``out_dir/metrics.json``.
    Under ``torchrun`` the processes train with DDP and rank 0 writes the outputs.
    """
    out_dir = Path(out_dir)
    rank, world_size, device = init_distributed() if distributed_env()[1] > 1 else (0, 1, _device())
    tokenizer = world.tokenizer()
    torch.manual_seed(cfg.train.seed)
    model = build_tiny_teacher(
        cfg.model, len(tokenizer), bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    if model.config.max_position_embeddings < world.info["config"]["seq_len"]:
        raise ValueError("teacher max_position_embeddings is shorter than the world's seq_len")
    train_ds, val_ds = world.dataset("train"), world.dataset("validation")
    loader = BlockLoader(train_ds, cfg.batch_size, seed=cfg.train.seed, rank=rank, world_size=world_size)
    trainer = Trainer(
        model,
        loader,
        cfg.train,
        out_dir / "train",
        val_batches=lambda: iter_eval_batches(val_ds, cfg.eval_batch_size),
        device=device,
        desc="teacher",
    )
    result = trainer.fit()
    metrics: dict[str, Any] = {
        "parameters": count_parameters(model),
        "steps": result.steps,
        "tokens": result.tokens,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "wall_s": result.wall_s,
        "resumed_from": result.resumed_from,
    }
    if rank == 0:
        model.eval()
        metrics["val_ppl"] = held_out_perplexity(model, world, "validation", cfg.eval_batch_size, cfg.eval_max_batches)
        metrics["test_ppl"] = held_out_perplexity(model, world, "test", cfg.eval_batch_size, cfg.eval_max_batches)
        metrics["unigram_test_ppl"] = world.info["unigram_test_ppl"]
        with atomic_dir(out_dir / "model", marker="config.json") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        write_json_atomic(out_dir / "metrics.json", metrics)
    if world_size > 1:
        torch.distributed.barrier()
    return metrics


class ConvertStageConfig(BaseModel):
    """BitDistill stage 1: BitLinear swap + SubLN insertion."""

    model_config = ConfigDict(extra="forbid")

    bitnet: BitNetConfig = Field(default_factory=BitNetConfig)


def convert_teacher(cfg: ConvertStageConfig, teacher: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Load ``teacher`` (local dir or hub id), convert it and save the student to ``out_dir``."""
    model = load_teacher(teacher)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    except (OSError, ValueError):
        tokenizer = None
    convert_to_bitnet(model, cfg.bitnet)
    save_student(model, out_dir, tokenizer)
    return {"parameters": count_parameters(model), "subln": cfg.bitnet.subln}


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
