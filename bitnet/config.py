"""One config path for every command and the flow: read a YAML/JSON file, merge layers, apply ``a.b.c=value``
overrides, validate with pydantic; every failure is one line (:class:`ConfigError`). Also what keeps credentials
out of configs and out of what is printed about them (:func:`redact_uri`, :func:`secret_options`).

A config is built from layers, lowest first: the class defaults (the ``tiny`` values), a preset (a mapping), a
``--config`` file, then dotted overrides (``--set train.max_steps=20`` or a command's own flags). Mappings merge
key by key (unless their ``kind``/``backend`` differs); anything else replaces.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

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


# keys whose value picks a mapping's type (a discriminated union): a mapping with another value is another type
DISCRIMINATORS = ("kind", "backend")


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge recursively, other values replace; a mapping with another
    ``kind`` or ``backend`` (:data:`DISCRIMINATORS`: a text source of another kind, a stage's compute on another
    backend) replaces the base mapping as a whole, so no key of the other type is left behind."""
    out = dict(base)
    for k, v in over.items():
        b = out.get(k)
        same = isinstance(v, Mapping) and isinstance(b, Mapping) and all(
            v.get(d, b.get(d)) == b.get(d) for d in DISCRIMINATORS)
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
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        # from None: pydantic's own message repeats the input values (a refused credential too) in every
        # traceback that chains it, and Prefect stores a flow's traceback in its database
        raise ConfigError(f"invalid {model.__name__}: {loc}: {msg} ({e.error_count()} error(s))") from None


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


# ------------------------------------------------------------------------------------------------ credentials
# A key (of storage options, of a URL's query) names a credential when, lower-cased with ``-`` and camelCase
# turned into ``_``, it contains one of _SECRET_PARTS, or one of its ``_`` words is in _SECRET_WORDS or ends in
# "key" (secretkey, apikey). Short words match whole only: "sk"/"ak" (secret/access key, as in AK/SK pairs) but
# not skip_instance_cache, "sig" (Azure SAS) but not signal. _NOT_SECRET_NAMES: options that match and are not.
_SECRET_PARTS = ("secret", "password", "passwd", "token", "credential", "private", "signature", "key_id",
                 "access_key", "account_key", "sas", "auth", "session", "cookie")
_SECRET_WORDS = frozenset({"key", "sk", "ak", "pass", "pwd", "pw", "psk", "sig"})
_NOT_SECRET_NAMES = frozenset({"signature_version"})  # botocore's config_kwargs: "s3v4"
# values that some fsspec options take that are modes, not credentials (gcsfs token="anon", "google_default")
_NOT_SECRETS = frozenset({"anon", "google_default", "cloud", "browser", "cache"})

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_TOKEN = re.compile(r"[A-Za-z0-9+/=_-]{32,}")
_HEX = re.compile(r"[0-9a-fA-F]{32,}")
MASK = "***"


def secret_name(name: object) -> bool:
    """Whether a key (a storage option, a URL query parameter) names a credential (rules above)."""
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(name)).lower().replace("-", "_")
    if text in _NOT_SECRET_NAMES:
        return False
    words = re.split(r"[_.]", text)
    return any(p in text for p in _SECRET_PARTS) or any(w in _SECRET_WORDS or w.endswith("key") for w in words)


def token_like(value: str) -> bool:
    """A long random-looking token: 32+ characters of the base64/base64url alphabet with upper- and lower-case
    letters and digits (AWS secret keys, HF/GitHub tokens, JWT parts), or 32+ hex digits (API keys). Endpoints,
    regions, bucket names, profile names and paths do not look like that (a path starts with ``/``; dots, colons
    and spaces break the run); an S3 version id does, and is refused as well."""
    if value.startswith("/") or not (_TOKEN.fullmatch(value) or _HEX.fullmatch(value)):
        return False
    return bool(_HEX.fullmatch(value)) or all(re.search(c, value) for c in ("[A-Z]", "[a-z]", "[0-9]"))


