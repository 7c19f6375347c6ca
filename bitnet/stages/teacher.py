"""Stage ``teacher``: pretrain the tiny Llama teacher on the world (tiny preset), or take a pretrained model.

With ``pretrained`` set nothing is trained. A GGUF source (a ``.gguf`` file, or a named source such as
``smollm2-135m``: :mod:`bitnet.pretrained`) is dequantised once into ``out/model``, a regular HF checkpoint that
every later stage loads. An HF hub id or local HF directory is recorded in ``pretrained.json`` (not copied) and
later stages load it from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bitnet.io import atomic_dir, write_json_atomic
from bitnet.pretrained import materialize_teacher
from bitnet.stages.base import PRETRAINED_RECORD, Inputs, Stage
from bitnet.stages.training import Proc, StageData, held_out_perplexity, schedule, train_and_save
from bitnet.teacher import TinyTeacherConfig, build_tiny_teacher, count_parameters
from bitnet.trainer import TrainConfig
from bitnet.world import check_seq_len_fits, open_world


class TeacherConfig(BaseModel):
    """The tiny teacher's shape and pretraining, or a pretrained teacher."""

    model_config = ConfigDict(extra="forbid")

    pretrained: str | None = Field(
        default=None, description="the teacher: a named source (smollm2-135m), a .gguf file, an HF hub id or "
        "local HF directory; unset: train the tiny one",
    )
    model: TinyTeacherConfig = Field(default_factory=TinyTeacherConfig)
    train: TrainConfig = Field(default_factory=lambda: schedule(150, lr=2e-3, warmup_steps=15, weight_decay=0.1,
                                                        ckpt_every=25, eval_every=50))
    data: StageData = Field(default_factory=lambda: StageData(batch_size=16, eval_batch_size=16,
                                                              eval_max_batches=None))


def run(cfg: TeacherConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    if cfg.pretrained:
        metrics = materialize_teacher(cfg.pretrained, out / "model")
        if "hf_model" in metrics:  # an HF model: recorded, not copied
            write_json_atomic(out / PRETRAINED_RECORD, {"pretrained": metrics["hf_model"]})
        return metrics
    if "world" not in inputs:
        raise ValueError("training the tiny teacher needs a world (or set teacher.pretrained)")
    world = open_world(inputs["world"])
    proc = Proc.start(cfg.train)
    tokenizer = world.tokenizer()
    torch.manual_seed(cfg.train.seed)
    def build() -> nn.Module:
        return build_tiny_teacher(cfg.model, len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)

    model = build()
    check_seq_len_fits(world.seq_len, model.config, "tiny teacher")

    def save(model: nn.Module, metrics: dict[str, Any]) -> None:
        metrics["parameters"] = count_parameters(model)
        metrics["val_ppl"] = held_out_perplexity(model, world, "validation", cfg.data)
        metrics["test_ppl"] = held_out_perplexity(model, world, "test", cfg.data)
        metrics["unigram_test_ppl"] = world.info["unigram_test_ppl"]
        with atomic_dir(out / "model", marker="config.json") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)

    return train_and_save(model, proc=proc, train=cfg.train, data=cfg.data, world=world, out=out, save=save,
                          desc="teacher", rebuild=build)


STAGE = Stage("teacher", TeacherConfig, run, optional_inputs=("world",),
              help="pretrain the tiny Llama teacher on a world, or take a pretrained (HF or GGUF) teacher")
