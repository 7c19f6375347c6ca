"""Stage ``export``: the student as a llama.cpp GGUF (+ its LRC adapter as a LoRA GGUF when it has one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bitnet.export.gguf import export_gguf
from bitnet.export.quants import EmbeddingType, Fallback, WeightType
from bitnet.families import graph_names
from bitnet.stages.base import Inputs, Stage, model_dir

GGUF_NAME, LORA_NAME = "student.gguf", "lrc-lora.gguf"


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight_type: WeightType = Field(default="tq2_0", description="GGUF type of the ternary matrices")
    embedding_type: EmbeddingType = Field(default="f16", description="GGUF type of the token embedding")
    tokenizer_pre: str | None = Field(default=None, description="llama.cpp pre-tokenizer when it cannot be inferred")
    arch: str = Field(default="auto", description="llama.cpp graph (auto or one of bitnet.families.graph_names()): "
                      "auto = the family's SubLN graph (bitnet) for SubLN students, its native one without SubLN")
    fallback: Fallback = Field(
        default="auto", description="exact type for ternary rows that TQ2_0/TQ1_0 cannot hold (not a multiple of 256)")

    @field_validator("arch")
    @classmethod
    def _known_graph(cls, v: str) -> str:
        if v not in ("auto", *graph_names()):
            raise ValueError(f"arch must be auto or one of {', '.join(graph_names())}, got {v!r}")
        return v


def run(cfg: ExportConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    res = export_gguf(model_dir(inputs["student"]), out / GGUF_NAME, weight_type=cfg.weight_type,
                      embedding_type=cfg.embedding_type, tokenizer_pre=cfg.tokenizer_pre, lora_out=out / LORA_NAME,
                      arch=cfg.arch, fallback=cfg.fallback)
    return {"gguf": GGUF_NAME, "lora": res.lora_path.name if res.lora_path else None,
            "arch": res.arch, "weight_type": res.weight_type, "file_bytes": res.file_bytes, "n_tensors": res.n_tensors,
            "ternary_params": res.ternary_params, "bits_per_ternary_weight": res.bits_per_ternary_weight}


STAGE = Stage("export", ExportConfig, run, inputs=("student",), reuse_in_eval_only=False,
              help="write the student as a llama.cpp GGUF (and its LRC adapter as a LoRA GGUF)")
