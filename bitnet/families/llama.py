"""Llama: Llama 2 / 3 / 3.1 / 3.2, SmolLM / SmolLM2 (HF ``model_type`` ``llama``).

- Native graph ``llama``: NORM RoPE (the Q/K rows are permuted in the file as ``convert_hf_to_gguf.py`` does), optional
  q/k/v/o biases (``attention_bias``), head_dim free, untied ``output``, llama3 RoPE scaling as the ``rope_freqs``
  tensor and linear scaling as metadata.
- SubLN ``standard``: the ``bitnet`` graph, for tied checkpoints without biases or RoPE scaling whose heads span
  the hidden size (SmolLM2, Llama 3.2 1B/3B are tied but use llama3 scaling; Llama 3.1 8B is untied).
- Tokenizers: byte-level BPE (Llama 3: ``llama-bpe``; SmolLM: ``smollm``) or SentencePiece (Llama 2: ``llama``).
"""

from bitnet.families.base import ATTN_PROJS, Graph, ModelFamily

LLAMA = Graph("llama", rope="norm", biases=frozenset(ATTN_PROJS), rope_scalings=("linear", "llama3"))

FAMILY = ModelFamily(
    name="llama", model_types=("llama",), hf_class_prefix="Llama", native=LLAMA, tokenizers=("gpt2", "llama"),
    hf_bitnet=True, examples="Llama 2/3/3.1/3.2, SmolLM2",
)
