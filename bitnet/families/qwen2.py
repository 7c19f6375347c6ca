"""Qwen2 (HF ``model_type`` ``qwen2``): Qwen2, Qwen2.5 (the BitDistill paper's own students).

- Native graph ``qwen2``: q/k/v biases (required), NEOX RoPE, untied ``output`` when the checkpoint is untied. Its
  ``build_ffn`` call passes no ``.scale`` tensors, so Δ is folded into the block scales (``delta="fold"``).
- SubLN ``standard``: the ``bitnet`` graph has the sub-norms but loads no biases, and ``qwen2`` has no sub-norms: no
  stock llama.cpp graph holds the student, so it is refused before training (docs/export.md).
- Tokenizer: byte-level BPE with Qwen's split regex (llama.cpp ``qwen2``).
"""

from typing import Any

from bitnet.families.base import Graph, ModelFamily

QWEN2 = Graph("qwen2", biases=frozenset("qkv"), required_biases=frozenset("qkv"), scale_tensors=False)


class Qwen2Family(ModelFamily):
    def attention_biases(self, cfg: Any) -> frozenset[str]:
        return frozenset("qkv")  # transformers' Qwen2Attention always has q/k/v biases


FAMILY = Qwen2Family(
    name="qwen2", model_types=("qwen2",), hf_class_prefix="Qwen2", native=QWEN2,
    examples="Qwen2, Qwen2.5",
)
