"""Stage ``convert`` (BitDistill stage 1): the teacher with BitLinear layers and SubLN, saved as a student."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoTokenizer

from bitnet.convert import BitNetConfig, convert_to_bitnet
from bitnet.stages.base import Inputs, Stage, teacher_source
from bitnet.student import save_student
from bitnet.teacher import count_parameters, load_teacher


class ConvertConfig(BaseModel):
    """BitLinear swap + SubLN insertion."""

    model_config = ConfigDict(extra="forbid")

    bitnet: BitNetConfig = Field(default_factory=BitNetConfig)


def run(cfg: ConvertConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    source = teacher_source(inputs["teacher"])
    model = load_teacher(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        tokenizer = None
    convert_to_bitnet(model, cfg.bitnet)
    save_student(model, out / "model", tokenizer)
    return {"parameters": count_parameters(model), "subln": cfg.bitnet.subln}


STAGE = Stage("convert", ConvertConfig, run, inputs=("teacher",),
              help="stage 1: teacher → BitNet student (BitLinear + SubLN)")
