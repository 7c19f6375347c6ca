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

The same holds for the native graphs (``llama``, ``qwen2``, ``qwen3``): they apply LoRA pairs through the same
``build_lora_mm`` / ``build_ffn``. In the ``llama`` graph the Q/K rows are permuted for its NORM RoPE, so the rows of
``lora_b`` of ``wq`` / ``wk`` are permuted the same way.

One asymmetry of the graphs: ``wq``/``wk``/``wv``/``wo``/``ffn_down`` go through ``build_lora_mm(w, cur, w_s)``,
which multiplies by the ``.scale`` tensor *before* adding the LoRA term, but ``build_ffn`` computes
``ffn_up``/``ffn_gate`` as ``build_lora_mm(w, cur)`` and multiplies by ``up_s``/``gate_s`` *after* it, so the
LoRA term of those two is scaled by Δ as well (in the native graphs ``build_ffn`` does the same for ``ffn_down``,
which the ``bitnet`` graph computes outside it). Their ``lora_b`` is therefore written as ``U / Δ`` when Δ is in a
``.scale`` tensor (``delta="tensor"``); with Δ folded into the block scales there is no ``.scale`` and ``B = U``.
Merging instead is not exact (``U·Vᵀ`` is full precision, the
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
from bitnet.export.names import LAYER_MATRICES, T, tensor_name
from bitnet.export.plan import (
    ExportHParams,
    check_exportable,
    grouped_scales,
    permute_rows,
    resolve_delta,
    row_permutation,
)
from bitnet.export.writer import RawTensor, add_tensors, atomic_gguf_write
from bitnet.families import BITNET, graphs
from bitnet.layers import BitLinearLRC


def lrc_pairs(model: nn.Module, hparams: ExportHParams | None = None, delta: str = "tensor"
              ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(base tensor name, A = Vᵀ (r × in), B = U (out × r); U / Δ for ffn_up/ffn_gate when Δ is a ``.scale``) per LRC
    layer, float32, with wq/wk rows permuted as in the base file."""
    pairs = []
    # build_ffn applies these matrices' ``.scale`` after the LoRA residual (module docstring): the bitnet graph calls
    # it without ffn_down (ffn_sub_norm sits in between), the native graphs with it (Graph.lora_scaled_after)
    graph = BITNET if hparams is None else graphs()[hparams.arch]
    after = tuple(T[n.upper()] for n in graph.lora_scaled_after)
    for i, block in enumerate(decoder_layers(model)):
        for path, kind in LAYER_MATRICES.items():
            layer = block.get_submodule(path)
            if isinstance(layer, BitLinearLRC):
                with torch.no_grad():
                    a = layer.lrc_v.detach().float().t().contiguous().cpu().numpy()
                    b = layer.lrc_u.detach().float().contiguous().cpu().numpy()
                if kind in after and delta == "tensor":
                    b = b / np.float32(layer.ternary_weight().scale)
                heads = row_permutation(hparams, path) if hparams is not None else None
                if heads is not None:
                    b = permute_rows(b, heads)
                pairs.append((tensor_name(kind, i), a, np.ascontiguousarray(b)))
    return pairs


def export_lrc_adapter(model: nn.Module, out: str | Path, *, name: str = "bitdistill-lrc",
                       hparams: ExportHParams | None = None, delta: str = "auto") -> Path:
    """Write the student's LRC adapters as a llama.cpp LoRA adapter for its base GGUF (same arch, same Δ placement)."""
    cfg = getattr(model, "bitnet_config", None)
    if cfg is None or not cfg.lrc_rank:
        raise UnsupportedExportError("the student has no LRC adapters to export")
    hp = hparams if hparams is not None else check_exportable(model)
    delta = resolve_delta(hp.arch, delta, grouped_scales(model))
    pairs = lrc_pairs(model, hp, delta)
    if not pairs:
        raise UnsupportedExportError("the student has no LRC adapters to export")
    rank = int(cfg.lrc_rank)
    tensors: list[RawTensor] = []
    for base, a, b in pairs:
        tensors += [(f"{base}.lora_a", a, None), (f"{base}.lora_b", b, None)]

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
        w.add_name(name)
        add_tensors(w, tensors)

    out = Path(out)
    atomic_gguf_write(out, fill, arch=hp.arch)
    return out
