"""bitdistill's library: turn a full-precision causal LM into a 1.58-bit (ternary) student, export it to GGUF.

The public API, imported lazily (``import bitnet`` stays cheap)::

    import bitnet
    student = bitnet.convert_to_bitnet(model, bitnet.BitNetConfig(subln="standard"))
    bitnet.save_student(student, "out/model", tokenizer)
    bitnet.export_gguf("out/model", "out/student.gguf")

Stages: ``bitnet.stages.STAGES``; configs: ``bitnet.config.load_config``.
"""

from __future__ import annotations

import importlib
from typing import Any

# name → module; importlib (not import statements) so that a stage's code digest does not pull in every module
_API = {
    "convert_to_bitnet": "bitnet.convert",
    "BitNetConfig": "bitnet.convert",
    "BitLinear": "bitnet.layers",
    "BitLinearLRC": "bitnet.layers",
    "SubLN": "bitnet.layers",
    "save_student": "bitnet.student",
    "load_student": "bitnet.student",
    "export_gguf": "bitnet.export.gguf",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'bitnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
