"""Error type shared by the data package."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input: missing path, empty corpus, malformed config or corrupt cache (one-line message)."""

