"""A memory plan per GPU for training a BitNet student, from the model's config alone (no weights).

For a model shape (a known name, a config dict with ``model_type``, or a transformers config), an accelerator
(``H100:8``), a node count, a micro-batch and a sequence length, :func:`plan_for` estimates what one GPU holds in
each parallel layout and recommends a layout and micro-batch:

- **params / grads / optimizer**: fp32 master weights (4 B/param), fp32 gradients (4 B), AdamW moments (8 B).
  DDP keeps all of them on every GPU; FSDP divides them by the number of GPUs and adds a working set (the root's
  bf16 parameters and fp32 gradients, two decoder blocks gathered in bf16 plus one block's gradients); CPU offload
  moves the sharded part to host memory.
- **teacher**: bf16 (2 B/param), frozen: replicated, or sharded like the student when it takes more than a quarter
  of the GPU (the :func:`bitnet.parallel.place_teacher` rule).
- **activations**: *measured*, not guessed: the student (converted to BitLinear + SubLN, bf16) runs a forward with
  labels on fake tensors (``FakeTensorMode``: shapes, no memory) at the real shape with one and two decoder blocks
  at two lengths, and every tensor autograd saves for backward is counted
  (``torch.autograd.graph.saved_tensors_hooks``). That gives a per-token part and a fixed part per block (BitLinear
  saves its quantized weight). The distillation terms (teacher logits, KL over the vocabulary) are measured the
  same way. Activation checkpointing keeps each block's input and recomputes one block at a time.
- **overhead**: 2 GiB for the CUDA context, cuBLAS/NCCL workspaces, and 10 % allocator slack on the rest. These
  two numbers are assumptions: nothing in this plan has been measured on a GPU yet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import nn

GiB = 1024**3
OVERHEAD_BYTES = 2 * GiB
SLACK = 1.10
TEACHER_REPLICATE_FRACTION = 0.25  # as bitnet.parallel.TEACHER_REPLICATE_FRACTION

# usable memory per accelerator (SkyPilot names), GiB as reported by the driver
ACCELERATORS: dict[str, float] = {
    "H200": 139.8,
    "H100": 79.6,
    "A100-80GB": 79.2,
    "A100": 39.4,
    "L40S": 44.4,
    "L4": 22.0,
    "A10G": 22.0,
    "V100": 15.8,
    "T4": 14.6,
}

# Public config.json values of the three shapes the pipeline presets name (no hub access is needed).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    },
    "qwen3-4b": {
        "model_type": "qwen3", "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    },
    "llama-3.1-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500_000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
}

Mode = Literal["ddp", "fsdp"]


class PlanError(ValueError):
    """The request cannot be planned, or nothing fits; the message says what would."""


@dataclass(frozen=True)
class Layout:
    parallel: Mode
    activation_checkpointing: bool = False
    cpu_offload: bool = False

    @property
    def label(self) -> str:
        parts = [self.parallel] + (["AC"] if self.activation_checkpointing else []) + (
            ["offload"] if self.cpu_offload else [])
        return "+".join(parts)


LAYOUTS = (
    Layout("ddp"),
    Layout("ddp", activation_checkpointing=True),
    Layout("fsdp"),
    Layout("fsdp", activation_checkpointing=True),
    Layout("fsdp", activation_checkpointing=True, cpu_offload=True),
)


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model: parameter counts and measured activation bytes per token."""

    name: str
    params: int  # student parameters (BitLinear latent weights + SubLN + embeddings)
    teacher_params: int
    block_params: int  # one decoder block of the student
    root_params: int  # everything outside the blocks (embeddings, final norm, lm_head)
    layers: int
    hidden: int
    vocab: int
    act_block: float  # bytes saved for backward per token by one block (bf16)
    act_block_fixed: float  # bytes one block saves whatever the tokens: BitLinear's quantized weights
    act_head: float  # bytes saved per token outside the blocks (embedding, final norm, logits, CE)
    act_head_fixed: float
    act_kd: float  # bytes per token of distillation: teacher logits + KL saved tensors


@dataclass
class Estimate:
    layout: Layout
    micro_batch: int
    params: float
    grads: float
    optimizer: float
    teacher: float
    activations: float
    overhead: float
    host: float  # CPU memory per GPU for offloaded states

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.teacher + self.activations + self.overhead


