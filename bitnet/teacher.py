"""Teachers: the tiny Llama-architecture teacher the offline preset pretrains, and real HF or GGUF teachers.

The tiny teacher's shapes suit llama.cpp's ternary types and its ``bitnet`` graph: every linear's input
dimension is a multiple of 256 (hidden and intermediate sizes), heads·head_dim = hidden size and the
input/output embeddings are tied.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

GGUF_BLOCK = 256


class TinyTeacherConfig(BaseModel):
    """Dimensions of the tiny Llama teacher (vocab size comes from the tokenizer)."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(default=256, gt=0)
    intermediate_size: int = Field(default=768, gt=0)
    num_hidden_layers: int = Field(default=4, gt=0)
    num_attention_heads: int = Field(default=4, gt=0)
    num_key_value_heads: int = Field(default=2, gt=0)
    max_position_embeddings: int = Field(default=1024, gt=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    rms_norm_eps: float = Field(default=1e-6, gt=0)
    initializer_range: float = Field(default=0.02, gt=0)

    @model_validator(mode="after")
    def _gguf_friendly(self) -> TinyTeacherConfig:
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % GGUF_BLOCK:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be a multiple of {GGUF_BLOCK} for GGUF ternary types"
                )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        return self


def tiny_teacher_config(
    cfg: TinyTeacherConfig, vocab_size: int, *, bos_token_id: int = 0, eos_token_id: int = 0
) -> LlamaConfig:
    """The transformers config of the tiny teacher: a Llama with tied embeddings, no biases."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range,
        hidden_act="silu",
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def build_tiny_teacher(
    cfg: TinyTeacherConfig, vocab_size: int, *, bos_token_id: int, eos_token_id: int
) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM with tied embeddings."""
    return LlamaForCausalLM(tiny_teacher_config(cfg, vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id))


def load_teacher(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A causal LM in eval mode: an HF directory or hub id (``from_pretrained``), or a GGUF source.

    A GGUF source (a ``.gguf`` path or a named source such as ``smollm2-135m``, see :mod:`bitnet.pretrained`) is
    dequantised in memory, which takes about a minute for SmolLM2-135M on 2 cores: pipelines materialise it once
    with :func:`bitnet.pretrained.materialize_teacher` and load that checkpoint instead.
    """
    from bitnet.pretrained import load_gguf_model, resolve_source

    source = resolve_source(name_or_path)
    if source.is_gguf:
        assert source.path is not None
        return load_gguf_model(source.path, dtype=dtype)
    local = Path(name_or_path)
    if local.exists():
        check_model_dir(local)
    try:  # safetensors only: a pickle checkpoint (pytorch_model.bin) is never unpickled
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, use_safetensors=True)
    except OSError as e:
        raise FileNotFoundError(f"cannot load teacher {str(name_or_path)!r}: {str(e).splitlines()[0]}") from e
    model.eval()
    return model


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_dir(path: str | Path) -> None:
    """A local HF model directory we can load safely: ``config.json`` and intact safetensors weights. Pickle-only
    checkpoints (``pytorch_model.bin``) are refused, never unpickled; truncated safetensors files are named."""
    from bitnet.io import safetensors_header

    d = Path(path)
    if not d.is_dir() or not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} is not a Hugging Face model directory (config.json missing)")
    weights = sorted(d.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"{d} holds only pickle weights ({', '.join(pickles)}): bitdistill never unpickles "
                             "checkpoints; save the model with safetensors (save_pretrained(safe_serialization=True))")
        raise FileNotFoundError(f"{d} has no *.safetensors weights")
    for w in weights:
        safetensors_header(w)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
