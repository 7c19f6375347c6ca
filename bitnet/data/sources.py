"""Text sources (local dir, any fsspec URL, HF datasets) and their documents."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from bitnet.config import has_credentials, secret_options
from bitnet.data.errors import DataError
from bitnet.io import sha256_json

log = logging.getLogger("bitdistill.data")

_GLOB_MAGIC = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class Document:
    """One text document; ``id`` is a relative path (files) or ``"{split}/{index}"`` (hf rows)."""

    id: str
    text: str


class TextSource(BaseModel):
    """Where documents come from; the fields required depend on ``kind``.

    * ``dir``: ``path`` (local directory) and ``glob`` (relative pattern, ``**`` spans directories).
    * ``fsspec``: ``url`` (a file, a directory filtered by ``glob``, or a glob URL) and ``storage_options``.
    * ``hf``: ``name`` (hub dataset or builder such as ``json``), ``config_name``, ``data_files``, ``split``,
      ``text_field``, ``streaming``.

    No credentials: a source is part of the world's config, which run records store (Prefect parameters, manifests,
    MLflow); a URL with ``user:password@`` or a secret query parameter, and secret-looking ``storage_options``
    (:func:`bitnet.config.secret_options`), are refused. They come from the environment or fsspec's config.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    kind: Literal["dir", "fsspec", "hf"]
    path: str | None = None
    glob: str = "**/*.txt"
    url: str | None = None
    storage_options: dict[str, Any] | None = None
    name: str | None = None
    config_name: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _data_error(e) from None

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Self:
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as e:
            raise _data_error(e) from None

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, *args: Any, **kwargs: Any) -> Self:
        try:
            return super().model_validate_json(json_data, *args, **kwargs)
        except ValidationError as e:
            raise _data_error(e) from None

    @model_validator(mode="after")
    def _required_for_kind(self) -> TextSource:
        required = {"dir": ("path",), "fsspec": ("url",), "hf": ("name",)}[self.kind]
        missing = [f for f in required if not getattr(self, f)]
        if missing:
            raise ValueError(f"kind={self.kind!r} requires {', '.join(missing)}")
        if not self.glob:
            raise ValueError("glob must not be empty")
        return self

    @model_validator(mode="after")
    def _no_credentials(self) -> TextSource:
        hint = "set them in the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN) or fsspec's config"
        bad = [f"{name}: a URL with credentials" for name, value in self._locations() if has_credentials(value)]
        bad += secret_options(self.storage_options or {}, "storage_options.")
        if bad:
            raise ValueError(f"the source must not hold credentials ({'; '.join(bad)}): it would be stored in run "
                             f"records; {hint}")
        return self

    def _locations(self) -> Iterator[tuple[str, str]]:
        """(field, value) of every place a URL can be given: ``url``, ``path`` and each of ``data_files``."""
        yield from (("url", self.url or ""), ("path", self.path or ""))
        files = self.data_files
        groups = files.items() if isinstance(files, dict) else [("", files)]
        for split, group in groups:
            for f in [group] if isinstance(group, str) else group or []:
                yield (f"data_files.{split}" if split else "data_files"), f


def _data_error(e: ValidationError) -> DataError:
    """One-line DataError from a pydantic ValidationError (unwrapping one raised by ``__init__``)."""
    parts = []
    for err in e.errors():
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, DataError):
            return inner
        loc = ".".join(map(str, err["loc"])) or "source"
        parts.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
    return DataError(f"invalid TextSource: {'; '.join(parts)}")


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a relative glob (``*``, ``?``, ``[...]``, ``**`` across directories) to a full-match regex."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (j := pattern.find("]", i + 1)) > i + 1:
            body = pattern[i + 1 : j]
            out.append("[^" + re.escape(body[1:]) + "]" if body[0] in "!^" else "[" + re.escape(body) + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


PYTHON_DOCS_DIR = "/usr/share/doc/python3.11-doc/html/_sources"  # the offline corpus (Debian python3.11-doc)
_INSTALL_HINT = f"python3.11-doc is not installed: apt-get install python3.11-doc (expected {PYTHON_DOCS_DIR})"


def missing_corpus_hint(path: str) -> str | None:
    """Install hint for a known corpus directory, else None."""
    return _INSTALL_HINT if Path(path) == Path(PYTHON_DOCS_DIR) else None


def _missing_dir_message(root: Path) -> str:
    return missing_corpus_hint(str(root)) or f"source directory does not exist: {root}"


def _list_dir(source: TextSource) -> list[tuple[str, Path]]:
    root = Path(source.path or "").expanduser()
    if not root.is_dir():
        raise DataError(_missing_dir_message(root))
    rx = glob_regex(source.glob)
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if rx.match(rel) and p.is_file():
            files.append((rel, p))
    return sorted(files)


def _list_fsspec(source: TextSource) -> tuple[Any, list[tuple[str, str, dict[str, Any]]]]:
    """Return ``(fs, [(doc_id, fs_path, info), ...])`` sorted by id."""
    import fsspec

    url = source.url or ""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(source.storage_options or {}))
    except (ValueError, ImportError) as e:
        raise DataError(f"cannot open fsspec url {url!r}: {e}") from e
    path = path.rstrip("/") or path
    if _GLOB_MAGIC.search(path):
        base = path[: _GLOB_MAGIC.search(path).start()].rpartition("/")[0]  # type: ignore[union-attr]
        infos = fs.glob(path, detail=True)
    elif fs.isdir(path):
        base = path
        rx = glob_regex(source.glob)
        infos = {p: i for p, i in fs.find(path, detail=True).items() if rx.match(_rel(p, base))}
    elif fs.isfile(path):
        base = path.rpartition("/")[0]
        infos = {path: fs.info(path)}
    else:
        raise DataError(f"fsspec url does not exist: {url}")
    files = [(_rel(p, base), p, i) for p, i in infos.items() if i.get("type", "file") == "file"]
    return fs, sorted(files, key=lambda t: t[0])


