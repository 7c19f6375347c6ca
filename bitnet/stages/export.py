"""Stage ``export``: the student as a llama.cpp GGUF (+ its LRC adapter as a LoRA GGUF when it has one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from bitnet.export.gguf import EmbeddingType, WeightType, export_gguf
from bitnet.stages.base import Inputs, Stage, model_dir

GGUF_NAME, LORA_NAME = "student.gguf", "lrc-lora.gguf"


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight_type: WeightType = Field(default="tq2_0", description="GGUF type of the ternary matrices")
    embedding_type: EmbeddingType = Field(default="f16", description="GGUF type of the token embedding")
    tokenizer_pre: str | None = Field(default=None, description="llama.cpp pre-tokenizer when it cannot be inferred")


def run(cfg: ExportConfig, inputs: Inputs, out: Path) -> dict[str, Any]:
    res = export_gguf(model_dir(inputs["student"]), out / GGUF_NAME, weight_type=cfg.weight_type,
                      embedding_type=cfg.embedding_type, tokenizer_pre=cfg.tokenizer_pre, lora_out=out / LORA_NAME)
    return {"gguf": GGUF_NAME, "lora": res.lora_path.name if res.lora_path else None,
            "weight_type": res.weight_type, "file_bytes": res.file_bytes, "n_tensors": res.n_tensors,
            "ternary_params": res.ternary_params, "bits_per_ternary_weight": res.bits_per_ternary_weight}


STAGE = Stage("export", ExportConfig, run, inputs=("student",), reuse_in_eval_only=False,
              help="write the student as a llama.cpp GGUF (and its LRC adapter as a LoRA GGUF)")
