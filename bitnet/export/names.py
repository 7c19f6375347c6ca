"""GGUF tensor names shared by the writer, the LoRA adapter writer and the reader (no imports of either)."""

from __future__ import annotations

import gguf

T = gguf.MODEL_TENSOR
QK_K = gguf.QK_K  # 256: TQ1_0 / TQ2_0 / Q6_K block size along a row

# HF module path inside a decoder block -> llama.cpp tensor
LAYER_NORMS: dict[str, gguf.MODEL_TENSOR] = {"input_layernorm": T.ATTN_NORM, "post_attention_layernorm": T.FFN_NORM}
LAYER_MATRICES: dict[str, gguf.MODEL_TENSOR] = {
    "self_attn.q_proj": T.ATTN_Q,
    "self_attn.k_proj": T.ATTN_K,
    "self_attn.v_proj": T.ATTN_V,
    "self_attn.o_proj": T.ATTN_OUT,
    "mlp.gate_proj": T.FFN_GATE,
    "mlp.up_proj": T.FFN_UP,
    "mlp.down_proj": T.FFN_DOWN,
}
# the SubLNs of the `bitnet` graph: the norms on the inputs of wo and ffn_down
SUB_NORMS: dict[str, gguf.MODEL_TENSOR] = {"self_attn.o_proj": T.ATTN_SUB_NORM, "mlp.down_proj": T.FFN_SUB_NORM}
# Qwen3's per-head q/k RMSNorms
QK_NORMS: dict[str, gguf.MODEL_TENSOR] = {"self_attn.q_norm": T.ATTN_Q_NORM, "self_attn.k_norm": T.ATTN_K_NORM}


def tensor_name(kind: gguf.MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    base = gguf.TENSOR_NAMES[kind]
    return f"{base.format(bid=layer) if layer is not None else base}.{suffix}"
