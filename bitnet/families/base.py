"""What a model family is: its Hugging Face model types, decoder layout, llama.cpp graph and export rules.

A :class:`ModelFamily` is pure data plus the checks that read a Hugging Face config; the converter
(:mod:`bitnet.convert`), the GGUF plan (:mod:`bitnet.export.plan`), the LoRA writer, the HF export, the GGUF teacher
loader and the CLI read it instead of branching on names. A :class:`Graph` is a llama.cpp compute graph
(``general.architecture``) described by what it loads, so that whether a student fits a graph is a comparison of
the student's features with the graph's, computed from the teacher's config before any training
(:func:`ModelFamily.export_refusal`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

SubLN = Literal["standard", "all", "none"]
ATTN_PROJS = ("q", "k", "v", "o")


@dataclass(frozen=True)
class DecoderLayout:
    """Where the decoder blocks live (dotted path from the CausalLM) and where SubLN goes inside a block."""

    layers_attr: str = "model.layers"
    attn_out: str = "self_attn.o_proj"  # SubLN 'standard': on the input of this projection ...
    mlp_down: str = "mlp.down_proj"  # ... and of this one (llama.cpp attn_sub_norm / ffn_sub_norm)

    def subln_targets(self) -> frozenset[str]:
        return frozenset({self.attn_out, self.mlp_down})


@dataclass(frozen=True)
class Graph:
    """A llama.cpp graph, described by what its loader and builder take (vendored llama.cpp, ``src/models/*.cpp``)."""

    name: str  # general.architecture
    sub_norms: bool = False  # attn_sub_norm before wo, ffn_sub_norm before ffn_down (SubLN 'standard')
    output_tensor: bool = True  # loads an untied `output` (else lm_head = token_embd)
    biases: frozenset[str] = frozenset()  # attention projections (q/k/v/o) whose bias it adds
    required_biases: frozenset[str] = frozenset()  # ... and those it requires
    qk_norm: bool = False  # per-head q/k RMSNorms (required when True, refused when False)
    rope: Literal["norm", "neox"] = "neox"  # NORM: HF's rotate-half Q/K rows are permuted in the file
    rope_scalings: tuple[str, ...] = ()  # HF rope types besides "default" the graph reproduces
    scale_tensors: bool = True  # multiplies every ternary matrix's output by its `.scale` tensor
    free_head_dim: bool = True  # takes head_dim ≠ n_embd / n_head
    # build_ffn applies these matrices' `.scale` after the LoRA residual (bitnet.export.lora)
    lora_scaled_after: tuple[str, ...] = ("ffn_up", "ffn_gate", "ffn_down")


# the SubLN graph: Llama shapes with the two sub-norms, tied output, no biases, no q/k norms, no RoPE scaling
BITNET = Graph("bitnet", sub_norms=True, output_tensor=False, rope="neox", free_head_dim=False,
               lora_scaled_after=("ffn_up", "ffn_gate"))


@dataclass(frozen=True)
class Features:
    """What a student of a given teacher config carries that a graph must load."""

    biases: frozenset[str] = frozenset()  # attention projections with a bias
    mlp_bias: bool = False
    qk_norm: bool = False
    tied: bool = True
    head_dim: int = 0
    n_embd: int = 0
    n_head: int = 0
    rope_type: str = "default"
    partial_rotary: bool = False
    sliding_window: int | None = None  # an active window smaller than the context
    hidden_act: str = "silu"
    n_ctx: int = 0


@dataclass(frozen=True)
class ModelFamily:
    """One model family: everything the pipeline needs to convert, export and reload its students."""

    name: str
    model_types: tuple[str, ...]  # HF config.model_type values it accepts
    hf_class_prefix: str  # transformers' <prefix>ForCausalLM, the base of the HF student export
    native: Graph  # the llama.cpp graph of a SubLN-free student (and of a GGUF teacher of this family)
    subln_graph: Graph | None = BITNET  # the graph of a SubLN 'standard' student, when one can hold the family
    layout: DecoderLayout = field(default_factory=DecoderLayout)
    tokenizers: tuple[str, ...] = ("gpt2",)  # llama.cpp tokenizer models its checkpoints ship (bitnet.export.vocab)
    hf_bitnet: bool = False  # transformers' own `bitnet` model type reproduces its SubLN students
    examples: str = ""  # checkpoints of the family, for docs and messages

    # ------------------------------------------------------------------ features read from a teacher config
    def attention_biases(self, cfg: Any) -> frozenset[str]:
        """Attention projections that carry a bias (Llama/Mistral: ``attention_bias``)."""
        return frozenset(ATTN_PROJS) if getattr(cfg, "attention_bias", False) else frozenset()

    def has_qk_norm(self, cfg: Any) -> bool:
        return False

    def features(self, cfg: Any) -> Features:
        n_embd, n_head = int(cfg.hidden_size), int(cfg.num_attention_heads)
        params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        rope_type = str(params.get("rope_type", params.get("type", "default")) or "default")
        sliding = getattr(cfg, "sliding_window", None)
        n_ctx = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        active = sliding is not None and getattr(cfg, "use_sliding_window", True) and int(sliding) < n_ctx
        return Features(
            biases=self.attention_biases(cfg), mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            qk_norm=self.has_qk_norm(cfg), tied=bool(getattr(cfg, "tie_word_embeddings", False)),
            head_dim=int(getattr(cfg, "head_dim", None) or n_embd // n_head), n_embd=n_embd, n_head=n_head,
            rope_type=rope_type, partial_rotary=float(getattr(cfg, "partial_rotary_factor", 1.0) or 1.0) != 1.0,
            sliding_window=int(sliding) if active else None, hidden_act=str(getattr(cfg, "hidden_act", "silu")),
            n_ctx=n_ctx,
        )

    # ------------------------------------------------------------------ graphs
    def graphs(self) -> dict[str, Graph]:
        out = {self.native.name: self.native}
        if self.subln_graph is not None:
            out[self.subln_graph.name] = self.subln_graph
        return out

    def graph_for(self, subln: SubLN, arch: str = "auto") -> Graph:
        """The graph a student with this SubLN placement goes to (``arch`` forces one); ValueError if none."""
        if subln == "all":
            raise ValueError("SubLN 'all': llama.cpp has sub-norms only before wo and ffn_down ('standard', the "
                             "bitnet graph)")
        if subln == "none":
            graph = self.native
        elif self.subln_graph is None:
            raise ValueError(f"no stock llama.cpp graph holds a SubLN {self.name} student")
        else:
            graph = self.subln_graph
        if arch not in ("auto", graph.name):
            raise ValueError(f"a {self.name} student with SubLN {subln!r} maps onto llama.cpp {graph.name!r}, "
                             f"not {arch!r}")
        return graph

    def graph_refusal(self, graph: Graph, f: Features) -> str | None:
        """Why ``graph`` cannot reproduce a student with features ``f`` (None when it can)."""
        if f.mlp_bias:
            return "MLP biases (llama.cpp applies .scale after the bias)"
        if f.hidden_act != "silu":
            return f"FFN activation {f.hidden_act!r} (the graphs use a SiLU-gated FFN)"
        if f.sliding_window is not None:
            return f"sliding-window attention ({f.sliding_window} < {f.n_ctx} positions)"
        if f.partial_rotary:
            return "partial rotary embeddings"
        extra = [p for p in ATTN_PROJS if p in f.biases - graph.biases]
        if extra:
            return f"{'/'.join(extra)} projection biases (the {graph.name} graph loads none)"
        missing = [p for p in ATTN_PROJS if p in graph.required_biases - f.biases]
        if missing:
            return f"no {'/'.join(missing)} biases, which the {graph.name} graph expects"
        if f.qk_norm and not graph.qk_norm:
            return f"per-head q/k norms (the {graph.name} graph has none)"
        if graph.qk_norm and not f.qk_norm:
            return f"no q/k norms, which the {graph.name} graph expects"
        if not f.tied and not graph.output_tensor:
            return f"untied input/output embeddings (the {graph.name} graph uses token_embd as lm_head)"
        if not graph.free_head_dim and f.head_dim * f.n_head != f.n_embd:
            return (f"heads·head_dim = {f.n_head}·{f.head_dim} ≠ hidden size {f.n_embd} "
                    f"(the {graph.name} graph's wq/wo are n_embd × n_embd)")
        if f.rope_type != "default" and f.rope_type not in graph.rope_scalings:
            return f"RoPE scaling {f.rope_type!r} (the {graph.name} graph reproduces {_or(graph.rope_scalings)})"
        return None

    def export_refusal(self, cfg: Any, subln: SubLN, arch: str = "auto") -> str | None:
        """From the teacher's config and the SubLN placement alone: why the student cannot go to llama.cpp."""
        try:
            graph = self.graph_for(subln, arch)
        except ValueError as e:
            return str(e)
        return self.graph_refusal(graph, self.features(cfg))


def _or(items: tuple[str, ...]) -> str:
    return " or ".join(repr(i) for i in items) if items else "none"
