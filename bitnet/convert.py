"""Hugging Face causal LM → BitNet student (BitDistill stage 1).

Every ``nn.Linear`` inside the decoder blocks becomes a :class:`~bitnet.layers.BitLinear`; embeddings,
norms and ``lm_head`` stay full precision. Where the decoder blocks are and which projections get SubLN is the
model family's :class:`~bitnet.families.DecoderLayout` (:mod:`bitnet.families`). SubLN is inserted on the input of the
attention output projection and of the MLP down projection (``standard``, the paper's placement and llama.cpp's
``attn_sub_norm`` / ``ffn_sub_norm``), on the input of every BitLinear (``all``, as the official
BitDistill config ships) or nowhere (``none``, plain BitNet-SFT).

Weight scales (``weight_scale``, ``scale_rule``): BitNet's per-tensor absmean by default; or one scale per group of
a row, with groups that are the GGUF export blocks, so finer scales cost nothing at inference: ``group_size`` (256,
one TQ2_0/TQ1_0 block) where it divides the row, else ``fallback_group_size`` (a multiple of 32: Q4_0/Q8_0 blocks)
for rows such as SmolLM2's 576.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bitnet.families import UnsupportedFamilyError, family_for, family_of, model_types
from bitnet.layers import BitLinear, BitLinearLRC, bit_linears
from bitnet.quant import ScaleRule

SubLNPlacement = Literal["standard", "all", "none"]


UnsupportedArchitectureError = UnsupportedFamilyError  # the model's architecture has no registered family


class BitNetConfig(BaseModel):
    """How a student was converted; saved next to its weights so it can be rebuilt exactly."""

    model_config = ConfigDict(extra="forbid")

    subln: SubLNPlacement = "standard"
    norm_eps: float | None = Field(default=None, gt=0, description="SubLN eps; None = the model's rms_norm_eps")
    lrc_rank: int = Field(default=0, ge=0, description="rank of the low-rank correction; 0 = none")
    quant_lambda: float = Field(default=1.0, ge=0.0, le=1.0)
    weight_scale: Literal["tensor", "group"] = Field(
        default="tensor", description="one scale per matrix (BitNet) or one per group of a row (the export blocks)")
    scale_rule: ScaleRule = Field(
        default="absmean", description="absmean (BitNet) or mse (recomputed every step), or learned (LSQ) scales")
    group_size: int = Field(default=256, ge=32, multiple_of=32,
                            description="values per scale where it divides the row (256 = one TQ2_0/TQ1_0 block)")
    fallback_group_size: int = Field(default=64, ge=32, multiple_of=32,
                                     description="values per scale on rows group_size does not divide (Q4_0/Q8_0)")

    def scale_group(self, in_features: int) -> int:
        """Values per scale on rows of ``in_features`` (0 = one scale for the whole matrix)."""
        if self.weight_scale == "tensor":
            return 0
        for g in (self.group_size, self.fallback_group_size):
            if in_features % g == 0:
                return g
        raise ValueError(f"neither group_size {self.group_size} nor fallback_group_size {self.fallback_group_size} "
                         f"divides a row of {in_features} values")


def supported_architectures() -> list[str]:
    """The HF model types some registered family accepts (:mod:`bitnet.families`)."""
    return model_types()


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, dotted: str, value: nn.Module) -> None:
    parent, _, name = dotted.rpartition(".")
    setattr(_get(module, parent) if parent else module, name, value)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layout = family_of(model).layout
    layers = _get(model, layout.layers_attr)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitectureError(f"{layout.layers_attr} of {type(model).__name__} is not a ModuleList")
    return layers


def convert_to_bitnet(model: nn.Module, config: BitNetConfig | None = None) -> nn.Module:
    """Turn ``model`` (a HF causal LM) into a BitNet student in place and return it.

    A freshly converted model is fully quantized (λ = 1) unless ``config.quant_lambda`` says otherwise.
    """
    config = config or BitNetConfig()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no Hugging Face config.model_type")
    layout = family_for(model_type).layout
    if getattr(model, "bitnet_config", None) is not None:
        raise ValueError("model is already a BitNet student")
    eps = config.norm_eps if config.norm_eps is not None else float(getattr(model.config, "rms_norm_eps", 1e-6))
    for block in decoder_layers(model):  # refuse a group size that does not divide a row before anything changes
        for linear in block.modules():
            if type(linear) is nn.Linear:
                config.scale_group(linear.in_features)
    for block in decoder_layers(model):
        sub_norm_targets = layout.subln_targets()
        linears = [(name, m) for name, m in block.named_modules() if type(m) is nn.Linear]
        if not linears:
            raise UnsupportedArchitectureError(f"no nn.Linear found in a {type(block).__name__}")
        for name, linear in linears:
            with_norm = config.subln == "all" or (config.subln == "standard" and name in sub_norm_targets)
            new: BitLinear = BitLinear.from_linear(linear, sub_norm=with_norm, norm_eps=eps)
            new.configure_scales(config.scale_group(linear.in_features), config.scale_rule)
            if config.lrc_rank:
                new = BitLinearLRC.from_bitlinear(new, config.lrc_rank)
            _set(block, name, new)
    model.bitnet_config = config.model_copy(update={"norm_eps": eps})
    for _, layer in bit_linears(model):
        layer.quant_lambda = config.quant_lambda
    return model


def add_lrc(model: nn.Module, rank: int, seed: int = 0) -> nn.Module:
    """Replace every BitLinear of a converted student with a BitLinearLRC of the given rank (in place).

    The random ``V`` of the fresh adapters is drawn from ``seed`` inside a forked RNG: the same student and seed give
    the same adapters whatever the caller's global RNG state (so a recomputed stage writes the same bytes), and the
    caller's RNG is left as it was."""
    cfg: BitNetConfig | None = getattr(model, "bitnet_config", None)
    if cfg is None:
        raise ValueError("add_lrc needs a converted BitNet student")
    if cfg.lrc_rank:
        raise ValueError(f"student already has LRC adapters of rank {cfg.lrc_rank}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, layer in bit_linears(model):
            _set(model, name, BitLinearLRC.from_bitlinear(layer, rank))
    model.bitnet_config = cfg.model_copy(update={"lrc_rank": rank})
    return model
