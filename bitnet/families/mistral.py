"""Mistral (HF ``model_type`` ``mistral``): Mistral 7B v0.2/v0.3, Mistral NeMo and other Llama-shaped Mistrals.

- Native graph: llama.cpp's ``llama`` graph (``convert_hf_to_gguf.py`` writes Mistral checkpoints as ``llama``): NORM
  RoPE, no biases; Mistral NeMo's head_dim 128 ≠ 5120/32 is taken.
- Sliding-window attention (Mistral 7B v0.1: 4,096 of 32,768 positions) has no exact mapping and is refused.
- SubLN ``standard``: the ``bitnet`` graph (tied checkpoints only; Mistral 7B is untied, so its SubLN student is
  refused).
- Tokenizer: SentencePiece BPE with byte fallback (llama.cpp ``llama``; v0.3 and NeMo ship byte-level BPE).
"""

from bitnet.families.base import ModelFamily
from bitnet.families.llama import LLAMA

FAMILY = ModelFamily(
    name="mistral", model_types=("mistral",), hf_class_prefix="Mistral", native=LLAMA, tokenizers=("llama", "gpt2"),
    hf_bitnet=True, examples="Mistral 7B v0.2/v0.3, Mistral NeMo",
)
