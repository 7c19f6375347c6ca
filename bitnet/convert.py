"""Hugging Face causal LM → BitNet student (BitDistill stage 1).

Every ``nn.Linear`` inside the decoder blocks becomes a :class:`~bitnet.layers.BitLinear`; embeddings,
norms and ``lm_head`` stay full precision. SubLN is inserted on the input of the attention output
projection and of the MLP down projection (``standard``, the paper's placement and llama.cpp's
``attn_sub_norm`` / ``ffn_sub_norm``), on the input of every BitLinear (``all``, as the official
BitDistill config ships) or nowhere (``none``, plain BitNet-SFT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bitnet.layers import BitLinear, BitLinearLRC, bit_linears

SubLNPlacement = Literal["standard", "all", "none"]


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no conversion rule."""


@dataclass(frozen=True)
class ArchRule:
    """Where the decoder blocks of an architecture live and which projections get SubLN."""

    model_types: tuple[str, ...]
    layers_attr: str  # dotted path from the CausalLM to the ModuleList of decoder blocks
    attn_out: str  # dotted path inside a block
    mlp_down: str
    notes: str = ""


ARCH_RULES: dict[str, ArchRule] = {
    "llama": ArchRule(("llama",), "model.layers", "self_attn.o_proj", "mlp.down_proj"),
    "mistral": ArchRule(("mistral",), "model.layers", "self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ArchRule(("qwen2",), "model.layers", "self_attn.o_proj", "mlp.down_proj", notes="q/k/v bias kept"),
    "qwen3": ArchRule(("qwen3",), "model.layers", "self_attn.o_proj", "mlp.down_proj", notes="q/k norm kept"),
}


class BitNetConfig(BaseModel):
    """How a student was converted; saved next to its weights so it can be rebuilt exactly."""

    model_config = ConfigDict(extra="forbid")

    subln: SubLNPlacement = "standard"
    norm_eps: float | None = Field(default=None, gt=0, description="SubLN eps; None = the model's rms_norm_eps")
    lrc_rank: int = Field(default=0, ge=0, description="rank of the low-rank correction; 0 = none")
    quant_lambda: float = Field(default=1.0, ge=0.0, le=1.0)


def supported_architectures() -> list[str]:
    return sorted(ARCH_RULES)


def arch_rule(model_type: str) -> ArchRule:
    for rule in ARCH_RULES.values():
        if model_type in rule.model_types:
            return rule
    raise UnsupportedArchitectureError(
        f"architecture {model_type!r} is not supported; supported: {', '.join(supported_architectures())}"
    )


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    rule = arch_rule(getattr(model.config, "model_type", "?"))
    layers = _get(model, rule.layers_attr)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(f"{rule.layers_attr} of {type(model).__name__} is not a ModuleList")
    return layers


def convert_to_bitnet(model: nn.Module, config: BitNetConfig | None = None) -> nn.Module:
    """Turn ``model`` (a HF causal LM) into a BitNet student in place and return it.

    A freshly converted model is fully quantized (λ = 1) unless ``config.quant_lambda`` says otherwise.
    """
    config = config or BitNetConfig()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no Hugging Face config.model_type")
    rule = arch_rule(model_type)
    if getattr(model, "bitnet_config", None) is not None:
        raise ValueError("model is already a BitNet student")
    eps = config.norm_eps if config.norm_eps is not None else float(getattr(model.config, "rms_norm_eps", 1e-6))
    for block in decoder_layers(model):
        sub_norm_targets = {rule.attn_out, rule.mlp_down}
        linears = [(name, m) for name, m in block.named_modules() if type(m) is nn.Linear]
        if not linears:
            raise UnsupportedArchitectureError(f"no nn.Linear found in a {type(block).__name__}")
        for name, linear in linears:
            with_norm = config.subln == "all" or (config.subln == "standard" and name in sub_norm_targets)
            new: BitLinear = BitLinear.from_linear(linear, sub_norm=with_norm, norm_eps=eps)
            if config.lrc_rank:
                new = BitLinearLRC.from_bitlinear(new, config.lrc_rank)
            _set(block, name, new)
    model.bitnet_config = config.model_copy(update={"norm_eps": eps})
    for _, layer in bit_linears(model):
        layer.quant_lambda = config.quant_lambda
    return model


def add_lrc(model: nn.Module, rank: int) -> nn.Module:
    """Replace every BitLinear of a converted student with a BitLinearLRC of the given rank (in place)."""
    cfg: BitNetConfig | None = getattr(model, "bitnet_config", None)
    if cfg is None:
        raise ValueError("add_lrc needs a converted BitNet student")
    if cfg.lrc_rank:
        raise ValueError(f"student already has LRC adapters of rank {cfg.lrc_rank}")
    for name, layer in bit_linears(model):
        _set(model, name, BitLinearLRC.from_bitlinear(layer, rank))
    model.bitnet_config = cfg.model_copy(update={"lrc_rank": rank})
    return model
