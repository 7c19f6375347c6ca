"""Any student as a Hugging Face checkpoint that transformers loads (``trust_remote_code=True``): the reference form.

transformers' own ``bitnet`` model type (:mod:`bitnet.export.hf`) only has SubLN ``standard`` Llama shapes without
LRC. Every other student — ``subln: none`` or ``all``, Qwen2 biases, Qwen3 q/k norms, untied heads, LRC adapters — is
written as its base architecture's checkpoint (``model_type`` llama / mistral / qwen2 / qwen3, the student's own
``model.safetensors``: latent weights, SubLNs, LRC factors) plus a self-contained ``modeling_bitdistill.py`` that
subclasses the base ``*ForCausalLM`` and swaps every decoder linear for a ``BitLinear`` with the same math as
:mod:`bitnet.quant` / :mod:`bitnet.layers` (absmean ternary weights, per-token int8 activations, SubLN on the input,
LRC on the unquantized input). ``config.json`` carries ``auto_map`` to that class and a ``bitdistill`` section
(SubLN placement and eps, LRC rank). ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` gives the
student's logits; the file needs nothing from this project.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from bitnet.convert import BitNetConfig
from bitnet.export.errors import UnsupportedExportError
from bitnet.families import FAMILIES
from bitnet.io import atomic_dir, sort_safetensors_metadata
from bitnet.layers import BitLinear

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MARKER = "modeling_bitdistill.py"
BASES = {t: f.hf_class_prefix for f in FAMILIES.values() for t in f.model_types}  # model type -> transformers class

MODELING = '''"""bitdistill student (written by bitnet.export.hf_student): a ternary student on a transformers base.

Weights: absmean ternary, Δ = mean|W|, codes = clamp(round(W / (Δ + 1e-5)), -1, 1). Activations: per token,
s = 127 / max|x| (clamped at 1e-5), round, clamp to [-128, 127]. SubLN: RMSNorm on a linear's input (float32).
LRC: y += U·(Vᵀ·h) on the unquantized (sub-normed) input h. Self-contained: needs torch and transformers only.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import {base}ForCausalLM

SUBLN_TARGETS = ("self_attn.o_proj", "mlp.down_proj")


def act_quant(x):
    xf = x.float()
    scale = 127 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (torch.clamp(torch.round(xf * scale), -128, 127) / scale).to(x.dtype)


def weight_quant(w):
    delta = w.detach().float().abs().mean()
    codes = torch.clamp(torch.round(w.float() / (delta + 1e-5)), -1, 1).to(torch.int8)
    return (codes.float() * delta).to(w.dtype)


class SubLN(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class BitLinear(nn.Linear):
    def __init__(self, in_features, out_features, bias, sub_norm, eps, rank):
        super().__init__(in_features, out_features, bias=bias)
        self.sub_norm = SubLN(in_features, eps) if sub_norm else None
        self.rank = rank
        if rank:
            self.lrc_u = nn.Parameter(torch.zeros(out_features, rank))
            self.lrc_v = nn.Parameter(torch.zeros(in_features, rank))

    def forward(self, x):
        h = self.sub_norm(x) if self.sub_norm is not None else x
        y = F.linear(act_quant(h), weight_quant(self.weight), self.bias)
        if self.rank:
            y = y + F.linear(F.linear(h, self.lrc_v.t()), self.lrc_u)
        return y


class BitDistill{base}ForCausalLM({base}ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        bd = config.bitdistill
        for block in self.model.layers:
            for name, m in list(block.named_modules()):
                if type(m) is not nn.Linear:
                    continue
                norm = bd["subln"] == "all" or (bd["subln"] == "standard" and name in SUBLN_TARGETS)
                new = BitLinear(m.in_features, m.out_features, m.bias is not None, norm, bd["norm_eps"], bd["lrc_rank"])
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, leaf, new)
'''


def check_hf_student(model: nn.Module) -> BitNetConfig:
    bcfg: BitNetConfig | None = getattr(model, "bitnet_config", None)
    if bcfg is None:
        raise UnsupportedExportError("cannot save as a Hugging Face checkpoint: not a converted student")
    mt = getattr(model.config, "model_type", "?")
    if mt not in BASES:
        raise UnsupportedExportError(f"cannot save as a Hugging Face checkpoint: model type {mt!r} "
                                     f"(supported: {', '.join(BASES)})")
    for name, layer in model.named_modules():
        if isinstance(layer, BitLinear) and layer.quant_lambda != 1.0:
            raise UnsupportedExportError(f"cannot save as a Hugging Face checkpoint: {name} has quant_lambda "
                                         f"{layer.quant_lambda} < 1 (the checkpoint holds the fully ternary student)")
    return bcfg


def save_hf_student(model: nn.Module, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Write any student as a transformers checkpoint with remote code (see the module docstring)."""
    bcfg = check_hf_student(model)
    mt = model.config.model_type
    base = BASES[mt]
    config = model.config.to_dict()
    config["architectures"] = [f"BitDistill{base}ForCausalLM"]
    config["auto_map"] = {"AutoModelForCausalLM": f"modeling_bitdistill.BitDistill{base}ForCausalLM"}
    config["bitdistill"] = {"subln": bcfg.subln, "norm_eps": float(bcfg.norm_eps or model.config.rms_norm_eps),
                            "lrc_rank": int(bcfg.lrc_rank)}
    config["dtype"] = "float32"
    state = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        state[key] = value.detach().to(torch.float32).contiguous().clone()
    out = Path(out_dir)
    with atomic_dir(out, marker=MARKER) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "bitdistill": "hf-student"})
        sort_safetensors_metadata(tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        (tmp / MARKER).write_text(MODELING.replace("{base}", base))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def save_hf(
    model: nn.Module, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[Path, str]:
    """The best Hugging Face form of ``model``: transformers' own ``bitnet`` type where it fits, else remote code.

    Returns the directory and the form (``bitnet`` or ``remote-code``).
    """
    from bitnet.export.hf import check_hf_bitnet, save_hf_bitnet

    try:
        check_hf_bitnet(model)
    except UnsupportedExportError:
        return save_hf_student(model, out_dir, tokenizer), "remote-code"
    return save_hf_bitnet(model, out_dir, tokenizer), "bitnet"
