"""Stage ``eval``: held-out perplexity of the teacher, the naive ternary model (converted, untrained) and the
final student, with the students' top-1 agreement and KL to the teacher; the teacher's own GGUF (what users run
today) through llama.cpp on the same rows when the teacher came from one; lm-eval tasks of the student
(``harness``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from bitnet.data import iter_eval_batches
from bitnet.data.tokenizer import load_tokenizer
from bitnet.evaluate import (
    HarnessOptions,
    compare_to_teacher,
    evaluate_model,
    gguf_perplexity,
    perplexity,
    write_results,
)
from bitnet.pretrained import SOURCE_FILE
from bitnet.stages.base import Inputs, Stage, model_dir, teacher_source
from bitnet.student import load_student
from bitnet.teacher import load_teacher
from bitnet.world import check_tokenizer_matches, open_world

HARNESS_SCRATCH = ".lm-eval-data"
"""The harness's local task files, rebuilt from the world on every run and removed after it: their YAMLs name the
data files by absolute path, which would leave the temporary build directory's name in the artifact (and point
nowhere once it is renamed)."""


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: Literal["test", "validation"] = "test"
    batch_size: int = Field(default=16, ge=1)
    max_batches: int | None = Field(default=32, ge=1, description="cap on held-out batches: every perplexity of "
                                    "the stage, the harness's included (None: the whole split)")
    teacher_gguf: bool = Field(default=True, description="also the teacher's source GGUF through llama.cpp")
    harness: HarnessOptions | None = Field(default=None, description="lm-eval tasks of the student (unset: none); "
                                           "on the stage's split and max_batches")


def run(cfg: EvalConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    world = open_world(inputs["world"])
    check_tokenizer_matches(world, teacher_source(inputs["teacher"]))
    data = world.dataset(cfg.split)

    def batches() -> Any:
        return iter_eval_batches(data, cfg.batch_size, cfg.max_batches)

    teacher = load_teacher(teacher_source(inputs["teacher"]))
    metrics: dict[str, Any] = {"split": cfg.split, "teacher_ppl": perplexity(teacher, batches())}
    source = model_dir(inputs["teacher"]) / SOURCE_FILE
    if cfg.teacher_gguf and source.is_file() and Path(gguf := json.loads(source.read_text())["gguf"]).is_file():
        rows = torch.cat([b["input_ids"] for b in batches()])  # the same held-out rows
        metrics["teacher_gguf"] = Path(gguf).name
        metrics["teacher_gguf_ppl"] = gguf_perplexity(gguf, rows)
    for name in ("naive", "student"):
        if name not in inputs:
            continue
        m = compare_to_teacher(load_student(model_dir(inputs[name])), teacher, batches())
        metrics.update({f"{name}_ppl": m["ppl"], f"{name}_top1_agreement": m["top1_agreement"], f"{name}_kl": m["kl"]})
    if cfg.harness is not None and "student" in inputs:
        student_dir = model_dir(inputs["student"])
        scratch = out / HARNESS_SCRATCH
        max_blocks = None if cfg.max_batches is None else cfg.max_batches * cfg.batch_size  # the rows of batches()
        try:
            res = evaluate_model(load_student(student_dir), load_tokenizer(student_dir), data, scratch, cfg.harness,
                                 name="student", max_blocks=max_blocks)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        metrics["harness_seconds"] = res.info.pop("seconds", None)  # a run record, not a result
        res.info.get("eval_data", {}).pop("dir", None)  # the scratch directory, gone
        write_results(res, out / "lm-eval.json")
        metrics.update({f"student_{task}_{k}": v for task, m in res.tasks.items() for k, v in m.items()})
    metrics["val_ppl"] = metrics.get("student_ppl")  # the summary table's perplexity column
    return metrics


STAGE = Stage("eval", EvalConfig, run, inputs=("teacher", "world"), optional_inputs=("student", "naive"),
              reuse_in_eval_only=False,
              help="held-out perplexity of teacher, naive ternary and student, with agreement to the teacher")
