"""Stage ``eval``: held-out perplexity of the teacher, the naive ternary model (converted, untrained) and the
final student, with the students' top-1 agreement and KL to the teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bitnet.data import iter_eval_batches
from bitnet.evaluate import compare_to_teacher, perplexity
from bitnet.stages.base import Inputs, Stage, model_dir, teacher_source
from bitnet.student import load_student
from bitnet.teacher import load_teacher
from bitnet.world import check_tokenizer_matches, open_world


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    split: Literal["test", "validation"] = "test"
    batch_size: int = Field(default=16, ge=1)
    max_batches: int | None = Field(default=32, ge=1, description="cap on held-out batches")


def run(cfg: EvalConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    world = open_world(inputs["world"])
    check_tokenizer_matches(world, teacher_source(inputs["teacher"]))
    data = world.dataset(cfg.split)

    def batches() -> Any:
        return iter_eval_batches(data, cfg.batch_size, cfg.max_batches)

    teacher = load_teacher(teacher_source(inputs["teacher"]))
    metrics: dict[str, Any] = {"split": cfg.split, "teacher_ppl": perplexity(teacher, batches())}
    for name in ("naive", "student"):
        if name not in inputs:
            continue
        m = compare_to_teacher(load_student(model_dir(inputs[name])), teacher, batches())
        metrics.update({f"{name}_ppl": m["ppl"], f"{name}_top1_agreement": m["top1_agreement"], f"{name}_kl": m["kl"]})
    metrics["val_ppl"] = metrics.get("student_ppl")  # the summary table's perplexity column
    return metrics


STAGE = Stage("eval", EvalConfig, run, inputs=("teacher", "world"), optional_inputs=("student", "naive"),
              reuse_in_eval_only=False,
              help="held-out perplexity of teacher, naive ternary and student, with agreement to the teacher")
