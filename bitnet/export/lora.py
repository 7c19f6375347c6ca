"""LRC adapters as a llama.cpp LoRA adapter GGUF.

A :class:`~bitnet.layers.BitLinearLRC` computes ``y = Δ·codes·Q(h) + U·(Vᵀ·h)`` on its (sub-normed) input
``h``. llama.cpp's ``build_lora_mm(w, cur, w_s)`` (``src/llama-graph.cpp`` of the vendored llama.cpp) computes
``(w·cur)·w_s + scale·B·(A·cur)`` with the *same* ``cur`` that enters the ternary matmul — the input before
the Q8_K activation quantization that happens inside ``ggml_mul_mat`` — and in the ``bitnet`` graph ``cur`` of
``wo`` / ``ffn_down`` is already the output of ``attn_sub_norm`` / ``ffn_sub_norm``. So the LRC term maps
exactly onto a LoRA pair: ``A = Vᵀ`` (``lora_a``, ggml ``{n_in, r}``), ``B = U`` (``lora_b``, ggml
``{r, n_out}``), and with ``adapter.lora.alpha = r`` the scale is ``alpha / r · 1.0 = 1``
(``llama_adapter_lora_weight::get_scale``). The pair is named after the base tensor plus ``.lora_a`` /
``.lora_b`` (``src/llama-adapter.cpp``).

One asymmetry of the graph: ``wq``/``wk``/``wv``/``wo``/``ffn_down`` go through ``build_lora_mm(w, cur, w_s)``,
which multiplies by the ``.scale`` tensor *before* adding the LoRA term, but ``build_ffn`` computes
``ffn_up``/``ffn_gate`` as ``build_lora_mm(w, cur)`` and multiplies by ``up_s``/``gate_s`` *after* it, so the
LoRA term of those two is scaled by Δ as well. Their ``lora_b`` is therefore written as ``U / Δ``. Merging instead is not exact (``U·Vᵀ`` is full precision, the
base matrix is ternary), so the adapter ships next to the base GGUF and is applied at load time
(``Llama(lora_path=...)``, ``bitdistill serve --lora``).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from bitnet.convert import decoder_layers
from bitnet.export.errors import UnsupportedExportError
from bitnet.export.gguf import ARCH, LAYER_MATRICES, T, add_tensors_with_checksum, atomic_gguf_write, tensor_name
from bitnet.layers import BitLinearLRC

# build_ffn applies these matrices' ``.scale`` after the LoRA residual (see the module docstring)
SCALED_AFTER_LORA = (T.FFN_UP, T.FFN_GATE)


def lrc_pairs(model: nn.Module) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(base tensor name, A = Vᵀ (r × in), B = U (out × r), or U / Δ for ffn_up/ffn_gate) per LRC layer, float32."""
    pairs = []
    for i, block in enumerate(decoder_layers(model)):
        for path, kind in LAYER_MATRICES.items():
            layer = block.get_submodule(path)
            if isinstance(layer, BitLinearLRC):
                with torch.no_grad():
                    a = layer.lrc_v.detach().float().t().contiguous().cpu().numpy()
                    b = layer.lrc_u.detach().float().contiguous().cpu().numpy()
                if kind in SCALED_AFTER_LORA:
                    b = b / np.float32(layer.ternary_weight().scale)
                pairs.append((tensor_name(kind, i), a, b))
    return pairs


def export_lrc_adapter(model: nn.Module, out: str | Path, *, name: str = "bitdistill-lrc") -> Path:
    """Write the student's LRC adapters as a llama.cpp LoRA adapter for the ``bitnet`` base GGUF."""
    cfg = getattr(model, "bitnet_config", None)
    pairs = lrc_pairs(model)
    if cfg is None or not cfg.lrc_rank or not pairs:
        raise UnsupportedExportError("the student has no LRC adapters to export")
    rank = int(cfg.lrc_rank)
    tensors: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]] = []
    for base, a, b in pairs:
        tensors += [(f"{base}.lora_a", a, None), (f"{base}.lora_b", b, None)]

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
        w.add_name(name)
        add_tensors_with_checksum(w, tensors)

    out = Path(out)
    atomic_gguf_write(out, fill, arch=ARCH)
    return out
