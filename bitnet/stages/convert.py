"""Stage ``convert`` (BitDistill stage 1): the teacher with BitLinear layers and SubLN, saved as a student."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import PreTrainedTokenizerBase

from bitnet.calibrate import calibrate_student
from bitnet.convert import BitNetConfig, convert_to_bitnet
from bitnet.data.tokenizer import TOKENIZER_MARKER, VOCAB_FILES, load_tokenizer
from bitnet.stages.base import Inputs, Stage, teacher_source
from bitnet.student import save_student
from bitnet.teacher import count_parameters, load_teacher
from bitnet.world import check_seq_len_fits, check_tokenizer_matches, open_world


class CalibrationConfig(BaseModel):
    """A calibrated ternary start (:mod:`bitnet.calibrate`): GPTQ's error-compensated rounding of every BitLinear
    onto its per-group ternary grid, on the first ``blocks`` sequences of the world's train split."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    blocks: int = Field(default=64, ge=1, description="calibration sequences: the first N blocks of the train split")
    batch_size: int = Field(default=4, ge=1, description="sequences per forward pass while calibrating")
    damp: float = Field(default=0.01, gt=0, le=1, description="GPTQ damping: H + damp·mean(diag H)·I")
    sequential: bool = Field(default=True, description="true sequential: each group of a block's BitLinears (q/k/v, "
                             "o, gate/up, down) calibrated on the outputs of the already quantized ones before it; "
                             "false: every H from one full-precision pass of the block")
    act_order: bool = Field(default=True, description="GPTQ every BitLinear also with columns by descending diag(H) "
                            "and static group scales, keeping the order of lower output error")


class ConvertConfig(BaseModel):
    """BitLinear swap + SubLN insertion (+ an optional calibrated ternary start)."""

    model_config = ConfigDict(extra="forbid")

    bitnet: BitNetConfig = Field(default_factory=BitNetConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @model_validator(mode="after")
    def _calibrated_scales(self) -> ConvertConfig:
        if self.calibration.enabled and self.bitnet.scale_rule == "absmean":
            raise ValueError("calibration needs bitnet.scale_rule mse or learned: an absmean scale recomputed from "
                             "the calibrated weights would shrink it")
        return self


def run(cfg: ConvertConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    source = teacher_source(inputs["teacher"])
    tokenizer = teacher_tokenizer(source)  # malformed files: one line, before the weights load
    calib = calibration_batches(cfg.calibration, inputs, source) if cfg.calibration.enabled else None
    model = load_teacher(source)
    convert_to_bitnet(model, cfg.bitnet)
    metrics: dict[str, Any] = {"parameters": count_parameters(model), "subln": cfg.bitnet.subln}
    if calib is not None:
        check_calibration_tokens(calib, model.config, source)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        report = calibrate_student(model.to(device), calib, damp=cfg.calibration.damp,
                                   sequential=cfg.calibration.sequential, act_order=cfg.calibration.act_order,
                                   progress=sys.stderr.isatty())
        model.to("cpu")
        metrics.update(report.metrics())
    save_student(model, out / "model", tokenizer)
    return metrics


def calibration_batches(cfg: CalibrationConfig, inputs: Inputs, source: str) -> list[torch.Tensor]:
    """The first ``cfg.blocks`` blocks of the world's train split in batches of ``cfg.batch_size`` (deterministic),
    from a world tokenized with the teacher's tokenizer."""
    if "world" not in inputs:
        raise ValueError("convert: calibration.enabled needs the world input (--world DIR)")
    world = open_world(inputs["world"])
    check_tokenizer_matches(world, source)
    train = world.dataset("train")
    if len(train) < cfg.blocks:
        raise ValueError(f"convert: calibration.blocks is {cfg.blocks} but the world's train split has only "
                         f"{len(train)} blocks")
    return [train.get_batch(range(i, min(i + cfg.batch_size, cfg.blocks))) for i in range(0, cfg.blocks,
                                                                                          cfg.batch_size)]


def check_calibration_tokens(calib: list[torch.Tensor], config: Any, source: str) -> None:
    """Blocks the model has positions for, and token ids its embedding has rows for."""
    check_seq_len_fits(int(calib[0].shape[1]), config, f"teacher {source}")
    top = max(int(b.max()) for b in calib)
    if top >= config.vocab_size:
        raise ValueError(f"convert: the world's token id {top} is outside the teacher's vocabulary "
                         f"({config.vocab_size}): build the world with the teacher's tokenizer")


def teacher_tokenizer(source: str) -> PreTrainedTokenizerBase | None:
    """The teacher's tokenizer for the student directory; None when it has none (a directory without tokenizer
    files, a hub id whose tokenizer cannot be fetched here). A malformed one is an error, not None."""
    path = Path(source)
    if path.is_dir():
        present = any((path / f).is_file() for f in (*VOCAB_FILES, TOKENIZER_MARKER))
        return load_tokenizer(path) if present else None
    try:
        return load_tokenizer(source)
    except (OSError, ValueError):
        return None


STAGE = Stage("convert", ConvertConfig, run, inputs=("teacher",), optional_inputs=("world",),
              help="stage 1: teacher → BitNet student (BitLinear + SubLN)")
