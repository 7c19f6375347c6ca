"""GGUF writer: a converted BitNet student as llama.cpp's ``bitnet`` architecture.

Written against the ``bitnet`` graph of the llama.cpp that llama-cpp-python 0.3.36 vendors
(``src/models/bitnet.cpp``, ``src/llama-model.cpp``, ``src/llama-graph.cpp``; see docs/export.md):

- per layer ``attn_norm`` → ``wq``/``wk``/``wv`` (no bias, no q/k norm) → NEOX RoPE (the HF ``rotate_half``
  layout, so no Q/K row permutation) → attention → ``attn_sub_norm`` → ``wo``; ``ffn_norm`` →
  ``silu(ffn_gate)·ffn_up`` → ``ffn_sub_norm`` → ``ffn_down``; ``output_norm``; **lm_head = token_embd**;
- every norm is an RMSNorm with the one ``attention.layer_norm_rms_eps``;
- each matrix's output is multiplied by its optional ``<name>.scale`` tensor (F32, one element):
  ``build_lora_mm(w, x, w_s)`` for wq/wk/wv/wo/ffn_down, ``build_ffn`` for ffn_up/ffn_gate (which applies the
  scale after a LoRA term, see :mod:`bitnet.export.lora`). ``wq`` and ``wo`` are ``n_embd × n_embd``.

Ternary matrices are written from :meth:`BitLinear.ternary_weight` — the int8 codes packed as TQ2_0 / TQ1_0
with block scale ``d = 1`` (the codes are exact) and the per-tensor absmean scale Δ as the exact F32
``.scale`` tensor — so the file holds exactly the student's ``Δ·codes``. ``weight_type="f16"`` writes the
same codes as F16 (also exact) with the same scales: a float file of the same student. For TQ types
llama.cpp quantizes the matrix input to Q8_K, i.e. int8 absmax per block of 256 values (the student: per
token), so with rows of 256 values the activation quantization is the same; the F16 path does not quantize
activations. Norms and scales are F32, the token embedding F16 (or F32).

Anything the graph cannot express raises :class:`UnsupportedExportError` before a byte is written; the file
appears atomically (temporary file + rename) and carries a SHA-256 of its tensor data that
:func:`bitnet.export.reader.read_gguf_checked` verifies.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import gguf
import numpy as np
import torch
from torch import nn

from bitnet.convert import BitNetConfig, decoder_layers
from bitnet.export.errors import UnsupportedExportError
from bitnet.export.vocab import vocab_metadata
from bitnet.layers import BitLinear, BitLinearLRC

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WeightType = Literal["tq2_0", "tq1_0", "f16"]
EmbeddingType = Literal["f16", "f32"]

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BITNET]  # "bitnet"
CHECKSUM_KEY = "bitdistill.tensor_data_sha256"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
QK_K = gguf.QK_K  # 256: TQ1_0 / TQ2_0 block size along a matrix row (its input dimension)

_QTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "tq2_0": gguf.GGMLQuantizationType.TQ2_0,
    "tq1_0": gguf.GGMLQuantizationType.TQ1_0,
    "f16": gguf.GGMLQuantizationType.F16,
}
_FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0,
    "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
}

T = gguf.MODEL_TENSOR
# HF module path inside a decoder block → llama.cpp tensor; the norms before wo / ffn_down are the SubLNs
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
SUB_NORMS: dict[str, gguf.MODEL_TENSOR] = {"self_attn.o_proj": T.ATTN_SUB_NORM, "mlp.down_proj": T.FFN_SUB_NORM}


def tensor_name(kind: gguf.MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    base = gguf.TENSOR_NAMES[kind]
    return f"{base.format(bid=layer) if layer is not None else base}.{suffix}"


@dataclass(frozen=True)
class BitnetHParams:
    """The hyper-parameters llama.cpp reads for the ``bitnet`` architecture."""

    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rope_theta: float
    rms_eps: float


@dataclass(frozen=True)
class ExportResult:
    path: Path
    weight_type: str
    file_bytes: int
    n_tensors: int
    ternary_params: int
    ternary_bytes: int
    hparams: BitnetHParams
    lora_path: Path | None = None

    @property
    def bits_per_ternary_weight(self) -> float:
        return 8.0 * self.ternary_bytes / max(self.ternary_params, 1)


# ------------------------------------------------------------------------------------------- validation
def _unsupported(msg: str) -> UnsupportedExportError:
    return UnsupportedExportError(f"cannot export to llama.cpp 'bitnet': {msg}")


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise _unsupported(f"RoPE scaling {rope_type!r} (only plain RoPE is written)")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise _unsupported("the config has no rope_theta")
    if float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise _unsupported("partial rotary embeddings")
    return float(theta)


def check_exportable(model: nn.Module, weight_type: WeightType = "tq2_0") -> BitnetHParams:
    """Raise :class:`UnsupportedExportError` unless ``model`` maps exactly onto llama.cpp's ``bitnet`` graph."""
    bcfg: BitNetConfig | None = getattr(model, "bitnet_config", None)
    if bcfg is None:
        raise _unsupported("not a converted BitNet student (run convert_to_bitnet first)")
    cfg = model.config
    mt = getattr(cfg, "model_type", "?")
    if mt == "qwen2" or any(getattr(cfg, k, False) for k in ("attention_bias", "qkv_bias")):
        raise _unsupported(f"{mt} has q/k/v biases, which the bitnet graph does not load")
    if mt == "qwen3":
        raise _unsupported("qwen3 has q/k norms, which the bitnet graph does not apply")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise _unsupported(f"model type {mt!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if bcfg.subln != "standard":
        raise _unsupported(f"SubLN placement {bcfg.subln!r}; llama.cpp has sub-norms only before wo and ffn_down ('standard')")
    if getattr(cfg, "mlp_bias", False):
        raise _unsupported("MLP biases")
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise _unsupported(f"FFN activation {act!r} (the bitnet graph uses SiLU-gated FFN)")
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or not (head.weight is emb or torch.equal(head.weight, emb)):
        raise _unsupported("untied input/output embeddings; the bitnet graph uses token_embd as lm_head")
    if getattr(head, "bias", None) is not None:
        raise _unsupported("lm_head has a bias")
    sliding = getattr(cfg, "sliding_window", None)
    n_ctx = int(cfg.max_position_embeddings)
    if sliding is not None and getattr(cfg, "use_sliding_window", True) and int(sliding) < n_ctx:
        raise _unsupported(f"sliding-window attention ({sliding} < {n_ctx} positions)")
    n_embd, n_head = int(cfg.hidden_size), int(cfg.num_attention_heads)
    n_head_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(cfg, "head_dim", None) or n_embd // n_head)
    if head_dim * n_head != n_embd:
        raise _unsupported(f"heads·head_dim = {n_head}·{head_dim} ≠ hidden size {n_embd} (wq/wo must be n_embd × n_embd)")
    eps = float(cfg.rms_norm_eps)
    if bcfg.norm_eps is not None and not math.isclose(bcfg.norm_eps, eps, rel_tol=1e-6):
        raise _unsupported(f"SubLN eps {bcfg.norm_eps} differs from rms_norm_eps {eps}; llama.cpp has one eps for all norms")
    layers = decoder_layers(model)
    n_ff = int(cfg.intermediate_size)
    for i, block in enumerate(layers):
        for path in LAYER_MATRICES:
            m = block.get_submodule(path)
            if not isinstance(m, BitLinear):
                raise _unsupported(f"layer {i} {path} is a {type(m).__name__}, not a BitLinear")
            if m.bias is not None:
                raise _unsupported(f"layer {i} {path} has a bias")
            if m.quant_lambda != 1.0:
                raise _unsupported(
                    f"layer {i} {path} has quant_lambda {m.quant_lambda}; the file holds the fully ternary student (λ = 1)"
                )
            if (m.sub_norm is not None) != (path in SUB_NORMS):
                raise _unsupported(f"layer {i} {path}: SubLN {'present' if m.sub_norm is not None else 'missing'}")
            if weight_type != "f16" and m.in_features % QK_K:
                raise _unsupported(
                    f"layer {i} {path} has {m.in_features} inputs, not a multiple of {QK_K} as {weight_type.upper()} needs"
                )
    _check_every_parameter_mapped(model, layers)
    return BitnetHParams(
        n_vocab=int(emb.shape[0]),
        n_embd=n_embd,
        n_ff=n_ff,
        n_layer=len(layers),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ctx=n_ctx,
        rope_theta=_rope_theta(cfg),
        rms_eps=eps,
    )


def _check_every_parameter_mapped(model: nn.Module, layers: nn.ModuleList) -> None:
    """Any parameter without a place in the graph (e.g. q_norm, a bias) would be silently dropped: refuse."""
    mapped = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    norm = getattr(base, "norm", None)
    if norm is not None:
        mapped.add(id(norm.weight))
    for block in layers:
        for path in LAYER_NORMS:
            mapped.add(id(block.get_submodule(path).weight))
        for path in LAYER_MATRICES:
            m = block.get_submodule(path)
            mapped.add(id(m.weight))
            if m.sub_norm is not None:
                mapped.add(id(m.sub_norm.weight))
            if isinstance(m, BitLinearLRC):  # shipped as a LoRA adapter, see bitnet.export.lora
                mapped.update({id(m.lrc_u), id(m.lrc_v)})
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in mapped:
            raise _unsupported(f"parameter {name} has no place in the bitnet graph")


# ---------------------------------------------------------------------------------------------- tensors
def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def ternary_tensor(layer: BitLinear, weight_type: WeightType) -> tuple[np.ndarray, gguf.GGMLQuantizationType, float]:
    """The packed codes of ``layer`` in ``weight_type`` (block scale 1) and its per-tensor scale Δ."""
    tw = layer.ternary_weight()
    codes = tw.codes.cpu().numpy().astype(np.float32)
    qtype = _QTYPES[weight_type]
    return gguf.quants.quantize(codes, qtype), qtype, tw.scale


def _tensors(model: nn.Module, hp: BitnetHParams, weight_type: WeightType, embedding_type: EmbeddingType) -> Iterator[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None, bool]]:
    """(name, data, raw type or None for plain float arrays, is ternary) in file order."""
    emb = _f32(model.get_input_embeddings().weight)
    yield tensor_name(T.TOKEN_EMBD), emb.astype(np.float16 if embedding_type == "f16" else np.float32), None, False
    yield tensor_name(T.OUTPUT_NORM), _f32(model.get_decoder().norm.weight), None, False
    for i, block in enumerate(decoder_layers(model)):
        for path, kind in LAYER_NORMS.items():
            yield tensor_name(kind, i), _f32(block.get_submodule(path).weight), None, False
        for path, kind in LAYER_MATRICES.items():
            layer = block.get_submodule(path)
            if layer.sub_norm is not None:
                yield tensor_name(SUB_NORMS[path], i), _f32(layer.sub_norm.weight), None, False
            data, qtype, scale = ternary_tensor(layer, weight_type)
            yield tensor_name(kind, i), data, qtype if qtype != gguf.GGMLQuantizationType.F16 else None, True
            yield tensor_name(kind, i, "scale"), np.array([scale], dtype=np.float32), None, False


