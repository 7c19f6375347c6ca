"""Which llama.cpp graph a student maps onto, and the exact type of every tensor: the export plan.

The graphs (read in the llama.cpp that llama-cpp-python 0.3.36 vendors, ``src/models/*.cpp``,
``src/llama-model.cpp``; see docs/export.md) and which family goes where are data in :mod:`bitnet.families`
(:class:`~bitnet.families.Graph`: sub-norms, output tensor, biases, q/k norms, RoPE kind and scalings, ``.scale``
tensors); this module only reads them:

- ``bitnet`` — SubLN ``standard`` students: ``attn_sub_norm`` before ``wo``, ``ffn_sub_norm`` before ``ffn_down``,
  NEOX RoPE, **lm_head = token_embd**, no biases, no q/k norms, no ``rope_freqs``, ``wq``/``wo`` ``n_embd × n_embd``;
- ``llama`` — SubLN ``none`` Llama / Mistral: NORM RoPE (Q/K rows permuted as ``convert_hf_to_gguf.py`` does),
  optional q/k/v/o biases, free ``head_dim``, untied ``output``, llama3 scaling as ``rope_freqs``, linear as metadata;
- ``qwen2`` — q/k/v biases, NEOX RoPE, untied ``output``; ``qwen3`` — per-head q/k RMSNorms, free ``head_dim``.

Every ternary matrix is written from its codes and Δ (never re-quantized from floats) in the best *exact* type its
row length allows (:mod:`bitnet.export.quants`). Δ goes either into an F32 ``<tensor>.scale`` (``delta="tensor"``,
exact: the ``bitnet`` graph loads it, and this llama.cpp loads ``.scale`` for every architecture in its generic
pass after ``load_arch_tensors``) or into the fp16 block scales (``delta="fold"``, Δ rounded to 11 bits, for
runtimes without that pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import gguf
import numpy as np
import torch
from torch import nn

from bitnet.convert import BitNetConfig, decoder_layers
from bitnet.export.errors import UnsupportedExportError
from bitnet.export.names import (
    LAYER_MATRICES,
    LAYER_NORMS,
    QK_K,
    QK_NORMS,
    SUB_NORMS,
    T,
    tensor_name,
)
from bitnet.export.quants import (
    DELTA_MODES,
    EMBEDDING_QTYPES,
    EMBEDDING_TYPES,
    FALLBACKS,
    TERNARY_QTYPES,
    VEC_DOT,
    WEIGHT_TYPES,
    DeltaMode,
    Fallback,
    bits_per_weight,
    block_size,
    pack_ternary,
    quantize_embedding,
)
from bitnet.families import UnsupportedFamilyError, family_of, graph_names, graphs
from bitnet.families.base import ATTN_PROJS, Features, Graph, ModelFamily
from bitnet.layers import BitLinear, BitLinearLRC, TernaryWeight, bit_linears

# measured (benchmarks/gguf_speed.py smollm2, docs/export.md): with the 576-wide rows of SmolLM2 as Q4_0 the student
# decodes at 1.79× the F16 teacher, as Q8_0 at 1.63× (1 thread; 2 threads 1.79× vs 1.17×), and the file is 32 % smaller
FALLBACK_BY_SPEED = "q4_0"


def unsupported(msg: str, arch: str = "llama.cpp") -> UnsupportedExportError:
    return UnsupportedExportError(f"cannot export to llama.cpp {arch!r}: {msg}" if arch != "llama.cpp"
                                  else f"cannot export to llama.cpp: {msg}")


@dataclass(frozen=True)
class ExportHParams:
    """The hyper-parameters llama.cpp reads, for any of the four graphs."""

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
    arch: str = "bitnet"
    tied: bool = True
    rope_scaling: str = "none"  # none | linear | llama3
    rope_factor: float = 1.0
    rope_freqs: tuple[float, ...] | None = None  # llama3: llama.cpp's rope_freqs (divisors of each frequency)


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the file: GGUF name, shape (rows × row length, HF order), type and bits per value."""

    name: str
    shape: tuple[int, ...]
    type: str
    role: str  # ternary | embedding | output | norm | scale | bias | rope
    note: str = ""

    @property
    def qtype(self) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType[self.type]

    @property
    def bits(self) -> float:
        return bits_per_weight(self.qtype)

    @property
    def n_values(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_bytes(self) -> int:
        blk, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return self.n_values // blk * size


@dataclass
class ExportPlan:
    arch: str
    hparams: ExportHParams
    weight_type: str
    embedding_type: str
    delta: str
    tensors: list[TensorPlan] = field(default_factory=list)

    def ternary(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.role == "ternary"]

    @property
    def ternary_params(self) -> int:
        return sum(t.n_values for t in self.ternary())

    @property
    def ternary_bytes(self) -> int:
        return sum(t.n_bytes for t in self.ternary())

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.ternary():
            counts[t.type] = counts.get(t.type, 0) + t.n_values
        return counts

    def table(self, *, all_tensors: bool = False) -> str:
        """A printable table (markdown): tensor, shape, type, bits; norms/scales only with ``all_tensors``."""
        rows = [t for t in self.tensors if all_tensors or t.role in ("ternary", "embedding", "output")]
        where = ".scale F32" if self.delta == "tensor" else "fp16 block scales"
        lines = [f"arch {self.arch}; ternary {self.weight_type} (Δ in {where}); embedding {self.embedding_type}",
                 "| tensor | shape | type | bits | note |", "|---|---|---|---|---|"]
        lines += [f"| {t.name} | {' × '.join(map(str, t.shape))} | {t.type} | {t.bits:.4g} | {t.note} |" for t in rows]
        mix = ", ".join(f"{k} {v / max(self.ternary_params, 1):.1%}" for k, v in sorted(self.type_counts().items()))
        bpw = 8 * self.ternary_bytes / max(self.ternary_params, 1)
        lines.append(f"\nternary: {self.ternary_params / 1e6:.2f} M weights, {bpw:.4f} "
                     f"bits/weight ({mix}); file ≈ {sum(t.n_bytes for t in self.tensors) / 1e6:.1f} MB + vocabulary")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ architecture
def _rope(cfg, graph: Graph) -> tuple[float, str, float, tuple[float, ...] | None]:
    """θ and RoPE scaling as ``graph`` takes them (the scalings it reproduces: ``Graph.rope_scalings``)."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope_type = str(params.get("rope_type", params.get("type", "default")) or "default")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise unsupported("the config has no rope_theta", graph.name)
    theta = float(theta)
    if rope_type == "default":
        return theta, "none", 1.0, None
    if rope_type not in graph.rope_scalings:
        raise unsupported(f"RoPE scaling {rope_type!r} for {graph.name}", graph.name)
    if rope_type == "linear":
        return theta, "linear", float(params["factor"]), None
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return theta, "llama3", 1.0, llama3_rope_freqs(params, theta, head_dim)


def llama3_rope_freqs(params: dict, theta: float, dim: int) -> tuple[float, ...]:
    """``rope_freqs`` as ``convert_hf_to_gguf.py`` (LlamaModel.generate_extra_tensors) computes it."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(float(factor))
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(out)


def _tied(model: nn.Module) -> bool:
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    return head is not None and (head.weight is emb or torch.equal(head.weight, emb))


def _attn(block: nn.Module) -> nn.Module:
    return block.get_submodule("self_attn")


def ways_out(family: ModelFamily) -> str:
    return (f"convert with --subln none (the native {family.native.name!r} graph), "
            "or use the HF export (--hf-out); docs/export.md")


def resolve_graph(model: nn.Module, arch: str = "auto") -> tuple[ModelFamily, Graph]:
    """The student's family and the llama.cpp graph it goes to (``arch="auto"``: the family's SubLN graph for SubLN
    ``standard``, its native graph for SubLN ``none``; :meth:`bitnet.families.ModelFamily.graph_for`)."""
    bcfg: BitNetConfig | None = getattr(model, "bitnet_config", None)
    if bcfg is None:
        raise unsupported("not a converted BitNet student (run convert_to_bitnet first)", "bitnet")
    try:
        family = family_of(model)
    except UnsupportedFamilyError as e:
        raise unsupported(str(e)) from e
    if arch not in ("auto", *graph_names()):
        raise unsupported(f"arch must be auto or one of {', '.join(graph_names())}, got {arch!r}")
    try:
        return family, family.graph_for(bcfg.subln, arch)
    except ValueError as e:
        raise unsupported(f"{e}; {ways_out(family)}") from e


def resolve_arch(model: nn.Module, arch: str = "auto") -> str:
    """The name of the llama.cpp graph for ``model`` (:func:`resolve_graph`)."""
    return resolve_graph(model, arch)[1].name


def model_features(model: nn.Module, family: ModelFamily) -> Features:
    """The family's config features, with tying and attention biases read from the weights themselves."""
    f = family.features(model.config)
    biases = set()
    for block in decoder_layers(model):
        for proj in ATTN_PROJS:
            if getattr(_attn(block).get_submodule(f"{proj}_proj"), "bias", None) is not None:
                biases.add(proj)
    return replace(f, tied=_tied(model), biases=frozenset(biases))


def check_exportable(model: nn.Module, weight_type: str = "tq2_0", arch: str = "auto") -> ExportHParams:
    """Raise :class:`UnsupportedExportError` unless ``model`` maps exactly onto a llama.cpp graph; its hparams.

    What the graph takes is the family's data (:mod:`bitnet.families`): the same check
    :func:`bitnet.families.ModelFamily.export_refusal` runs on a teacher's config before training, here on the
    student's real weights, plus what only the weights show (BitLinear layers at λ = 1, SubLN where the graph has it,
    every parameter with a place in the file)."""
    family, graph = resolve_graph(model, arch)
    arch = graph.name
    bcfg: BitNetConfig = model.bitnet_config
    cfg = model.config
    head = model.get_output_embeddings()
    if head is None:
        raise unsupported("the model has no output embedding", arch)
    if getattr(head, "bias", None) is not None:
        raise unsupported("lm_head has a bias", arch)
    f = model_features(model, family)
    why = family.graph_refusal(graph, f)
    if why is not None:
        raise unsupported(f"{why}; {ways_out(family)}" if graph.sub_norms else why, arch)
    eps = float(cfg.rms_norm_eps)
    if graph.sub_norms and bcfg.norm_eps is not None and not math.isclose(bcfg.norm_eps, eps, rel_tol=1e-6):
        raise unsupported(f"SubLN eps {bcfg.norm_eps} differs from rms_norm_eps {eps}; "
                          "llama.cpp has one eps for all norms", arch)
    layers = decoder_layers(model)
    for i, block in enumerate(layers):
        for path in LAYER_MATRICES:
            m = block.get_submodule(path)
            if not isinstance(m, BitLinear):
                raise unsupported(f"layer {i} {path} is a {type(m).__name__}, not a BitLinear", arch)
            if m.quant_lambda != 1.0:
                raise unsupported(f"layer {i} {path} has quant_lambda {m.quant_lambda}; "
                                  "the file holds the fully ternary "
                                  "student (λ = 1)", arch)
            if m.bias is not None and path.startswith("mlp."):
                raise unsupported(f"layer {i} {path} has a bias, which the {arch} graph does not load", arch)
            if (m.sub_norm is not None) != (graph.sub_norms and path in SUB_NORMS):
                raise unsupported(f"layer {i} {path}: SubLN {'present' if m.sub_norm is not None else 'missing'}", arch)
        if graph.qk_norm:
            for path in QK_NORMS:
                norm = block.get_submodule(path)
                if tuple(norm.weight.shape) != (f.head_dim,):
                    raise unsupported(f"layer {i} {path} has shape {tuple(norm.weight.shape)}, not ({f.head_dim},)",
                                      arch)
    _check_every_parameter_mapped(model, layers, graph)
    theta, scaling, factor, freqs = _rope(cfg, graph)
    n_head = int(cfg.num_attention_heads)
    return ExportHParams(
        n_vocab=int(model.get_input_embeddings().weight.shape[0]), n_embd=f.n_embd, n_ff=int(cfg.intermediate_size),
        n_layer=len(layers), n_head=n_head, n_head_kv=int(getattr(cfg, "num_key_value_heads", None) or n_head),
        head_dim=f.head_dim, n_ctx=f.n_ctx, rope_theta=theta, rms_eps=eps, arch=arch, tied=f.tied,
        rope_scaling=scaling, rope_factor=factor, rope_freqs=freqs,
    )


def _check_every_parameter_mapped(model: nn.Module, layers: nn.ModuleList, graph: Graph) -> None:
    """Any parameter without a place in the graph (e.g. a bias the graph ignores) would be silently dropped: refuse."""
    mapped = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    norm = getattr(base, "norm", None)
    if norm is not None:
        mapped.add(id(norm.weight))
    for block in layers:
        for path in LAYER_NORMS:
            mapped.add(id(block.get_submodule(path).weight))
        if graph.qk_norm:
            for path in QK_NORMS:
                mapped.add(id(block.get_submodule(path).weight))
        for path in LAYER_MATRICES:
            m = block.get_submodule(path)
            mapped.add(id(m.weight))
            if m.bias is not None:
                mapped.add(id(m.bias))
            if m.sub_norm is not None:
                mapped.add(id(m.sub_norm.weight))
            if m.weight_scales is not None:  # learned scales: the fp16 block scales of the ternary matrix
                mapped.add(id(m.weight_scales))
            if isinstance(m, BitLinearLRC):  # shipped as a LoRA adapter, see bitnet.export.lora
                mapped.update({id(m.lrc_u), id(m.lrc_v)})
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in mapped:
            raise unsupported(f"parameter {name} has no place in the {graph.name} graph", graph.name)


# ------------------------------------------------------------------------------------------------ types
def ternary_type(n_in: int, weight_type: str, fallback: str = "auto") -> tuple[str, str]:
    """The exact type for a ternary matrix with rows of ``n_in`` values, and a note when it is not ``weight_type``."""
    fb = FALLBACK_BY_SPEED if fallback == "auto" else fallback
    want = TERNARY_QTYPES[weight_type]
    if n_in % block_size(want) == 0:
        return weight_type, ""
    fb_q = TERNARY_QTYPES[fb]
    if weight_type in ("tq2_0", "tq1_0") and n_in % block_size(fb_q) == 0:
        return fb, f"row {n_in} not a multiple of {QK_K}: exact {fb.upper()}"
    return "f16", f"row {n_in} fits no block type: exact F16 codes"


def _check_options(weight_type: str, embedding_type: str, delta: str, fallback: str, n_embd: int) -> None:
    if weight_type not in WEIGHT_TYPES:
        raise UnsupportedExportError(f"weight_type must be one of {', '.join(WEIGHT_TYPES)}, got {weight_type!r}")
    if embedding_type not in EMBEDDING_TYPES:
        raise UnsupportedExportError(
            f"embedding_type must be one of {', '.join(EMBEDDING_TYPES)}, got {embedding_type!r}")
    if delta not in DELTA_MODES:
        raise UnsupportedExportError(f"delta must be one of {', '.join(DELTA_MODES)}, got {delta!r}")
    if fallback not in FALLBACKS:
        raise UnsupportedExportError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    blk = block_size(EMBEDDING_QTYPES[embedding_type])
    if n_embd % blk:
        raise UnsupportedExportError(f"embedding type {embedding_type} needs a width that is a multiple of {blk}; "
                                     f"the model has {n_embd} (use q8_0 or f16)")


# ------------------------------------------------------------------------------------------------ tensors
@dataclass
class Entry:
    plan: TensorPlan
    make: Callable[[], tuple[np.ndarray, gguf.GGMLQuantizationType | None]]


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """``convert_hf_to_gguf.py`` LlamaModel.permute: HF's rotate-half Q/K rows → llama.cpp's NORM RoPE pair order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def row_permutation(hp: ExportHParams, path: str) -> int | None:
    """Heads to permute the rows of ``path`` over in the file, or None (wq/wk of a NORM-RoPE graph: ``llama``)."""
    if graphs()[hp.arch].rope != "norm":
        return None
    return {"self_attn.q_proj": hp.n_head, "self_attn.k_proj": hp.n_head_kv}.get(path)


def _float(name: str, shape: tuple[int, ...], role: str, get: Callable[[], np.ndarray], note: str = "") -> Entry:
    return Entry(TensorPlan(name, shape, "F32", role, note), lambda: (get().astype(np.float32), None))


def _ternary_entries(layer: BitLinear, kind: gguf.MODEL_TENSOR, i: int, path: str, hp: ExportHParams,
                     weight_type: str, fallback: str, delta: str) -> Iterator[Entry]:
    wt, note = ternary_type(layer.in_features, weight_type, fallback)
    qtype = TERNARY_QTYPES[wt]
    heads = row_permutation(hp, path)
    cache: dict[str, object] = {}

    def tw():
        if "tw" not in cache:
            cache["tw"] = layer.ternary_weight()
        return cache["tw"]

    group = layer.scale_group
    if group and wt != "f16" and group % block_size(qtype):
        raise UnsupportedExportError(
            f"layer {i} {path}: one scale per {group} values cannot be written exactly as {wt.upper()} blocks of "
            f"{block_size(qtype)}: convert with a group size that is a multiple of the block")

    def make() -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
        codes = tw().codes.cpu().numpy()
        d: float | np.ndarray = 1.0 if delta == "tensor" else block_scales(tw(), 1 if wt == "f16" else
                                                                           block_size(qtype))
        if heads is not None:
            codes = permute_rows(codes, heads)
            d = permute_rows(d, heads) if isinstance(d, np.ndarray) else d
        data = pack_ternary(codes, qtype, d)
        return data, (None if wt == "f16" else qtype)

    shape = (layer.out_features, layer.in_features)
    yield Entry(TensorPlan(tensor_name(kind, i), shape, wt.upper(), "ternary", note), make)
    if delta == "tensor":
        yield Entry(TensorPlan(tensor_name(kind, i, "scale"), (1,), "F32", "scale", "Δ"),
                    lambda: (np.array([tw().scale], dtype=np.float32), None))
    if layer.bias is not None:
        def bias() -> np.ndarray:
            b = _f32(layer.bias)
            return permute_rows(b, heads) if heads is not None else b
        yield _float(tensor_name(kind, i, "bias"), (layer.out_features,), "bias", bias)


def entries(model: nn.Module, hp: ExportHParams, *, weight_type: str, embedding_type: str, delta: str,
            fallback: str) -> Iterator[Entry]:
    """Every tensor of the file in order, with a function that produces its data."""
    emb_q = EMBEDDING_QTYPES[embedding_type]
    emb = model.get_input_embeddings().weight
    shape = tuple(int(s) for s in emb.shape)
    note = "also the output (lm_head)" if hp.tied else ""
    yield Entry(TensorPlan(tensor_name(T.TOKEN_EMBD), shape, emb_q.name, "embedding", note),
                lambda: quantize_embedding(_f32(emb), embedding_type))
    yield _float(tensor_name(T.OUTPUT_NORM), (hp.n_embd,), "norm", lambda: _f32(model.get_decoder().norm.weight))
    if not hp.tied:
        head = model.get_output_embeddings().weight
        yield Entry(TensorPlan(tensor_name(T.OUTPUT), tuple(int(s) for s in head.shape), emb_q.name, "output"),
                    lambda: quantize_embedding(_f32(head), embedding_type))
    if hp.rope_freqs is not None:
        freqs = np.asarray(hp.rope_freqs, dtype=np.float32)
        yield _float(tensor_name(T.ROPE_FREQS), (len(freqs),), "rope", lambda: freqs, "llama3 RoPE scaling")
    for i, block in enumerate(decoder_layers(model)):
        for path, kind in LAYER_NORMS.items():
            w = block.get_submodule(path).weight
            yield _float(tensor_name(kind, i), (hp.n_embd,), "norm", lambda w=w: _f32(w))
        if graphs()[hp.arch].qk_norm:
            for path, kind in QK_NORMS.items():
                w = block.get_submodule(path).weight
                yield _float(tensor_name(kind, i), (hp.head_dim,), "norm", lambda w=w: _f32(w))
        for path, kind in LAYER_MATRICES.items():
            layer = block.get_submodule(path)
            if layer.sub_norm is not None:
                w = layer.sub_norm.weight
                yield _float(tensor_name(SUB_NORMS[path], i), (layer.in_features,), "norm", lambda w=w: _f32(w))
            yield from _ternary_entries(layer, kind, i, path, hp, weight_type, fallback, delta)


def block_scales(tw: TernaryWeight, block: int) -> float | np.ndarray:
    """The fp16 block scales of a ternary matrix in blocks of ``block`` values: Δ (one float) for a per-tensor scale,
    else (rows, blocks) with each group's scale repeated over the blocks of the group (the group is a multiple of
    the block, checked by the caller)."""
    if not tw.group:
        return tw.scale
    return np.repeat(tw.scales.float().cpu().numpy(), tw.group // block, axis=1)


def grouped_scales(model: nn.Module) -> bool:
    """Whether a student has per-group weight scales (they can only go into the block scales: ``delta="fold"``)."""
    return any(layer.scale_group for _, layer in bit_linears(model))


def resolve_delta(arch: str, delta: str, grouped: bool = False) -> str:
    """``auto``: Δ in an exact F32 ``.scale`` where the graph applies it to every matrix, else in the block scales.
    Per-group scales always go into the block scales (a ``.scale`` tensor holds one value per matrix)."""
    scales = graphs()[arch].scale_tensors
    if grouped:
        if delta == "tensor":
            raise unsupported("the student has one scale per group; a .scale tensor holds one per matrix: "
                              "use delta 'fold' (or auto)", arch)
        return "fold"
    if delta == "auto":
        return "tensor" if scales else "fold"
    if delta == "tensor" and not scales:
        raise unsupported(f"the {arch} graph does not apply .scale to its FFN matrices; use delta 'fold' (or auto)",
                          arch)
    return delta


def plan_export(model: nn.Module, *, weight_type: str = "tq2_0", embedding_type: str = "f16", delta: DeltaMode = "auto",
                fallback: Fallback = "auto", arch: str = "auto") -> ExportPlan:
    """The plan for ``model`` (for ``bitdistill export --plan``): nothing is computed or written."""
    hp = check_exportable(model, weight_type, arch)
    _check_options(weight_type, embedding_type, delta, fallback, hp.n_embd)
    delta = resolve_delta(hp.arch, delta, grouped_scales(model))
    plan = ExportPlan(hp.arch, hp, weight_type, embedding_type, delta)
    plan.tensors = [e.plan for e in entries(model, hp, weight_type=weight_type, embedding_type=embedding_type,
                                            delta=delta, fallback=fallback)]
    return plan


def activation_blocks(plan: ExportPlan) -> dict[str, str]:
    """Ternary tensor name → how llama.cpp's CPU matmul quantizes its input (q8_K, q8_0 or f16), for references."""
    return {t.name: VEC_DOT[t.type.lower()] for t in plan.ternary()}
