"""Export of BitNet students: GGUF for llama.cpp (``bitnet``, ``llama``, ``qwen2``, ``qwen3`` graphs, exact ternary
type plan), LRC as a LoRA adapter, and a Hugging Face checkpoint."""

from bitnet.export.errors import GGUFFormatError, UnsupportedExportError
from bitnet.export.gguf import ExportResult, check_exportable, export_gguf
from bitnet.export.plan import ExportPlan, TensorPlan, plan_export
from bitnet.export.reader import (
    ForeignGGUFWarning,
    GGUFCheck,
    check_gguf,
    read_gguf_checked,
)

__all__ = [
    "ExportPlan",
    "ExportResult",
    "ForeignGGUFWarning",
    "GGUFCheck",
    "GGUFFormatError",
    "TensorPlan",
    "UnsupportedExportError",
    "check_exportable",
    "check_gguf",
    "export_gguf",
    "plan_export",
    "read_gguf_checked",
]