def _add_hparams(w: gguf.GGUFWriter, hp: BitnetHParams, weight_type: WeightType, name: str) -> None:
    w.add_name(name)
    w.add_file_type(int(_FILE_TYPES[weight_type]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(hp.n_vocab)
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(hp.n_ff)
    w.add_block_count(hp.n_layer)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_key_length(hp.head_dim)
    w.add_value_length(hp.head_dim)
    w.add_rope_dimension_count(hp.head_dim)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)


def atomic_gguf_write(path: Path, fill: Callable[[gguf.GGUFWriter], None], arch: str = ARCH) -> None:
    """Create a GGUF at ``path`` through a temporary sibling file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            fill(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_tensors_with_checksum(w: gguf.GGUFWriter, tensors: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]]) -> None:
    """Add the tensors and, as metadata, the SHA-256 of their bytes in file order (checked by the reader)."""
    h = hashlib.sha256()
    for name, data, raw in tensors:
        data = np.ascontiguousarray(data)
        h.update(data.tobytes())
        w.add_tensor(name, data, raw_dtype=raw)
    w.add_string(CHECKSUM_KEY, h.hexdigest())


def _resolve(
    model: nn.Module | str | Path, tokenizer: PreTrainedTokenizerBase | str | Path | None
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    from transformers import AutoTokenizer

    from bitnet.student import load_student

    src = None
    if not isinstance(model, nn.Module):
        src = Path(model)
        model = load_student(src)
    if tokenizer is None:
        if src is None:
            raise UnsupportedExportError("a tokenizer is needed (the student was passed as a module)")
        tokenizer = src
    if isinstance(tokenizer, (str, Path)):  # a str has .encode too
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        except (OSError, ValueError) as e:
            raise UnsupportedExportError(
                f"no usable Hugging Face tokenizer in {tokenizer} ({str(e).splitlines()[0].rstrip(':')}); pass the tokenizer explicitly"
            ) from e
    return model, tokenizer


def export_gguf(
    model: nn.Module | str | Path,
    out: str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
    weight_type: WeightType = "tq2_0",
    embedding_type: EmbeddingType = "f16",
    tokenizer_pre: str | None = None,
    name: str = "bitdistill-student",
    lora_out: str | Path | None = None,
) -> ExportResult:
    """Write the student (a module or a student directory) as a llama.cpp ``bitnet`` GGUF at ``out``.

    The LRC adapters of an LRC student cannot be part of the base file (U·Vᵀ is full precision, the base
    matrices ternary): they go to ``lora_out`` as a llama.cpp LoRA adapter (:mod:`bitnet.export.lora`), and
    an LRC student without ``lora_out`` is refused — the base file alone would load and be wrong.
    """
    if weight_type not in _QTYPES:
        raise UnsupportedExportError(f"weight_type must be one of {', '.join(_QTYPES)}, got {weight_type!r}")
    if embedding_type not in ("f16", "f32"):
        raise UnsupportedExportError(f"embedding_type must be f16 or f32, got {embedding_type!r}")
    model, tokenizer = _resolve(model, tokenizer)
    hp = check_exportable(model, weight_type)
    lrc_rank = int(model.bitnet_config.lrc_rank)
    if lrc_rank and lora_out is None:
        raise UnsupportedExportError(
            f"the student has LRC adapters (rank {lrc_rank}); pass lora_out to write them as a llama.cpp LoRA adapter"
        )
    vocab = vocab_metadata(tokenizer, hp.n_vocab, tokenizer_pre=tokenizer_pre)
    out = Path(out)
    tensors: list[tuple[str, np.ndarray, gguf.GGMLQuantizationType | None]] = []
    ternary_params = ternary_bytes = 0
    with torch.no_grad():
        for tname, data, raw, is_ternary in _tensors(model, hp, weight_type, embedding_type):
            tensors.append((tname, data, raw))
            if is_ternary:
                ternary_bytes += data.nbytes
                ternary_params += data.size if raw is None else int(np.prod(gguf.quants.quant_shape_from_byte_shape(data.shape, raw)))

    def fill(w: gguf.GGUFWriter) -> None:
        _add_hparams(w, hp, weight_type, name)
        vocab.add_to(w)
        add_tensors_with_checksum(w, tensors)

    atomic_gguf_write(out, fill)
    lora_path = None
    if lrc_rank:
        from bitnet.export.lora import export_lrc_adapter

        lora_path = export_lrc_adapter(model, lora_out, name=f"{name}-lrc")
    return ExportResult(
        path=out,
        weight_type=weight_type,
        file_bytes=out.stat().st_size,
        n_tensors=len(tensors),
        ternary_params=ternary_params,
        ternary_bytes=ternary_bytes,
        hparams=hp,
        lora_path=lora_path,
    )