@dataclass
class Plan:
    shape: Shape
    accelerator: str
    gpus_per_node: int
    nodes: int
    micro_batch: int
    seq_len: int
    distill: bool
    capacity: float
    estimates: list[Estimate] = field(default_factory=list)
    recommended: Estimate | None = None
    max_micro_batch: dict[str, int] = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def table(self) -> str:
        """A markdown table: one row per layout at the requested micro-batch, GiB per GPU."""
        head = (f"{self.shape.name}: {self.shape.params / 1e9:.2f}B student params, "
                f"{self.nodes}x{self.accelerator}:{self.gpus_per_node} ({self.capacity / GiB:.0f} GiB each), "
                f"micro-batch {self.micro_batch} x seq {self.seq_len}{' + teacher (KD)' if self.distill else ''}\n\n")
        columns = "layout | params | grads | optimizer | teacher | activations | overhead | total GiB | fits"
        rows = [f"| {columns} | max micro-batch |", "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for e in self.estimates:
            g = [e.params, e.grads, e.optimizer, e.teacher, e.activations, e.overhead, e.total]
            fits = "yes" if e.total <= self.capacity else "no"
            rows.append(f"| {e.layout.label} | " + " | ".join(f"{v / GiB:.1f}" for v in g)
                        + f" | {fits} | {self.max_micro_batch.get(e.layout.label, 0)} |")
        return head + "\n".join(rows) + "\n\n" + self.recommendation()

    def recommendation(self) -> str:
        r = self.recommended
        assert r is not None
        cfg = f"parallel={r.layout.parallel}"
        if r.layout.activation_checkpointing:
            cfg += ", activation_checkpointing=true"
        if r.layout.cpu_offload:
            cfg += f", cpu_offload=true (host RAM {r.host * self.gpus_per_node / GiB:.0f} GiB per node)"
        note = ""
        if r.micro_batch < self.micro_batch:
            factor = math.ceil(self.micro_batch / r.micro_batch)
            note = f" (requested {self.micro_batch} does not fit: raise grad_accum x{factor})"
        used = f"{r.total / GiB:.1f} of {self.capacity / GiB:.0f} GiB"
        return f"recommended: {cfg}, micro-batch {r.micro_batch}{note}, {used}"


def parse_accelerators(spec: str) -> tuple[str, int]:
    """``"H100:8"`` -> ("H100", 8); a bare name means one GPU."""
    name, _, count = spec.partition(":")
    key = next((k for k in ACCELERATORS if k.lower() == name.strip().lower()), None)
    if key is None:
        raise PlanError(f"unknown accelerator {name!r}; known: {', '.join(ACCELERATORS)}")
    try:
        n = int(count) if count else 1
    except ValueError:
        raise PlanError(f"accelerator count must be an integer, got {spec!r}") from None
    if n < 1:
        raise PlanError(f"accelerator count must be >= 1, got {spec!r}")
    return key, n


def model_config(model: str | Mapping[str, Any] | Any):
    """A transformers config from a known shape name, a dict with ``model_type``, or a config object."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, str):
        key = model.lower()
        if key not in MODEL_SHAPES:
            raise PlanError(f"unknown model shape {model!r}; known: {', '.join(MODEL_SHAPES)} (or pass a config dict)")
        model = MODEL_SHAPES[key]
    spec = dict(model)
    model_type = spec.pop("model_type", None)
    if not model_type:
        raise PlanError("a model config dict needs model_type")
    return AutoConfig.for_model(model_type, **spec)


def _build(config, layers: int) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from bitnet.convert import convert_to_bitnet

    spec = {**config.to_dict(), "num_hidden_layers": layers}
    if spec.get("layer_types"):
        spec["layer_types"] = spec["layer_types"][:layers]
    cfg = config.__class__.from_dict(spec)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    convert_to_bitnet(model)
    model.train()
    return model


class _SavedBytes:
    """Bytes of distinct tensors autograd saves for backward (parameters excluded)."""

    def __init__(self, exclude: set[int]) -> None:
        self.seen: set[int] = set(exclude)
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        return t


def _measure(config, layers: int, seq: int, distill: bool) -> tuple[int, int]:
    """(bytes saved by the student forward + CE, extra bytes of the KD terms) for batch 1 at ``seq`` tokens.

    The model is built on ``meta`` and its tensors turned into fake CPU tensors (shapes and dtypes, no memory), so
    the real code path runs (BitLinear kernel, SDPA attention, the loss) at the real shape in a second or two.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from bitnet.objectives import logits_kd_loss

    model = _build(config, layers)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        ids = torch.zeros(1, seq, dtype=torch.long)
        counter = _SavedBytes({p.untyped_storage()._cdata for p in model.parameters()})
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            out = model(input_ids=ids, labels=ids)
        base = counter.bytes
        kd = 0
        if distill:
            teacher_logits = torch.empty_like(out.logits)  # bf16 teacher output, alive during the step
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
                logits_kd_loss(out.logits, teacher_logits, 5.0)
            kd = counter.bytes - base + teacher_logits.numel() * teacher_logits.element_size()
    return base, kd


@lru_cache(maxsize=32)
def _shape_cached(key: str, seq: int, distill: bool, config_json: str) -> Shape:
    import json

    config = model_config(json.loads(config_json))
    # saved bytes = fixed + per_token * tokens, per block and outside the blocks: measured with 1 and 2 blocks at
    # seq and 2 * seq tokens (BitLinear saves its quantized weight, a per-block cost independent of the tokens)
    one, kd = _measure(config, 1, seq, distill)
    two, _ = _measure(config, 2, seq, False)
    one_long, _ = _measure(config, 1, 2 * seq, False)
    two_long, _ = _measure(config, 2, 2 * seq, False)
    block, block_long = two - one, two_long - one_long
    head, head_long = one - block, one_long - block_long
    per_block = (block_long - block) / seq
    per_head = (head_long - head) / seq
    full = _build(config, 1)
    block_params = sum(p.numel() for p in full.model.layers[0].parameters())
    total_one = sum(p.numel() for p in full.parameters())
    layers = int(config.num_hidden_layers)
    params = total_one + (layers - 1) * block_params
    teacher_block = block_params - sum(
        p.numel() for n, p in full.model.layers[0].named_parameters() if "sub_norm" in n)
    return Shape(
        name=key,
        params=params,
        teacher_params=params - layers * (block_params - teacher_block),
        block_params=block_params,
        root_params=total_one - block_params,
        layers=layers,
        hidden=int(config.hidden_size),
        vocab=int(config.vocab_size),
        act_block=per_block,
        act_block_fixed=block - per_block * seq,
        act_head=per_head,
        act_head_fixed=head - per_head * seq,
        act_kd=kd / seq,
    )


def measure_shape(model: str | Mapping[str, Any] | Any, seq_len: int, distill: bool = True) -> Shape:
    config = model_config(model)
    name = model if isinstance(model, str) else getattr(config, "name_or_path", "") or config.model_type
    cfg = config.to_dict()
    for k in ("transformers_version", "_name_or_path", "architectures"):
        cfg.pop(k, None)
    import json

    return _shape_cached(str(name), seq_len, distill, json.dumps(cfg, sort_keys=True, default=str))


def estimate(shape: Shape, layout: Layout, *, gpus: int, micro_batch: int, seq_len: int, distill: bool,
             capacity: float) -> Estimate:
    """Per-GPU bytes of one layout at one micro-batch."""
    p = shape.params
    tokens = micro_batch * seq_len
    if layout.parallel == "ddp":
        params, grads, optim, host = 4.0 * p, 4.0 * p, 8.0 * p, 0.0
    else:
        sharded = 16.0 * p / gpus
        work_params = 2.0 * shape.root_params + 2 * 2.0 * shape.block_params  # bf16 root + 2 gathered blocks
        work_grads = 4.0 * shape.root_params + (2.0 + 4.0) * shape.block_params  # root fp32, block bf16 + fp32 reduce
        if layout.cpu_offload:
            params, grads, optim, host = work_params, work_grads, 0.0, sharded
        else:
            params, grads, optim, host = 4.0 * p / gpus + work_params, 4.0 * p / gpus + work_grads, 8.0 * p / gpus, 0.0
    teacher = 0.0
    if distill:
        t = 2.0 * shape.teacher_params
        if t <= TEACHER_REPLICATE_FRACTION * capacity or gpus == 1:
            teacher = t
        else:
            teacher = t / gpus + 2.0 * (shape.root_params + 2 * shape.block_params)
    if layout.activation_checkpointing:
        one_block = shape.act_block_fixed + shape.act_block * tokens
        act_layers = shape.layers * tokens * shape.hidden * 2.0 + one_block  # block inputs + 1 block recomputed
    else:
        act_layers = shape.layers * (shape.act_block_fixed + shape.act_block * tokens)
    activations = act_layers + shape.act_head_fixed + shape.act_head * tokens
    activations += shape.act_kd * tokens if distill else 0.0
    activations += tokens * shape.vocab * 4.0  # the fp32 gradient of the logits in backward
    dynamic = params + grads + optim + teacher + activations
    overhead = OVERHEAD_BYTES + (SLACK - 1.0) * dynamic
    return Estimate(layout, micro_batch, params, grads, optim, teacher, activations, overhead, host)


def _max_micro_batch(shape: Shape, layout: Layout, gpus: int, seq_len: int, distill: bool, capacity: float,
                     limit: int = 4096) -> int:
    best = 0
    m = 1
    while m <= limit and estimate(shape, layout, gpus=gpus, micro_batch=m, seq_len=seq_len, distill=distill,
                                  capacity=capacity).total <= capacity:
        best = m
        m *= 2
    return best


def plan_for(
    model: str | Mapping[str, Any] | Any,
    *,
    accelerators: str = "H100:8",
    nodes: int = 1,
    micro_batch: int = 1,
    seq_len: int = 2048,
    distill: bool = True,
) -> Plan:
    """Plan one training stage (``distill``: with a teacher, the KD stage, the largest) and pick a layout.

    Preference: DDP (least communication), DDP + activation checkpointing, FSDP, FSDP + AC, FSDP + AC + CPU offload;
    the first that fits the requested micro-batch wins; else the one that fits the largest micro-batch. When not
    even micro-batch 1 fits with offload, :class:`PlanError` says how many GPUs or what sequence length would.
    """
    if nodes < 1 or micro_batch < 1 or seq_len < 1:
        raise PlanError(f"nodes, micro_batch and seq_len must be >= 1 (got {nodes}, {micro_batch}, {seq_len})")
    accel, per_node = parse_accelerators(accelerators)
    capacity = ACCELERATORS[accel] * GiB
    shape = measure_shape(model, seq_len, distill)
    gpus = per_node * nodes
    plan = Plan(shape, accel, per_node, nodes, micro_batch, seq_len, distill, capacity)
    layouts = [lay for lay in LAYOUTS if lay.parallel == "ddp" or gpus > 1]
    for lay in layouts:
        plan.estimates.append(estimate(shape, lay, gpus=gpus, micro_batch=micro_batch, seq_len=seq_len,
                                       distill=distill, capacity=capacity))
        plan.max_micro_batch[lay.label] = _max_micro_batch(shape, lay, gpus, seq_len, distill, capacity)
    fitting = [e for e in plan.estimates if e.total <= capacity]
    if fitting:
        plan.recommended = fitting[0]
        return plan
    best = max(layouts, key=lambda lay: plan.max_micro_batch[lay.label])
    mb = plan.max_micro_batch[best.label]
    if mb >= 1:
        plan.recommended = estimate(shape, best, gpus=gpus, micro_batch=mb, seq_len=seq_len, distill=distill,
                                    capacity=capacity)
        return plan
    raise PlanError(_what_fits(shape, accel, per_node, nodes, seq_len, distill, capacity))


def _what_fits(shape: Shape, accel: str, per_node: int, nodes: int, seq_len: int, distill: bool,
               capacity: float) -> str:
    """One line: what the request needs at its leanest layout, and what would fit instead."""
    gpus = per_node * nodes

    def total(*, n: int = gpus, seq: int = seq_len, cap: float = capacity, kd: bool = distill) -> float:
        lean = LAYOUTS[-1] if n > 1 else LAYOUTS[1]  # FSDP + AC + offload; one GPU: DDP + AC
        return estimate(shape, lean, gpus=n, micro_batch=1, seq_len=seq, distill=kd, capacity=cap).total

    lean = "FSDP + activation checkpointing + CPU offload" if gpus > 1 else "activation checkpointing"
    msg = (f"{shape.name} does not fit on {nodes}x{accel}:{per_node} ({capacity / GiB:.0f} GiB per GPU) even with "
           f"{lean} at micro-batch 1, seq {seq_len}: needs {total() / GiB:.1f} GiB per GPU")
    options = []
    # per-token activation bytes are measured at seq_len; SDPA attention keeps them linear in the length
    for seq in [seq_len] + [seq_len // 2**k for k in range(1, 8) if seq_len // 2**k >= 64]:
        more = next((n for n in range(gpus, 1025) if total(n=n, seq=seq) <= capacity), None)
        if more is not None:
            options.append(f"{more}x{accel} at seq_len {seq}")
            break
    bigger = [a for a, gib in ACCELERATORS.items() if gib * GiB > capacity and total(cap=gib * GiB) <= gib * GiB]
    if bigger:
        options.append(f"{bigger[-1]}:{per_node}")
    if distill and total(kd=False) <= capacity:
        options.append("a stage without a teacher")
    return msg + ("; it would fit on " + " or ".join(options) if options else "; nothing this plan knows fits")


def presets_table(rows: list[tuple[str, str, int, int, int]]) -> str:
    """Plans for (model, accelerators, nodes, micro_batch, seq_len) rows, one markdown table each."""
    return "\n\n".join(plan_for(m, accelerators=a, nodes=n, micro_batch=mb, seq_len=s).table()
                       for m, a, n, mb, s in rows)


if __name__ == "__main__":  # python -m bitnet.plan: the table in docs/training.md
    print(presets_table([("qwen2.5-0.5b", "H100:1", 1, 8, 2048), ("qwen3-4b", "H100:8", 1, 4, 4096),
                         ("llama-3.1-8b", "H100:8", 2, 2, 4096)]))
