"""``STAGES``: every stage of the pipeline by name (adding a stage = its module + one line here), and
:func:`run_stage`, the one way the CLI, the flow's worker and the benchmarks run a stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from bitnet.io import finite, write_json_atomic
from bitnet.stages import convert, cpt, export, kd, layerwise, lrc, select, teacher, world
from bitnet.stages import eval as evaluation
from bitnet.stages.base import Inputs, Stage

STAGES: dict[str, Stage[Any]] = {
    s.STAGE.name: s.STAGE for s in (world, teacher, convert, layerwise, cpt, kd, lrc, select, export, evaluation)
}


def stage(name: str) -> Stage[Any]:
    """The stage called ``name``; a one-line error naming the known ones otherwise."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")
    return STAGES[name]


def run_stage(name: str, cfg: BaseModel, inputs: Inputs, out: str | Path) -> dict[str, Any]:
    """Run stage ``name`` with ``cfg`` on ``inputs`` into ``out``; rank 0 writes ``out/metrics.json`` last."""
    st = stage(name)
    if not isinstance(cfg, st.config):
        raise TypeError(f"stage {name} takes a {st.config.__name__}, got {type(cfg).__name__}")
    st.check_inputs(inputs)
    out = Path(out)
    metrics = finite(st.run(cfg, {k: Path(v) for k, v in inputs.items()}, out))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        write_json_atomic(out / "metrics.json", metrics)
    return metrics
