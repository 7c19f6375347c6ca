"""Deterministic, hash-based train/validation/test assignment of documents."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Literal

from bitnet.data.errors import DataError
from bitnet.data.sources import Document

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, Split, Split] = ("train", "validation", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.98, 0.01, 0.01)


def _unit(seed: int, key: str) -> float:
    """Map ``(seed, key)`` to a uniform float in [0, 1) with sha256."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _normalise(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(not f >= 0 for f in fractions) or sum(fractions) <= 0:
        raise DataError(f"split fractions must be 3 non-negative numbers with a positive sum, got {tuple(fractions)}")
    total = float(sum(fractions))
    return (fractions[0] / total, fractions[1] / total, fractions[2] / total)


def split_of(doc_id: str, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> Split:
    """The split of ``doc_id``: a pure function of ``(seed, doc_id, fractions)``."""
    fr = _normalise(fractions)
    u = _unit(seed, doc_id)
    cum = 0.0
    for name, f in zip(SPLITS, fr, strict=True):
        cum += f
        if f > 0 and u < cum:
            return name
    return next(name for name, f in zip(reversed(SPLITS), reversed(fr), strict=True) if f > 0)


def split_documents(
    docs: Iterable[Document], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, list[Document]]:
    """Group documents by :func:`split_of`, keeping input order.

    Every split with a non-zero fraction gets at least one document when there are enough documents (one per
    such split); an empty split takes, deterministically, one document from the currently largest split that
    can spare one. With too few documents some splits stay empty (empty ones are filled in train,
    validation, test order).
    """
    fr = _normalise(fractions)
    docs = list(docs)
    assign = {i: split_of(d.id, fr, seed) for i, d in enumerate(docs)}
    members: dict[str, list[int]] = {s: [i for i, a in assign.items() if a == s] for s in SPLITS}
    for target, f in zip(SPLITS, fr, strict=True):
        if f == 0 or members[target]:
            continue
        donors = [s for s in SPLITS if s != target and len(members[s]) > 1]
        if not donors:
            continue
        donor = max(donors, key=lambda s: (len(members[s]), -SPLITS.index(s)))
        pick = min(members[donor], key=lambda i: _unit(seed, f"move-to-{target}\x00{docs[i].id}"))
        members[donor].remove(pick)
        members[target].append(pick)
    return {s: [docs[i] for i in sorted(members[s])] for s in SPLITS}
