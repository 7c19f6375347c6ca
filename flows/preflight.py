"""Checks a run makes before its first stage, from its config alone (no Prefect import here).

:func:`check_export_target`: the student the pipeline will produce (teacher family + ``convert.bitnet.subln``) must
have a llama.cpp graph that ``export`` can write, or the run is refused in its first second with a one-line error
that names the alternatives — not at the last stage, after the training budget is spent.
"""

from __future__ import annotations

import logging
from typing import Any

from bitnet.families.exportable import check_student_exportable
from flows.config import PipelineConfig

log = logging.getLogger(__name__)


def teacher_config(cfg: PipelineConfig) -> Any | None:
    """The teacher's transformers config, without weights; None when a hub id's config cannot be read here (the
    teacher stage, possibly on another machine, reads it later)."""
    from bitnet.pretrained import TeacherSourceNotFoundError, load_teacher_config, resolve_source
    from bitnet.teacher import tiny_teacher_config

    if cfg.teacher.pretrained is None:
        return tiny_teacher_config(cfg.teacher.model, vocab_size=cfg.world.vocab_size)
    source = resolve_source(cfg.teacher.pretrained)  # a missing GGUF or named source: its one-line error, now
    try:
        return load_teacher_config(source.source)
    except TeacherSourceNotFoundError as e:
        if source.is_gguf:
            raise
        log.warning("export target not checked before training: %s", e)
        return None


def check_export_target(cfg: PipelineConfig) -> str | None:
    """The llama.cpp graph the run's student will be exported to (None: no export stage, or no readable teacher
    config); raises :class:`~bitnet.families.exportable.StudentNotExportableError` when there is none."""
    if not cfg.export.enabled:
        return None
    hf = teacher_config(cfg)
    if hf is None:
        return None
    teacher = cfg.teacher.pretrained or "the tiny teacher"
    return check_student_exportable(hf, cfg.convert.bitnet.subln, cfg.export.arch, teacher=repr(teacher))
