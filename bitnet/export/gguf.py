"""GGUF writer: a converted BitNet student as one of llama.cpp's graphs (``bitnet``, ``llama``, ``qwen2``, ``qwen3``).

:mod:`bitnet.export.plan` decides the graph and the exact type of every tensor (``plan_export``, printable with
``ExportPlan.table()``); this module produces the data and writes the file atomically through
:func:`bitnet.export.writer.atomic_gguf_write`, which stores a SHA-256 of the whole file (metadata included) that
:func:`bitnet.export.reader.read_gguf_checked` requires. LRC adapters go to a LoRA GGUF (:mod:`bitnet.export.lora`).

Ternary matrices are written from :meth:`BitLinear.ternary_weight` — the int8 codes packed exactly (TQ2_0 / TQ1_0
for rows that are a multiple of 256, else Q4_0 codes {7, 8, 9} or Q8_0 codes {−1, 0, 1}, else F16 codes) with
block scale ``d = 1`` and the per-tensor absmean scale Δ as the exact F32 ``.scale`` tensor (``delta="tensor"``),
or with ``d = fp16(Δ)`` (``delta="fold"``). For TQ types llama.cpp quantizes the matrix input to Q8_K (int8 absmax
per block of 256 values), for Q4_0 / Q8_0 to Q8_0 (per 32 values, fp16 scale), for F16 it rounds it to fp16; the
student quantizes per token. Norms, biases and scales are F32, the token embedding / output F16, F32, Q8_0 or Q6_K.

Anything no graph can express raises :class:`UnsupportedExportError` before a byte is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import torch
from torch import nn

from bitnet.export.errors import UnsupportedExportError
from bitnet.export.lora import export_lrc_adapter
from bitnet.export.names import (
    LAYER_MATRICES,
    LAYER_NORMS,
    QK_K,
    SUB_NORMS,
    T,
    tensor_name,
)
from bitnet.export.plan import (
    ExportHParams,
    ExportPlan,
    check_exportable,
    entries,
    plan_export,
)
from bitnet.export.quants import DeltaMode, EmbeddingType, Fallback, WeightType
from bitnet.export.vocab import vocab_metadata
from bitnet.export.writer import (
    CHECKSUM_KEY,
    RawTensor,
    add_tensors,
    add_tensors_with_checksum,
    atomic_gguf_write,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BITNET]  # "bitnet"

_FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
    "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
}

__all__ = [
    "ARCH",
    "CHECKSUM_KEY",
    "LAYER_MATRICES",
    "LAYER_NORMS",
    "QK_K",
    "SUB_NORMS",
    "ExportHParams",
    "ExportResult",
    "T",
    "add_tensors_with_checksum",
    "atomic_gguf_write",
    "check_exportable",
    "export_gguf",
    "plan_export",
    "tensor_name",
]


@dataclass(frozen=True)
class ExportResult:
    path: Path
    weight_type: str
    file_bytes: int
    n_tensors: int
    ternary_params: int
    ternary_bytes: int
    hparams: ExportHParams
    lora_path: Path | None = None
    arch: str = ARCH
    plan: ExportPlan | None = None

    @property
    def bits_per_ternary_weight(self) -> float:
        return 8.0 * self.ternary_bytes / max(self.ternary_params, 1)


def _add_hparams(w: gguf.GGUFWriter, hp: ExportHParams, weight_type: str, name: str) -> None:
    w.add_name(name)
    w.add_file_type(int(_FILE_TYPES[weight_type]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(hp.n_vocab)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(hp.n_ff)
    w.add_block_count(hp.n_layer)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_key_length(hp.head_dim)
    w.add_value_length(hp.head_dim)
    w.add_rope_dimension_count(hp.head_dim)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    if hp.rope_scaling == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(hp.rope_factor)


def _resolve(
    model: nn.Module | str | Path, tokenizer: PreTrainedTokenizerBase | str | Path | None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    from transformers import AutoTokenizer

    from bitnet.io import model_dir
    from bitnet.student import load_student

    src = None
    if not isinstance(model, nn.Module):
        src = model_dir(model)  # a stage output's model/ holds the student and its tokenizer
        model = load_student(src)
    if tokenizer is None:
        if src is None:
            raise UnsupportedExportError("a tokenizer is needed (the student was passed as a module)")
        tokenizer = src
    if isinstance(tokenizer, (str, Path)):  # a str has .encode too
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        except (OSError, ValueError) as e:
            raise UnsupportedExportError(
                f"no usable Hugging Face tokenizer in {tokenizer} ({str(e).splitlines()[0].rstrip(':')}); "
                "pass the tokenizer explicitly"
            ) from e
    return model, tokenizer


def export_gguf(
    model: nn.Module | str | Path,
    out: str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
    weight_type: WeightType = "tq2_0",
    embedding_type: EmbeddingType = "f16",
    tokenizer_pre: str | None = None,
    name: str = "bitdistill-student",
    lora_out: str | Path | None = None,
    arch: str = "auto",
    delta: DeltaMode = "auto",
    fallback: Fallback = "auto",
) -> ExportResult:
    """Write the student (a module or a student directory) as a llama.cpp GGUF at ``out``.

    ``arch="auto"`` picks ``bitnet`` for SubLN-standard Llama/Mistral students and the native graph for SubLN-none
    students (:func:`bitnet.export.plan.resolve_arch`). ``weight_type`` is the preferred ternary type; rows it cannot
    hold get the exact ``fallback`` (:func:`bitnet.export.plan.ternary_type`). The LRC adapters of an LRC student
    cannot be part of the base file (U·Vᵀ is full precision, the base matrices ternary): they go to ``lora_out`` as
    a llama.cpp LoRA adapter, and an LRC student without ``lora_out`` is refused — the base file alone would load
    and be wrong.
    """
    model, tokenizer = _resolve(model, tokenizer)
    plan = plan_export(model, weight_type=weight_type, embedding_type=embedding_type, delta=delta, fallback=fallback,
                       arch=arch)
    hp, delta = plan.hparams, plan.delta
    lrc_rank = int(model.bitnet_config.lrc_rank)
    if lrc_rank and lora_out is None:
        raise UnsupportedExportError(
            f"the student has LRC adapters (rank {lrc_rank}); pass lora_out to write them as a llama.cpp LoRA adapter"
        )
    vocab = vocab_metadata(tokenizer, hp.n_vocab, tokenizer_pre=tokenizer_pre)
    out = Path(out)
    if out.exists() and out.is_dir():
        raise UnsupportedExportError(f"{out} is a directory; the GGUF output must be a file path")
    with torch.no_grad():
        tensors: list[RawTensor] = [
            (e.plan.name, *e.make())
            for e in entries(model, hp, weight_type=weight_type, embedding_type=embedding_type, delta=delta,
                             fallback=fallback)
        ]

    def fill(w: gguf.GGUFWriter) -> None:
        _add_hparams(w, hp, weight_type, name)
        vocab.add_to(w)
        add_tensors(w, tensors)

    atomic_gguf_write(out, fill, arch=hp.arch)
    lora_path = None
    if lrc_rank:
        lora_path = export_lrc_adapter(model, lora_out, name=f"{name}-lrc", hparams=hp, delta=delta)
    return ExportResult(path=out, weight_type=weight_type, file_bytes=out.stat().st_size, n_tensors=len(tensors),
                        ternary_params=plan.ternary_params, ternary_bytes=plan.ternary_bytes, hparams=hp,
                        lora_path=lora_path, arch=hp.arch, plan=plan)
