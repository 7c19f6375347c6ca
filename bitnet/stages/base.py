"""What a stage is: a name, a pydantic config class, the inputs it reads and ``run(cfg, inputs, out) -> metrics``.

``inputs`` maps an input name (``world``, ``teacher``, ``student``, ``naive``, ``model``) to a local directory: the
output directory of the stage that produced it. ``out`` is the stage's own output directory; a stage writes its
files there (a student under ``out/model``) and returns its metrics (JSON-able). Training stages resume from their
checkpoints under ``out/train``.

Kept free of torch imports: a stage's code digest follows its module's imports, and the world build must not
change key when the trainer changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from bitnet.io import model_dir  # noqa: F401  (re-exported: the stages import it from here)

C = TypeVar("C", bound=BaseModel)
Inputs = Mapping[str, Path]
RunFn = Callable[[C, Inputs, Path], dict[str, Any]]

PRETRAINED_RECORD = "pretrained.json"  # a teacher stage that records a hub id / local path instead of copying it


@dataclass(frozen=True)
class Stage(Generic[C]):
    """One pipeline stage (see the module doc)."""

    name: str
    config: type[C]
    run: RunFn[C]
    inputs: tuple[str, ...] = ()
    optional_inputs: tuple[str, ...] = ()
    reuse_in_eval_only: bool = True  # an eval-only (reuse-only) run must find it finished, never compute it
    fingerprint: Callable[[C], dict[str, Any]] | None = None  # key material beyond the config (e.g. a corpus listing)
    help: str = ""

    @property
    def module(self) -> str:
        """The module whose import closure is the stage's code (cache keys)."""
        return self.run.__module__

    def check_inputs(self, inputs: Inputs) -> None:
        missing = [n for n in self.inputs if n not in inputs]
        unknown = [n for n in inputs if n not in self.inputs + self.optional_inputs]
        if missing or unknown:
            detail = (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else "")
            raise ValueError(f"stage {self.name} needs inputs {list(self.inputs)}{detail}")


def teacher_source(path: str | Path) -> str:
    """What ``load_teacher`` gets for a teacher input: its ``model/`` directory, or the hub id / path that a
    teacher stage recorded instead of copying, or ``path`` itself (a plain HF directory or hub id)."""
    p = Path(path)
    if (p / PRETRAINED_RECORD).is_file() and not (p / "model" / "config.json").is_file():
        return str(json.loads((p / PRETRAINED_RECORD).read_text())["pretrained"])
    return str(model_dir(p)) if p.exists() else str(path)
