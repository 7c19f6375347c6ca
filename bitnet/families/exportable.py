"""Whether the student a pipeline will produce can be exported, from the teacher's config alone (before training).

:func:`check_student_exportable` is what ``bitdistill run`` and the flow run before the first stage; the same rules
(:meth:`ModelFamily.graph_refusal`) are what the GGUF export checks again on the trained student's real weights.
"""

from __future__ import annotations

from typing import Any

from bitnet.families import UnsupportedFamilyError, family_for, model_types
from bitnet.families.base import SubLN

PLACEMENTS: tuple[SubLN, ...] = ("standard", "none", "all")


class StudentNotExportableError(ValueError):
    """The configured student cannot be written to the configured llama.cpp target."""


def exportable_placements(cfg: Any) -> dict[str, str]:
    """SubLN placement → the llama.cpp graph its student of ``cfg`` goes to, for every placement that exports."""
    family = family_for(getattr(cfg, "model_type", None))
    out = {}
    for subln in PLACEMENTS:
        if family.export_refusal(cfg, subln) is None:
            out[subln] = family.graph_for(subln).name
    return out


def check_student_exportable(cfg: Any, subln: SubLN, arch: str = "auto", *, teacher: str = "the teacher") -> str:
    """The graph the student of teacher config ``cfg`` with SubLN ``subln`` exports to; a one-line
    :class:`StudentNotExportableError` naming the alternatives otherwise."""
    model_type = getattr(cfg, "model_type", None)
    try:
        family = family_for(model_type)
    except UnsupportedFamilyError as e:
        raise StudentNotExportableError(f"{teacher} is a {model_type!r} model; supported families: "
                                        f"{', '.join(model_types())} (bitnet.families)") from e
    why = family.export_refusal(cfg, subln, arch)
    if why is None:
        return family.graph_for(subln, arch).name
    ok = exportable_placements(cfg)
    alternatives = [f"convert.bitnet.subln={s} (llama.cpp {g!r})" for s, g in ok.items() if s != subln]
    if arch != "auto":
        alternatives.append("export.arch=auto")
    alternatives.append("disable the export stage (export.enabled=false) and use the HF export")
    raise StudentNotExportableError(
        f"the {family.name} student of {teacher} with SubLN {subln!r} cannot be exported to llama.cpp: {why}; "
        f"set {' or '.join(alternatives)} (docs/export.md)")
