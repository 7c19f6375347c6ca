"""``STAGES``: every stage of the pipeline by name (adding a stage = its module + one line here), and
:func:`run_stage`, the one way the CLI, the flow's worker and the benchmarks run a stage."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from bitnet.io import atomic_dir, finite, output_lock, through_link, write_json_atomic
from bitnet.stages import convert, cpt, export, kd, layerwise, lrc, select, teacher, world
from bitnet.stages import eval as evaluation
from bitnet.stages.base import Inputs, Stage
from bitnet.stages.outputs import STAGE_RECORD, claim_output, stage_identity, sweep_stale, write_record

log = logging.getLogger("bitdistill.stages")

STAGES: dict[str, Stage[Any]] = {
    s.STAGE.name: s.STAGE for s in (world, teacher, convert, layerwise, cpt, kd, lrc, select, export, evaluation)
}


def stage(name: str) -> Stage[Any]:
    """The stage called ``name``; a one-line error naming the known ones otherwise."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")
    return STAGES[name]


def run_stage(name: str, cfg: BaseModel, inputs: Inputs, out: str | Path) -> dict[str, Any]:
    """Run stage ``name`` with ``cfg`` on ``inputs`` into ``out``; rank 0 writes ``out/metrics.json`` last.

    ``out`` is claimed first (``bitnet.stages.outputs``): a directory of another command, stage, config or inputs
    is refused, a finished output of the same identity is reused as it is. Stages that do not train are built in a
    temporary directory next to ``out`` and swapped in on success; training stages write in place (they resume
    from ``out/train``) and save their model atomically, so a failure never destroys a previous output. A symbolic
    link ``out`` is written through (its target is the output); the lock lives under ``bitnet.io.data_home()``.
    """
    st = stage(name)
    if not isinstance(cfg, st.config):
        raise TypeError(f"stage {name} takes a {st.config.__name__}, got {type(cfg).__name__}")
    st.check_inputs(inputs)
    out = through_link(out)
    local = {k: Path(v) for k, v in inputs.items()}
    identity = stage_identity(name, cfg.model_dump(mode="json"), st.fingerprint(cfg) if st.fingerprint else None,
                              local)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: every rank must run (collectives); rank 0 writes
        return _run_distributed(st, cfg, local, out, identity)
    with output_lock(out):
        claim = claim_output(out, name, identity)
        sweep_stale(out)
        if claim == "finished":
            log.info("%s: %s holds a finished output of the same config and inputs; reusing it", name, out)
            return json.loads((out / "metrics.json").read_text())
        if "train" in st.config.model_fields:  # resumable in place
            write_record(out, name, identity, finished=False)
            metrics = finite(st.run(cfg, local, out))
            write_json_atomic(out / "metrics.json", metrics)
            write_record(out, name, identity, finished=True)
            return metrics
        legacy_world = name == "world" and not (out / STAGE_RECORD).exists()  # claimed: a world without a record
        with atomic_dir(out, marker="world.json" if legacy_world else STAGE_RECORD) as tmp:
            metrics = finite(st.run(cfg, local, tmp))
            write_json_atomic(tmp / "metrics.json", metrics)
            write_record(tmp, name, identity, finished=True)
        return metrics


def _run_distributed(st: Stage[Any], cfg: BaseModel, inputs: dict[str, Path], out: Path,
                     identity: dict[str, str]) -> dict[str, Any]:
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        claim_output(out, st.name, identity)
        write_record(out, st.name, identity, finished=False)
    metrics = finite(st.run(cfg, inputs, out))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        write_json_atomic(out / "metrics.json", metrics)
        write_record(out, st.name, identity, finished=True)
    return metrics
