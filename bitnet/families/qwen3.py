"""Qwen3 (HF ``model_type`` ``qwen3``): the dense Qwen3 models.

- Native graph ``qwen3``: per-head q/k RMSNorms (``self_attn.q_norm`` / ``k_norm`` → ``attn_q_norm`` /
  ``attn_k_norm``), head_dim 128 ≠ n_embd / n_head, NEOX RoPE, untied ``output`` when untied.
- SubLN ``standard``: the ``bitnet`` graph has the sub-norms but no q/k norms, and ``qwen3`` has no sub-norms: no stock
  llama.cpp graph holds the student, so it is refused before training (docs/export.md).
- Tokenizer: byte-level BPE with Qwen's split regex (llama.cpp ``qwen2``).
"""

from typing import Any

from bitnet.families.base import Graph, ModelFamily

QWEN3 = Graph("qwen3", qk_norm=True)


class Qwen3Family(ModelFamily):
    def has_qk_norm(self, cfg: Any) -> bool:
        return True  # transformers' Qwen3Attention always has q_norm / k_norm


FAMILY = Qwen3Family(
    name="qwen3", model_types=("qwen3",), hf_class_prefix="Qwen3", native=QWEN3,
    examples="Qwen3 0.6B–32B (dense)",
)
