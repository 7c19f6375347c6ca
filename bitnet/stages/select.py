"""Stage ``select``: influence-based data selection — keep the world's train blocks whose gradients agree most
with a target split's (LESS/TracIn-style); any training stage trains on the result with ``data.train_data``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bitnet.data.influence import InfluenceConfig, select_influential, write_subset
from bitnet.io import write_json_atomic
from bitnet.stages.base import Inputs, Stage, model_dir
from bitnet.stages.outputs import input_identity
from bitnet.stages.training import default_device
from bitnet.student import load_student
from bitnet.teacher import load_teacher
from bitnet.world import open_world

TIMINGS = ("seconds", "seconds_targets", "seconds_candidates", "examples_per_s")
"""Statistics of the run rather than of the selection: kept out of ``selection.json`` (part of the content)."""


class SelectConfig(BaseModel):
    """Pick the training blocks of a stage by gradient similarity to a target split."""

    model_config = ConfigDict(extra="forbid")

    influence: InfluenceConfig = Field(default_factory=InfluenceConfig)
    target_split: Literal["validation", "test"] = "validation"
    max_candidates: int | None = Field(default=None, ge=1, description="score only the first N train blocks")
    max_targets: int | None = Field(default=None, ge=1, description="use only the first N target blocks")


def run(cfg: SelectConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    """Score with ``inputs["model"]`` (a student or an HF model); write the kept blocks as a packed dataset at
    ``out`` and the selection statistics in it (``OUT/selection.json``, without :data:`TIMINGS`; a stage writes
    nothing outside ``out``)."""
    path = model_dir(inputs["model"])
    model = (load_student(path) if (path / "bitnet.json").is_file() else load_teacher(path)).to(default_device())
    world = open_world(inputs["world"])
    candidates, targets = world.dataset("train"), world.dataset(cfg.target_split)
    cand = range(min(len(candidates), cfg.max_candidates or len(candidates)))
    targ = range(min(len(targets), cfg.max_targets or len(targets)))
    result = select_influential(model, candidates, targets, cfg.influence, candidate_indices=cand, target_indices=targ)
    # the model by its content identity, not its path: the files a stage writes are a function of its inputs'
    # contents, wherever they live (another root, a remote root's local cache)
    info = {"target_split": cfg.target_split, "model": input_identity(inputs["model"]),
            **cfg.influence.model_dump(mode="json")}
    write_subset(candidates, result.indices, out, info=info)
    stats = {k: v for k, v in result.stats.items() if k != "params"}
    write_json_atomic(out / "selection.json", {k: v for k, v in stats.items() if k not in TIMINGS})
    return stats  # metrics.json, a run record, keeps the timings


STAGE = Stage("select", SelectConfig, run, inputs=("model", "world"),
              help="influence-based data selection: keep the train blocks most like a target split")
