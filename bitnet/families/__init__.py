"""The model families the pipeline supports, one module each, registered here by name.

Adding a family is one module (a :class:`~bitnet.families.base.ModelFamily`) plus one line in :data:`FAMILIES`;
every list of supported families or architectures elsewhere (convert, the GGUF plan and reader, the HF export,
the GGUF teacher loader, CLI choices, the run-time refusal) derives from this registry.
"""

from __future__ import annotations

from typing import Any

from bitnet.families import llama, mistral, qwen2, qwen3
from bitnet.families.base import BITNET, DecoderLayout, Features, Graph, ModelFamily, SubLN

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY)}


class UnsupportedFamilyError(ValueError):
    """A model type no registered family accepts."""


def model_types() -> list[str]:
    return sorted({t for f in FAMILIES.values() for t in f.model_types})


def family_for(model_type: str | None) -> ModelFamily:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UnsupportedFamilyError(f"architecture {model_type!r} is not supported; supported: {', '.join(model_types())}")


def family_of(model_or_config: Any) -> ModelFamily:
    """The family of a model (its ``config``) or of a config."""
    cfg = getattr(model_or_config, "config", model_or_config)
    return family_for(getattr(cfg, "model_type", None))


def graphs() -> dict[str, Graph]:
    """Every llama.cpp graph some family exports to, by name (``bitnet`` first)."""
    out: dict[str, Graph] = {BITNET.name: BITNET}
    for family in FAMILIES.values():
        out.update(family.graphs())
    return out


def graph_names() -> list[str]:
    return list(graphs())


__all__ = ["BITNET", "FAMILIES", "DecoderLayout", "Features", "Graph", "ModelFamily", "SubLN",
           "UnsupportedFamilyError", "family_for", "family_of", "graph_names", "graphs", "model_types"]
