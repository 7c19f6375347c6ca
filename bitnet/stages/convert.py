"""Stage ``convert`` (BitDistill stage 1): the teacher with BitLinear layers and SubLN, saved as a student."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedTokenizerBase

from bitnet.convert import BitNetConfig, convert_to_bitnet
from bitnet.data.tokenizer import TOKENIZER_MARKER, VOCAB_FILES, load_tokenizer
from bitnet.stages.base import Inputs, Stage, teacher_source
from bitnet.student import save_student
from bitnet.teacher import count_parameters, load_teacher


class ConvertConfig(BaseModel):
    """BitLinear swap + SubLN insertion."""

    model_config = ConfigDict(extra="forbid")

    bitnet: BitNetConfig = Field(default_factory=BitNetConfig)


def run(cfg: ConvertConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    source = teacher_source(inputs["teacher"])
    tokenizer = teacher_tokenizer(source)  # malformed files: one line, before the weights load
    model = load_teacher(source)
    convert_to_bitnet(model, cfg.bitnet)
    save_student(model, out / "model", tokenizer)
    return {"parameters": count_parameters(model), "subln": cfg.bitnet.subln}


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


STAGE = Stage("convert", ConvertConfig, run, inputs=("teacher",),
              help="stage 1: teacher → BitNet student (BitLinear + SubLN)")
