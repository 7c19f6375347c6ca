"""Checks a run makes before its first stage, from its config alone (no Prefect import here): :func:`preflight`.

:func:`check_export_target`: the student the pipeline will produce (teacher family + ``convert.bitnet.subln``) must
have a llama.cpp graph that ``export`` can write, and the world's tokenizer a llama.cpp tokenizer model that reproduces
it; otherwise the run is refused in its first seconds with a one-line error that names the alternatives — not at the
last stage, after the training budget is spent.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
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


def check_export_tokenizer(cfg: PipelineConfig) -> str | None:
    """``model/pre`` of the llama.cpp tokenizer the GGUF will carry (None: no export stage, the world trains its own
    byte-level BPE, or a hub tokenizer that cannot be read here); a one-line
    :class:`~bitnet.export.errors.UnsupportedExportError` when llama.cpp would tokenize differently."""
    from bitnet.pretrained import TeacherSourceNotFoundError, resolve_source

    name = cfg.world.tokenizer
    if not cfg.export.enabled or name is None:
        return None
    source = resolve_source(name)
    local = source.path or Path(source.source)
    version = local.stat().st_mtime_ns if local.exists() else 0  # a hub id: 0
    try:
        return _tokenizer_kind(source.source, cfg.export.tokenizer_pre, version)
    except TeacherSourceNotFoundError as e:
        if source.is_gguf:
            raise
        log.warning("export tokenizer not checked before training: %s", e)
        return None


@functools.lru_cache(maxsize=8)
def _tokenizer_kind(name: str, tokenizer_pre: str | None, version: int) -> str:
    """Cached per source and file version: a GGUF's tokenizer takes seconds to rebuild, and ``bitdistill run`` checks
    once before Prefect starts and once more inside the flow (what a deployment runs)."""
    from bitnet.export.errors import UnsupportedExportError
    from bitnet.export.vocab import tokenizer_kind
    from bitnet.pretrained import load_teacher_tokenizer

    try:
        kind = tokenizer_kind(load_teacher_tokenizer(name), tokenizer_pre=tokenizer_pre)
    except UnsupportedExportError as e:
        raise UnsupportedExportError(f"the world's tokenizer {name!r} cannot go into the GGUF: {e}") from e
    return f"{kind.model}/{kind.pre}" if kind.pre else kind.model


def check_export_target(cfg: PipelineConfig, hf: Any | None = None) -> str | None:
    """The llama.cpp graph the run's student will be exported to (None: no export stage, or no readable teacher
    config); raises :class:`~bitnet.families.exportable.StudentNotExportableError` when there is none, and checks the
    tokenizer (:func:`check_export_tokenizer`). ``hf``: the teacher config, when the caller has read it."""
    if not cfg.export.enabled:
        return None
    hf = hf if hf is not None else teacher_config(cfg)
    teacher = cfg.teacher.pretrained or "the tiny teacher"
    graph = None if hf is None else check_student_exportable(hf, cfg.convert.bitnet.subln, cfg.export.arch,
                                                             teacher=repr(teacher))
    check_export_tokenizer(cfg)
    return graph


def preflight(cfg: PipelineConfig) -> str | None:
    """Everything a run checks before its first stage: blocks that fit the teacher's positions, then the export
    target (:func:`check_export_target`, whose graph it returns)."""
    from bitnet.world import check_seq_len_fits

    hf = teacher_config(cfg)
    if hf is not None:
        check_seq_len_fits(cfg.world.seq_len, hf, f"teacher {cfg.teacher.pretrained or '(tiny)'}")
    return check_export_target(cfg, hf)
