"""The flow's parameter types, for the schema Prefect stores with each deployment (no Prefect import here).

``prefect deploy`` records the JSON schema of the flow's signature, and a server with ``enforce_parameter_schema``
validates every run's parameters against it before any process starts. So the signature carries the real types:
``preset`` is an enum of :data:`flows.config.PRESETS`, ``config`` a *partial* :class:`~flows.config.PipelineConfig`
(:func:`partial_model`: every field optional, nested sections partial too, unknown keys forbidden, the field
constraints kept). A typo (``kd.temprature``), an unknown preset or a value out of a field's range is refused by
``prefect deployment run`` itself; what needs the whole config (e.g. an LRC rank against the model's widths) is
checked in the first seconds of the run.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, create_model

from flows.config import PRESETS, PipelineConfig

PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]  # the presets, as an enum in the schema


def _partial_type(annotation: Any, cache: dict[type, type]) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return partial_model(annotation, cache)
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return Union[tuple(_partial_type(a, cache) for a in get_args(annotation))]  # noqa: UP007
    return annotation


def partial_model(model: type[BaseModel], cache: dict[type, type] | None = None) -> type[BaseModel]:
    """``model`` with every field optional (default None), nested models partial too, ``extra="forbid"``, and each
    field's constraints (``ge``, ``gt``, ``Literal`` values, ...) kept: the schema of a partial override."""
    cache = {} if cache is None else cache
    if model not in cache:
        fields: dict[str, Any] = {}
        for name, f in model.model_fields.items():
            annotation = _partial_type(f.annotation, cache)
            if f.metadata:
                annotation = Annotated[annotation, *f.metadata]
            fields[name] = (annotation | None, Field(default=None, description=f.description, alias=f.alias))
        cache[model] = create_model(f"{model.__name__}Overrides", __config__=ConfigDict(extra="forbid"),
                                    __doc__=f"A partial {model.__name__}: only the keys to change.", **fields)
    return cache[model]


class PipelineOverrides(partial_model(PipelineConfig)):  # type: ignore[misc]
    """A partial PipelineConfig merged over the preset (``{"kd": {"temperature": 2.0}}``)."""

    preset: PresetName | None = None  # type: ignore[valid-type]
