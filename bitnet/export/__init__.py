"""Export of BitNet students: GGUF for llama.cpp's ``bitnet`` architecture, LRC as a LoRA adapter."""

from bitnet.export.errors import GGUFFormatError, UnsupportedExportError
from bitnet.export.gguf import ExportResult, check_exportable, export_gguf
from bitnet.export.reader import read_gguf_checked

__all__ = [
    "ExportResult",
    "GGUFFormatError",
    "UnsupportedExportError",
    "check_exportable",
    "export_gguf",
    "read_gguf_checked",
]