def _rel(path: str, base: str) -> str:
    base = base.rstrip("/")
    if base and path.startswith(base + "/"):
        return path[len(base) + 1 :]
    return path.lstrip("/")


def iter_documents(source: TextSource, *, skipped: list[str] | None = None) -> Iterator[Document]:
    """Yield the source's non-blank documents in a deterministic order; raise DataError if there are none.

    Binary or undecodable files (a NUL byte, or a quarter of the characters not UTF-8) are skipped; their ids are
    appended to ``skipped`` and counted in the error when nothing is left.
    """
    skipped = skipped if skipped is not None else []
    if source.kind == "dir":
        files = _list_dir(source)
        where = f"{source.path} (glob {source.glob!r})"
        gen: Iterator[Document] = _decoded(((rel, p.read_bytes()) for rel, p in files), skipped)
    elif source.kind == "fsspec":
        fs, entries = _list_fsspec(source)
        where = str(source.url)
        gen = _decoded(((rel, _read_fs(fs, p)) for rel, p, _ in entries), skipped)
    else:
        gen = _iter_hf(source)
        where = f"hf dataset {source.name!r} split {source.split!r}"
    return _nonempty(gen, where, skipped)


MAX_UNDECODABLE = 0.25  # share of characters that may be invalid UTF-8 (stray Latin-1 bytes); random bytes: ~1/2


def decode_text(raw: bytes) -> str | None:
    """``raw`` as text, or ``None`` for binary data (a NUL byte) or mostly non-UTF-8 bytes."""
    if b"\0" in raw[: 1 << 16]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text if text.count("\ufffd") <= MAX_UNDECODABLE * len(text) else None


def _decoded(files: Iterator[tuple[str, bytes]], skipped: list[str]) -> Iterator[Document]:
    for rel, raw in files:
        text = decode_text(raw)
        if text is None:
            skipped.append(rel)
            continue
        yield Document(rel, text)


def _read_fs(fs: Any, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def _nonempty(gen: Iterator[Document], where: str, skipped: list[str]) -> Iterator[Document]:
    n = 0
    for doc in gen:
        if doc.text.strip():
            n += 1
            yield doc
    if skipped:
        log.warning("%s: skipped %d binary or undecodable file(s), e.g. %s", where, len(skipped), skipped[0])
    if n == 0:
        extra = f"; {len(skipped)} binary or undecodable file(s) skipped, e.g. {skipped[0]}" if skipped else ""
        raise DataError(f"no documents (non-blank texts) found in {where}{extra}")


def _iter_hf(source: TextSource) -> Iterator[Document]:
    import datasets

    try:
        ds = datasets.load_dataset(
            source.name,
            source.config_name,
            data_files=source.data_files,
            split=source.split,
            streaming=source.streaming,
        )
    except (FileNotFoundError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load hf dataset {source.name!r}: {first}") from e
    for i, row in enumerate(ds):
        if source.text_field not in row:
            raise DataError(
                f"hf dataset {source.name!r} has no field {source.text_field!r} (fields: {sorted(row)})"
            )
        text = row[source.text_field]
        if text is not None:
            yield Document(f"{source.split}/{i}", str(text))


_INFO_KEYS = ("size", "ETag", "etag", "md5", "md5Hash", "crc32c", "mtime", "LastModified", "last_modified",
              "updated", "created", "generation")


def source_digest(source: TextSource) -> str:
    """Hash of the source config plus file names, sizes and mtimes/etags (no file contents are read)."""
    cfg = source.model_dump(mode="json")
    listing: list[Any] = []
    if source.kind == "dir":
        for rel, p in _list_dir(source):
            st = p.stat()
            listing.append([rel, st.st_size, st.st_mtime_ns])
    elif source.kind == "fsspec":
        _, entries = _list_fsspec(source)
        for rel, _, info in entries:
            listing.append([rel, {k: str(info[k]) for k in _INFO_KEYS if info.get(k) is not None}])
    else:
        for f in _flat_data_files(source.data_files):
            p = Path(f)
            if not _GLOB_MAGIC.search(f) and p.is_file():
                st = p.stat()
                listing.append([f, st.st_size, st.st_mtime_ns])
    return sha256_json({"source": cfg, "files": listing})


def _flat_data_files(files: str | list[str] | dict[str, str | list[str]] | None) -> list[str]:
    values: list[str | list[str]] = list(files.values()) if isinstance(files, dict) else [files or []]
    return [f for v in values for f in ([v] if isinstance(v, str) else v)]
