"""Errors of the GGUF export and reader (both ``ValueError``: the CLI prints them as one line)."""

from __future__ import annotations


class UnsupportedExportError(ValueError):
    """The student (or its tokenizer) has something llama.cpp's ``bitnet`` graph cannot express."""


class GGUFFormatError(ValueError):
    """A GGUF file is missing, truncated, corrupted or not what it claims to be."""
