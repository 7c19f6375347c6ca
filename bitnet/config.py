"""One config path for every command and the flow: read a YAML/JSON file, merge layers, apply ``a.b.c=value``
overrides, validate with pydantic; every failure is one line (:class:`ConfigError`).

A config is built from layers, lowest first: the class defaults (the ``tiny`` values), a preset (a mapping), a
``--config`` file, then dotted overrides (``--set train.max_steps=20`` or a command's own flags). Mappings merge
key by key; anything else replaces.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be read or validated (printed as one line by the CLI, exit code 2)."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML/JSON config file (an empty file is ``{}``)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {file} does not exist")
    try:
        loaded = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {file} is not valid YAML/JSON: {str(e).splitlines()[0]}") from e
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {file} must hold a mapping, got {type(loaded).__name__}")
    return loaded or {}


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge recursively, other values replace; a mapping with another
    ``kind`` (e.g. a text source of another kind) replaces the base mapping as a whole."""
    out = dict(base)
    for k, v in over.items():
        b = out.get(k)
        same = isinstance(v, Mapping) and isinstance(b, Mapping) and v.get("kind", b.get("kind")) == b.get("kind")
        out[k] = deep_merge(b, v) if same else v  # type: ignore[arg-type]
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b.c=value"`` → ``("a.b.c", value)``; the value is parsed as YAML (``3``, ``true``, ``[1, 2]``, ``x``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def dotted(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1, "a.c": None}`` → ``{"a": {"b": 1}}`` (``None`` means "not given" and is dropped)."""
    out: dict[str, Any] = {}
    for path, value in overrides.items():
        if value is None:
            continue
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {path} conflicts with another override of {p}")
        node[leaf] = value
    return out


def validate(model: type[T], data: Mapping[str, Any]) -> T:
    """``model.model_validate(data)``, the first error as a one-line :class:`ConfigError`."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"]) or "<root>"
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(f"invalid {model.__name__}: {loc}: {msg} ({e.error_count()} error(s))") from e


def load_config(
    model: type[T],
    file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
    sets: list[str] | None = None,
) -> T:
    """``model`` from its defaults, then ``base`` (a preset), ``file``, ``overrides`` (dotted keys) and ``sets``
    (``a.b=value`` strings), each layer merged over the previous one.

    The defaults are dumped first, so a partial nested mapping (``{"train": {"max_steps": 5}}``) keeps the
    stage's own nested defaults (its learning rate, warm-up) instead of the nested class's.
    """
    data = deep_merge(model().model_dump(mode="json"), base or {})
    if file:
        data = deep_merge(data, read_config_file(file))
    data = deep_merge(data, dotted(overrides or {}))
    data = deep_merge(data, dotted(dict(parse_override(s) for s in sets or [])))
    return validate(model, data)
