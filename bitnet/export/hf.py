"""The student as a stock Hugging Face checkpoint: transformers' own ``bitnet`` model type, offline quantization.

``AutoModelForCausalLM.from_pretrained(out_dir)`` builds ``BitNetForCausalLM`` (transformers >= 4.52; checked
against 5.17) and its ``BitNetHfQuantizer`` swaps every decoder linear for ``transformers.integrations.bitnet.
BitLinear`` (``quantization_config = {quant_method: bitnet, linear_class: bitlinear, quantization_mode:
offline}``). What that model computes, read from its sources, and how it maps onto the student:

- ``BitLinear.forward``: ``x_q = round(x·s).clamp(−128, 127)`` with ``s = 127 / max|x|.clamp(min=1e-5)`` per token
  (our ``act_quant``, same eps, same clamp), ``y = (x_q · codes) / (s · weight_scale)``: so ``weight_scale = 1/Δ``
  and ``weight`` holds the ternary codes packed 2 bits each (``pack_weights``: 4 rows per uint8 along the output
  dim, code+1 in {0, 1, 2}). The codes and Δ are ours (``BitLinear.ternary_weight``), not re-quantized.
- ``BitNetAttention``: ``attn_sub_norm`` (RMSNorm over hidden, eps ``rms_norm_eps``) on the attention output before
  ``o_proj``; ``BitNetMLP``: ``down_proj(ffn_sub_norm(act(gate_proj(x)) * up_proj(x)))`` with ``act =
  ACT2FN[hidden_act]`` — our SubLN ``standard`` placement (``o_proj.sub_norm`` / ``down_proj.sub_norm``), with
  ``hidden_act: silu`` for Llama students (the bitnet default is ``relu2``).
- the rest is Llama: RMSNorms, ``rotate_half`` RoPE from ``rope_parameters``, GQA, ``lm_head`` tied to the embedding
  when ``tie_word_embeddings``.

Not expressible (``UnsupportedExportError``): SubLN ``all``/``none`` (the model always has exactly the two
sub-norms), LRC adapters (``BitLinear`` is not an ``nn.Linear``, so neither PEFT nor the model can add the
low-rank term), ``quant_lambda`` < 1, biases, non-SiLU activations, RoPE scaling, sliding windows,
``heads·head_dim ≠ hidden``.

The online mode (``quantization_mode: online``, ``AutoBitLinear``) re-quantizes latent weights with
``round(W / mean|W|.clamp(1e-5))`` where we use ``round(W / (Δ + 1e-5))``: a handful of weights near the ±Δ/2
boundary round differently, so only the offline form is exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from bitnet.export.errors import UnsupportedExportError
from bitnet.families import FAMILIES
from bitnet.io import atomic_dir, sort_safetensors_metadata
from bitnet.layers import BitLinear, BitLinearLRC

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# families whose SubLN students transformers' own `bitnet` model reproduces (ModelFamily.hf_bitnet)
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES.values() if f.hf_bitnet for t in f.model_types)
_SUB_NORMS = {"self_attn.o_proj": "self_attn.attn_sub_norm", "mlp.down_proj": "mlp.ffn_sub_norm"}
MARKER = "config.json"


def _unsupported(msg: str) -> UnsupportedExportError:
    return UnsupportedExportError(f"cannot save as a transformers 'bitnet' checkpoint: {msg}")


def check_hf_bitnet(model: nn.Module) -> None:
    """Raise :class:`UnsupportedExportError` when transformers' ``BitNetForCausalLM`` cannot reproduce ``model``."""
    bcfg = getattr(model, "bitnet_config", None)
    if bcfg is None:
        raise _unsupported("not a converted student (convert_to_bitnet)")
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(f"model type {cfg.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if bcfg.subln != "standard":
        raise _unsupported(f"SubLN placement {bcfg.subln!r}: the bitnet model has exactly attn_sub_norm before o_proj "
                           "and ffn_sub_norm before down_proj ('standard')")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise _unsupported(f"activation {cfg.hidden_act!r} (Llama students use silu)")
    params = getattr(cfg, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise _unsupported(f"RoPE scaling {params.get('rope_type')!r}")
    if getattr(cfg, "sliding_window", None):
        raise _unsupported("sliding-window attention")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        raise _unsupported("heads·head_dim must equal hidden_size (BitNetConfig has no head_dim)")
    for name, layer in model.named_modules():
        if isinstance(layer, BitLinearLRC):
            raise _unsupported(f"{name} has an LRC adapter (the bitnet model has no low-rank term)")
        if isinstance(layer, BitLinear):
            if layer.quant_lambda != 1.0:
                raise _unsupported(f"{name} has quant_lambda {layer.quant_lambda} < 1")
            if layer.scale_group:
                raise _unsupported(f"{name} has one scale per {layer.scale_group} values (BitNetForCausalLM holds one "
                                   "weight_scale per matrix; the GGUF export writes group scales exactly)")
            if layer.bias is not None:
                raise _unsupported(f"{name} has a bias")
            if layer.out_features % 4:
                raise _unsupported(f"{name}: out_features {layer.out_features} is not a multiple of 4 (2-bit packing)")
            if layer.sub_norm is not None and abs(layer.sub_norm.eps - cfg.rms_norm_eps) > 1e-12:
                raise _unsupported(
                    f"{name}: SubLN eps {layer.sub_norm.eps} differs from rms_norm_eps {cfg.rms_norm_eps}"
                )
    if getattr(model, "lm_head", None) is not None and model.lm_head.bias is not None:
        raise _unsupported("lm_head has a bias")


def hf_bitnet_config(model: nn.Module) -> dict:
    """The ``config.json`` of the transformers ``bitnet`` checkpoint for ``model``."""
    from transformers import BitNetConfig
    from transformers.utils.quantization_config import BitNetQuantConfig

    cfg = model.config
    params = dict(getattr(cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": cfg.rope_theta})
    out = BitNetConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        attention_bias=False,
        rope_parameters=params,
    ).to_dict()
    out["quantization_config"] = BitNetQuantConfig(linear_class="bitlinear", quantization_mode="offline").to_dict()
    out["dtype"] = "float32"
    return out


def hf_bitnet_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Tensors under ``BitNetForCausalLM``'s names: packed codes + ``weight_scale = 1/Δ`` per ternary matrix."""
    from transformers.integrations.bitnet import pack_weights

    state: dict[str, torch.Tensor] = {}
    bitlinears = {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in bitlinears:
            if leaf != "weight":
                continue
            tw = bitlinears[module].ternary_weight()
            state[key] = pack_weights(tw.codes.to(torch.int32).clone()).contiguous()
            state[f"{module}.weight_scale"] = torch.tensor([1.0 / tw.scale], dtype=torch.float32)
        elif module.endswith(".sub_norm") and module[: -len(".sub_norm")] in bitlinears:
            parent = module[: -len(".sub_norm")]
            prefix, _, proj = parent.rpartition(".")
            block, _, kind = prefix.rpartition(".")
            state[f"{block}.{_SUB_NORMS[f'{kind}.{proj}']}.weight"] = value.detach().float().contiguous()
        elif key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        else:
            state[key] = value.detach().float().contiguous()
    return state


def save_hf_bitnet(model: nn.Module, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Write ``model`` (a standard-SubLN student at λ = 1) as a checkpoint stock transformers loads exactly.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` gives ``BitNetForCausalLM`` with the same logits as the student
    (float rounding; on CPU set ``TORCH_COMPILE_DISABLE=1``: transformers' ``BitLinear`` helpers are
    ``torch.compile``d and compile on first use otherwise).
    """
    check_hf_bitnet(model)
    state = hf_bitnet_state_dict(model)
    config = hf_bitnet_config(model)
    out = Path(out_dir)
    with atomic_dir(out, marker=MARKER) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "bitdistill": "hf-bitnet"})
        sort_safetensors_metadata(tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
