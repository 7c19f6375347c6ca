"""A tiny local corpus: the reStructuredText sources of the Python 3.11 docs (Debian ``python3.11-doc``, PSF
licence)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from bitnet.data.errors import DataError
from bitnet.data.sources import PYTHON_DOCS_DIR, Document, TextSource, iter_documents, missing_corpus_hint

PYTHON_DOCS_GLOB = "**/*.rst.txt"


def python_docs_available() -> bool:
    return Path(PYTHON_DOCS_DIR).is_dir() and any(Path(PYTHON_DOCS_DIR).glob("*.rst.txt"))


def python_docs_source() -> TextSource:
    """A ``dir`` source over the Python docs; iterating it raises DataError with an install hint if absent."""
    return TextSource(kind="dir", path=PYTHON_DOCS_DIR, glob=PYTHON_DOCS_GLOB)


def iter_python_docs(clean: bool = True) -> Iterator[Document]:
    """Documents of the Python docs corpus, optionally passed through :func:`clean_rst`."""
    if not python_docs_available():
        raise DataError(missing_corpus_hint(PYTHON_DOCS_DIR) or PYTHON_DOCS_DIR)
    for doc in iter_documents(python_docs_source()):
        text = clean_rst(doc.text) if clean else doc.text
        if text.strip():
            yield Document(doc.id, text)


_UNDERLINE = re.compile(r"^\s*[=\-~^\"'`#*+_]{3,}[=\-~^\"'`#*+_\s]*$")
_LABEL = re.compile(r"^\s*\.\.\s+_[^:]*:.*$")
_NOISE_DIRECTIVE = re.compile(
    r"^(\s*)\.\.\s+(index|highlight|sectionauthor|moduleauthor|currentmodule|module|toctree|testsetup|testcleanup)::"
)
_ROLE = re.compile(r"(?::[\w.+-]+)+:`([^`]+)`")
_TITLED = re.compile(r"^(.*?)\s*<[^<>]*>$", re.DOTALL)


def _role_text(m: re.Match[str]) -> str:
    inner = m.group(1)
    if (t := _TITLED.match(inner)) and t.group(1):
        return t.group(1)
    if inner.startswith("~"):
        return inner[1:].rsplit(".", 1)[-1]
    return inner.lstrip("!")


def clean_rst(text: str) -> str:
    """Drop pure-markup reST lines (section underlines, ``.. _label:`` targets, index/module-like directives with
    their indented options/bodies), turn roles like ``:ref:`Title <label>``` into their text, squeeze blank lines."""
    out: list[str] = []
    skip_indent: int | None = None
    for line in text.splitlines():
        if skip_indent is not None:
            if not line.strip() or len(line) - len(line.lstrip()) > skip_indent:
                continue
            skip_indent = None
        if m := _NOISE_DIRECTIVE.match(line):
            skip_indent = len(m.group(1))
            continue
        if _UNDERLINE.match(line) or _LABEL.match(line):
            continue
        line = _ROLE.sub(_role_text, line)
        if not line.strip() and (not out or not out[-1].strip()):
            continue
        out.append(line.rstrip())
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out) + ("\n" if out else "")