def _split_uri(uri: str) -> tuple[str, str, str, str, str] | None:
    """``scheme://`` (or None for a string that is not a URI), userinfo, host and path, query, fragment. The
    userinfo ends at the last ``@`` of the authority, which runs to the first ``/`` unless what precedes it is
    ``user:password`` with an unencoded ``/`` in the password (``host:8080/`` is a port)."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*://)(.*)", uri, re.S)
    if m is None:
        return None
    scheme, rest = m.groups()
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    userinfo, at, host = rest.rpartition("@")
    if at and "/" in userinfo and not re.match(r"[^/]*:(?!\d*(?:/|$))", userinfo):
        userinfo, host = "", rest  # an "@" in the path (.../user@example.com), not credentials
    elif not at:
        userinfo = ""
    return scheme, userinfo, host, query if "?" in uri else "", fragment if "#" in uri else ""


def _secret_parts(uri: str) -> list[str]:
    """The secrets inside a URI: the password of its userinfo (or a token-like user name) and the values of
    secret-named query parameters."""
    parts = _split_uri(uri)
    if parts is None:
        return []
    _, userinfo, _, query, _ = parts
    user, colon, password = userinfo.partition(":")
    found = [password] if colon and password else [user] if user and token_like(unquote(user)) else []
    for item in re.split(r"[&;]", query):
        key, eq, value = item.partition("=")
        if eq and value and secret_name(unquote(key)):
            found.append(value)
    return found


def redact_uri(uri: str) -> str:
    """``uri`` with its credentials replaced by ``***``: ``http://user:***@host/...``, ``...?token=***`` (the query
    parameters that :func:`secret_name` flags, e.g. ``X-Amz-Signature``, ``sig``, ``access_token``); a user name
    alone stays unless it is :func:`token_like`. Anything that is not a URI is returned as it is."""
    parts = _split_uri(uri)
    if parts is None or not _secret_parts(uri):
        return uri
    scheme, userinfo, host, query, fragment = parts
    user, colon, password = userinfo.partition(":")
    if colon and password:
        userinfo = f"{user}:{MASK}"
    elif user and token_like(unquote(user)):
        userinfo = MASK
    items = []
    for item in re.split(r"([&;])", query):
        key, eq, value = item.partition("=")
        items.append(f"{key}={MASK}" if eq and value and secret_name(unquote(key)) else item)
    out = scheme + (f"{userinfo}@" if userinfo else "") + host
    return out + ("?" + "".join(items) if "?" in uri else "") + ("#" + fragment if "#" in uri else "")


def has_credentials(uri: str) -> bool:
    """Whether :func:`redact_uri` would hide something in ``uri``."""
    return bool(_secret_parts(uri))


def redact_text(text: str, *uris: str) -> str:
    """``text`` (a log line, an error message) with every URI in it redacted, and the secrets of ``uris`` removed
    wherever they appear on their own (a library's error may quote a password outside its URI)."""
    out = _URI.sub(lambda m: redact_uri(m.group()), text)
    for secret in sorted({s for u in uris for s in _secret_parts(u) if s}, key=len, reverse=True):
        out = out.replace(secret, MASK)
    return out


def secret_value(value: str) -> str | None:
    """Why a string looks like a credential whatever key holds it (None when it does not): a URI with
    credentials, an AWS access key id, a PEM private key, or a :func:`token_like` string."""
    if has_credentials(value):
        return "a URL with credentials"
    if _AWS_KEY_ID.search(value):
        return "an AWS access key id"
    if _PRIVATE_KEY.search(value):
        return "a private key"
    return "a token-like value" if token_like(value) else None


def secret_options(options: object, prefix: str = "") -> list[str]:
    """Where (nested) fsspec-style ``options`` hold credentials, as ``key: why`` entries that never quote a value:
    a key that :func:`secret_name` flags and whose value is set (not None, a bool or a mode such as ``anon``), or a
    string value that :func:`secret_value` flags under any key (``endpoint_url: http://KEY:SECRET@host``)."""
    found: list[str] = []
    if isinstance(options, Mapping):
        for k, v in options.items():
            harmless = v is None or isinstance(v, bool) or (isinstance(v, str) and v in _NOT_SECRETS)
            if not harmless and secret_name(k):
                found.append(f"{prefix}{k}: a credential's name")
            elif isinstance(v, Mapping | list | tuple | str):
                found += secret_options(v, f"{prefix}{k}.")
    elif isinstance(options, list | tuple):
        for i, v in enumerate(options):
            found += secret_options(v, f"{prefix}{i}.")
    elif isinstance(options, str) and (why := secret_value(options)) is not None:
        found.append(f"{prefix.rstrip('.') or 'value'}: {why}")
    return found


def refuse_credentials(uri: str | None, what: str, instead: str) -> None:
    """A ``ValueError`` (for a pydantic validator) when ``uri`` holds credentials: it names ``what`` and where the
    credentials belong (``instead``), and shows the URI redacted."""
    if uri is not None and has_credentials(uri):
        raise ValueError(f"{what} must not hold credentials ({redact_uri(uri)}): a config is stored in run records "
                         f"(Prefect flow-run parameters, MLflow); {instead}")
