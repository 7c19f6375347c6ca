"""Stages: what each one trains, on which data, with which losses (a stage = data + losses + schedule).

- ``teacher``   (tiny preset only) pretrain the tiny Llama teacher on the world's corpus
- ``convert``   BitDistill stage 1: BitLinear swap + SubLN insertion
- ``layerwise`` stage 1.9: align every layer's hidden states with the teacher's
- ``cpt``       stage 2: continued pre-training (QAT, CE) with the gradual quantization warm-up λ: 0 → 1
- ``kd``        stage 3: CE + β·τ²·KL(p_T^τ ‖ p_S^τ) + γ·attention-relation loss (``bitdistill``) or top-k KL (``tcs``)
- ``lrc``       low-rank correction: closed-form init from calibration activations, then train only U, V

Every stage writes its output directory atomically and ``metrics.json`` last; training stages resume from
``OUT/train/checkpoints``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from transformers import AutoTokenizer

from bitnet.attention import capture_qkv
from bitnet.convert import BitNetConfig, add_lrc, convert_to_bitnet
from bitnet.data import BlockLoader, PackedDataset, iter_eval_batches
from bitnet.data.influence import InfluenceConfig, select_influential, write_subset
from bitnet.evaluate import perplexity
from bitnet.io import atomic_dir, write_json_atomic
from bitnet.layers import bit_linears, set_quant_lambda
from bitnet.lrc import calibrate_lrc
from bitnet.objectives import attention_relation_loss, hidden_state_loss, logits_kd_loss, topk_kd_loss
from bitnet.student import load_student, save_student
from bitnet.teacher import TinyTeacherConfig, build_tiny_teacher, count_parameters, load_teacher
from bitnet.trainer import (
    Batch,
    Callback,
    LossFn,
    Trainer,
    TrainConfig,
    causal_lm_loss,
    distributed_env,
    init_distributed,
)
from bitnet.world import World


def _default_teacher_train() -> TrainConfig:
    return TrainConfig(max_steps=150, lr=2e-3, warmup_steps=15, weight_decay=0.1, ckpt_every=25, eval_every=50)


class TeacherStageConfig(BaseModel):
    """Pretraining of the tiny teacher."""

    model_config = ConfigDict(extra="forbid")

    model: TinyTeacherConfig = Field(default_factory=TinyTeacherConfig)
    train: TrainConfig = Field(default_factory=_default_teacher_train)
    batch_size: int = Field(default=16, ge=1, description="blocks per micro-batch per process")
    eval_batch_size: int = Field(default=16, ge=1)
    eval_max_batches: int | None = Field(default=None, ge=1, description="cap on held-out batches for perplexity")


def held_out_perplexity(model: torch.nn.Module, world: World, split: str, batch_size: int, max_batches: int | None) -> float:
    return perplexity(model, iter_eval_batches(world.dataset(split), batch_size, max_batches))


def train_teacher(cfg: TeacherStageConfig, world: World, out_dir: str | Path) -> dict[str, Any]:
    """Pretrain the tiny Llama teacher on the world's train split; resumable from ``out_dir/train``.

    Writes ``out_dir/model`` (an HF checkpoint with the tokenizer) and ``out_dir/metrics.json``.
    Under ``torchrun`` the processes train with DDP and rank 0 writes the outputs.
    """
    out_dir = Path(out_dir)
    rank, world_size, device = init_distributed() if distributed_env()[1] > 1 else (0, 1, _device())
    tokenizer = world.tokenizer()
    torch.manual_seed(cfg.train.seed)
    model = build_tiny_teacher(
        cfg.model, len(tokenizer), bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    if model.config.max_position_embeddings < world.info["config"]["seq_len"]:
        raise ValueError("teacher max_position_embeddings is shorter than the world's seq_len")
    train_ds, val_ds = world.dataset("train"), world.dataset("validation")
    loader = BlockLoader(train_ds, cfg.batch_size, seed=cfg.train.seed, rank=rank, world_size=world_size)
    trainer = Trainer(
        model,
        loader,
        cfg.train,
        out_dir / "train",
        val_batches=lambda: iter_eval_batches(val_ds, cfg.eval_batch_size),
        device=device,
        desc="teacher",
    )
    result = trainer.fit()
    metrics: dict[str, Any] = {
        "parameters": count_parameters(model),
        "steps": result.steps,
        "tokens": result.tokens,
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "wall_s": result.wall_s,
        "resumed_from": result.resumed_from,
    }
    if rank == 0:
        model.eval()
        metrics["val_ppl"] = held_out_perplexity(model, world, "validation", cfg.eval_batch_size, cfg.eval_max_batches)
        metrics["test_ppl"] = held_out_perplexity(model, world, "test", cfg.eval_batch_size, cfg.eval_max_batches)
        metrics["unigram_test_ppl"] = world.info["unigram_test_ppl"]
        with atomic_dir(out_dir / "model", marker="config.json") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        write_json_atomic(out_dir / "metrics.json", metrics)
    if world_size > 1:
        torch.distributed.barrier()
    return metrics


class ConvertStageConfig(BaseModel):
    """BitDistill stage 1: BitLinear swap + SubLN insertion."""

    model_config = ConfigDict(extra="forbid")

    bitnet: BitNetConfig = Field(default_factory=BitNetConfig)


def convert_teacher(cfg: ConvertStageConfig, teacher: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Load ``teacher`` (local dir or hub id), convert it and save the student to ``out_dir``."""
    model = load_teacher(teacher)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    except (OSError, ValueError):
        tokenizer = None
    convert_to_bitnet(model, cfg.bitnet)
    save_student(model, out_dir, tokenizer)
    return {"parameters": count_parameters(model), "subln": cfg.bitnet.subln}


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ================================================================================ student stages (1.9 – LRC)
class StageData(BaseModel):
    """Batching of a student stage over a world's packed splits."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=8, ge=1, description="blocks per micro-batch per process")
    eval_batch_size: int = Field(default=16, ge=1)
    eval_max_batches: int | None = Field(default=None, ge=1)
    train_data: str | None = Field(
        default=None,
        description="a packed dataset to train on instead of the world's train split "
        "(e.g. an influence selection from `bitdistill select`); same tokenizer as the world",
    )


def stage_train_data(data: StageData, world: World) -> PackedDataset:
    """The packed dataset a student stage trains on: ``data.train_data`` or the world's train split."""
    train = world.dataset("train")
    if data.train_data is None:
        return train
    chosen = PackedDataset(data.train_data)
    if chosen.meta.get("tokenizer_digest") != train.meta.get("tokenizer_digest"):
        raise ValueError(f"train_data {data.train_data} was tokenized with another tokenizer than the world's")
    if chosen.seq_len != train.seq_len:
        raise ValueError(f"train_data {data.train_data} has seq_len {chosen.seq_len}, the world {train.seq_len}")
    return chosen


def _default_student_train() -> TrainConfig:
    return TrainConfig(max_steps=100, lr=1e-3, warmup_steps=10, weight_decay=0.0, ckpt_every=25, eval_every=0)


class LayerwiseStageConfig(BaseModel):
    """Stage 1.9: hidden-state distillation at every layer (teacher frozen, no gradients)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["layerwise"] = "layerwise"
    loss: Literal["mse", "cosine"] = "mse"
    train: TrainConfig = Field(default_factory=_default_student_train)
    data: StageData = Field(default_factory=StageData)


class CPTStageConfig(BaseModel):
    """Stage 2: continued pre-training with the gradual quantization warm-up."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["cpt"] = "cpt"
    lambda_warmup_steps: int = Field(default=50, ge=0, description="steps over which λ ramps 0 → 1; 0 = no warm-up")
    lambda_schedule: Literal["linear", "cosine"] = "linear"
    train: TrainConfig = Field(default_factory=_default_student_train)
    data: StageData = Field(default_factory=StageData)


class KDStageConfig(BaseModel):
    """Stage 3: knowledge distillation (BitDistill or TCS objective)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["kd"] = "kd"
    objective: Literal["bitdistill", "tcs"] = "bitdistill"
    temperature: float = Field(default=5.0, gt=0)
    beta: float = Field(default=10.0, ge=0, description="weight of τ²·KL(p_T ‖ p_S)")
    gamma: float = Field(default=1e5, ge=0, description="weight of the attention-relation loss")
    ce_weight: float = Field(default=1.0, ge=0)
    ad_layers: list[int] = Field(default_factory=lambda: [-1], description="layers for attention relations")
    split_heads: int = Field(default=32, ge=1)
    tcs_k: int = Field(default=100, ge=1)
    train: TrainConfig = Field(default_factory=_default_student_train)
    data: StageData = Field(default_factory=StageData)

    @model_validator(mode="after")
    def _check(self) -> "KDStageConfig":
        if self.objective == "bitdistill" and self.gamma > 0 and not self.ad_layers:
            raise ValueError("gamma > 0 needs at least one layer in ad_layers (or set gamma: 0)")
        return self


class LRCStageConfig(BaseModel):
    """Low-rank correction: closed-form init, then only U, V trained against the teacher."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["lrc"] = "lrc"
    rank: int = Field(default=16, ge=1)
    init: Literal["auto", "closed_form", "svd", "zero"] = Field(
        default="auto",
        description="closed_form: reduced-rank fit on calibration activations (LRC paper); svd: truncated SVD of "
        "W − Wq; zero: U = 0 (the adapter starts as a no-op and is only trained); auto: closed_form on a freshly "
        "converted student (latent weights = the teacher's: the paper's PTQ setting), zero after QAT, where the "
        "closed form pulls single layers away from the co-adapted network (docs/ablation.md)",
    )
    reference: Literal["teacher", "latent"] = Field(
        default="teacher",
        description="W the init corrects towards: the teacher's layer (right after convert, the PTQ setting of the "
        "paper) or the student's own full-precision latent weight",
    )
    calib_batches: int = Field(default=8, ge=1)
    loss: Literal["logits", "hidden", "both"] = "logits"
    temperature: float = Field(default=1.0, gt=0)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=50, lr=1e-3, warmup_steps=5,
                                                                   weight_decay=0.0, ckpt_every=25))
    data: StageData = Field(default_factory=StageData)


StudentStageConfig = Annotated[
    LayerwiseStageConfig | CPTStageConfig | KDStageConfig | LRCStageConfig, Field(discriminator="kind")
]
STUDENT_STAGES: dict[str, type[BaseModel]] = {
    "layerwise": LayerwiseStageConfig,
    "cpt": CPTStageConfig,
    "kd": KDStageConfig,
    "lrc": LRCStageConfig,
}


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _lm_forward(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> Any:
    return model(input_ids=ids, labels=ids, **kwargs)


def layerwise_loss(teacher: nn.Module, kind: str) -> LossFn:
    def fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        ids = batch["input_ids"]
        with torch.no_grad():
            t_hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        out = _lm_forward(model, ids, output_hidden_states=True)
        # hidden_states[0] is the (shared, full-precision) embedding output: align the decoder layers only
        loss = hidden_state_loss(out.hidden_states[1:], t_hidden[1:], kind=kind)
        return loss, {"ce": float(out.loss.detach())}

    return fn


def quant_lambda_at(step: int, warmup: int, schedule: str) -> float:
    """λ of the gradual quantization warm-up at ``step`` (0 → 1 over ``warmup`` steps)."""
    if warmup <= 0 or step >= warmup:
        return 1.0
    x = step / warmup
    return x if schedule == "linear" else 0.5 * (1 - math.cos(math.pi * x))


def lambda_warmup_callback(cfg: CPTStageConfig) -> Callback:
    def cb(step: int, model: nn.Module) -> dict[str, float]:
        lam = quant_lambda_at(step, cfg.lambda_warmup_steps, cfg.lambda_schedule)
        set_quant_lambda(model, lam)
        return {"lambda": lam}

    return cb


def kd_loss(teacher: nn.Module, cfg: KDStageConfig) -> LossFn:
    tau = cfg.temperature

    def fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        ids = batch["input_ids"]
        use_ad = cfg.objective == "bitdistill" and cfg.gamma > 0
        with torch.no_grad(), capture_qkv(teacher, cfg.ad_layers if use_ad else []) as t_qkv:
            t_logits = teacher(input_ids=ids).logits
        with capture_qkv(_unwrap(model), cfg.ad_layers if use_ad else []) as s_qkv:
            out = _lm_forward(model, ids)
        metrics = {"ce": float(out.loss.detach())}
        loss = cfg.ce_weight * out.loss
        if cfg.objective == "bitdistill":
            kl = logits_kd_loss(out.logits, t_logits, tau)
            loss = loss + cfg.beta * tau * tau * kl
            metrics["kl"] = float(kl.detach())
            if use_ad:
                ad = sum(attention_relation_loss(s_qkv[i], t_qkv[i], cfg.split_heads) for i in cfg.ad_layers)
                ad = ad / len(cfg.ad_layers)
                loss = loss + cfg.gamma * ad
                metrics["ad"] = float(ad.detach())
        else:
            kl = topk_kd_loss(out.logits, t_logits, cfg.tcs_k, tau)
            loss = loss + cfg.beta * tau * tau * kl
            metrics["topk_kl"] = float(kl.detach())
        return loss, metrics

    return fn


def lrc_loss(teacher: nn.Module, cfg: LRCStageConfig) -> LossFn:
    def fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        ids = batch["input_ids"]
        want_hidden = cfg.loss in ("hidden", "both")
        with torch.no_grad():
            t_out = teacher(input_ids=ids, output_hidden_states=want_hidden)
        out = _lm_forward(model, ids, output_hidden_states=want_hidden)
        loss = out.logits.new_zeros(())
        metrics = {"ce": float(out.loss.detach())}
        if cfg.loss in ("logits", "both"):
            kl = logits_kd_loss(out.logits, t_out.logits, cfg.temperature)
            loss = loss + kl
            metrics["kl"] = float(kl.detach())
        if want_hidden:
            h = hidden_state_loss(out.hidden_states[1:], t_out.hidden_states[1:])
            loss = loss + h
            metrics["hidden"] = float(h.detach())
        return loss, metrics

    return fn


def freshly_converted(student: nn.Module, teacher: nn.Module) -> bool:
    """True when every BitLinear's latent weight still equals the teacher's linear at the same path."""
    modules = dict(teacher.named_modules())
    for name, layer in bit_linears(student):
        ref = modules.get(name)
        if not isinstance(ref, nn.Linear) or ref.weight.shape != layer.weight.shape:
            return False
        if not torch.equal(ref.weight.to(layer.weight.device, layer.weight.dtype), layer.weight):
            return False
    return True


def check_pair(student: nn.Module, teacher: nn.Module, cfg: BaseModel) -> None:
    """Refuse, before any training, a teacher/student pair or a stage config the stage cannot use."""
    s, t = student.config, teacher.config
    if t.vocab_size != s.vocab_size:
        raise ValueError(f"teacher vocab ({t.vocab_size}) differs from the student's ({s.vocab_size})")
    hidden_match = isinstance(cfg, LayerwiseStageConfig) or (isinstance(cfg, LRCStageConfig) and cfg.loss != "logits")
    if hidden_match:
        for key in ("num_hidden_layers", "hidden_size"):
            if getattr(t, key) != getattr(s, key):
                raise ValueError(
                    f"{cfg.kind}: teacher {key} ({getattr(t, key)}) differs from the student's ({getattr(s, key)}); "
                    "hidden states cannot be aligned"
                )
    if isinstance(cfg, KDStageConfig) and cfg.objective == "bitdistill" and cfg.gamma > 0:
        for who, c in (("student", s), ("teacher", t)):
            n = c.num_hidden_layers
            bad = [i for i in cfg.ad_layers if not -n <= i < n]
            if bad:
                raise ValueError(f"kd: ad_layers {bad} out of range for the {who} ({n} layers)")
            head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
            for heads in (c.num_attention_heads, c.num_key_value_heads):
                if (heads * head_dim) % cfg.split_heads:
                    raise ValueError(
                        f"kd: split_heads ({cfg.split_heads}) does not divide the {who}'s merged q/k/v width "
                        f"{heads}*{head_dim}"
                    )
    if isinstance(cfg, LRCStageConfig):
        for name, layer in bit_linears(student):
            limit = min(layer.in_features, layer.out_features)
            if cfg.rank >= limit:
                raise ValueError(f"lrc: rank {cfg.rank} must be < min(in, out) = {limit} of {name}")


def run_student_stage(
    cfg: LayerwiseStageConfig | CPTStageConfig | KDStageConfig | LRCStageConfig,
    student_dir: str | Path,
    teacher: str | Path,
    world: World,
    out_dir: str | Path,
) -> dict[str, Any]:
    """Train the student of ``student_dir`` with the stage ``cfg``; write ``out_dir/model`` + ``metrics.json``."""
    out_dir = Path(out_dir)
    rank, world_size, device = init_distributed() if distributed_env()[1] > 1 else (0, 1, _device())
    student = load_student(student_dir).to(device)
    teacher_model = load_teacher(teacher).to(device)
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    check_pair(student, teacher_model, cfg)
    d = cfg.data
    train_ds, val_ds = stage_train_data(d, world), world.dataset("validation")
    callbacks: list[Callback] = []
    extra: dict[str, Any] = {}
    if isinstance(cfg, LayerwiseStageConfig):
        loss_fn = layerwise_loss(teacher_model, cfg.loss)
    elif isinstance(cfg, CPTStageConfig):
        loss_fn = causal_lm_loss
        callbacks.append(lambda_warmup_callback(cfg))
    elif isinstance(cfg, KDStageConfig):
        loss_fn = kd_loss(teacher_model, cfg)
    else:
        calib = iter_eval_batches(train_ds, d.batch_size, cfg.calib_batches)
        init = cfg.init
        if init == "auto":
            init = "closed_form" if freshly_converted(student, teacher_model) else "zero"
        extra["lrc_init"] = init
        if not (out_dir / "train" / "checkpoints").is_dir() and init != "zero":
            reference = teacher_model if cfg.reference == "teacher" else None
            improvement = calibrate_lrc(student, reference, calib, cfg.rank, init)
            extra["lrc_init_improvement"] = sum(improvement.values()) / len(improvement)
        else:  # resuming (the checkpoint holds the adapters) or a zero init: only the module tree is needed
            add_lrc(student, cfg.rank)
        for name, p in student.named_parameters():
            p.requires_grad_(name.endswith(("lrc_u", "lrc_v")))
        loss_fn = lrc_loss(teacher_model, cfg)
    loader = BlockLoader(train_ds, d.batch_size, seed=cfg.train.seed, rank=rank, world_size=world_size)
    trainer = Trainer(
        student,
        loader,
        cfg.train,
        out_dir / "train",
        loss_fn=loss_fn,
        val_batches=lambda: iter_eval_batches(val_ds, d.eval_batch_size),
        callbacks=callbacks,
        device=device,
        desc=cfg.kind,
    )
    result = trainer.fit()
    set_quant_lambda(student, 1.0)
    metrics: dict[str, Any] = {
        "stage": cfg.kind,
        "steps": result.steps,
        "tokens": result.tokens,
        "train_loss": result.train_loss,
        "wall_s": result.wall_s,
        "resumed_from": result.resumed_from,
        **extra,
    }
    if rank == 0:
        metrics["val_ppl"] = held_out_perplexity(student, world, "validation", d.eval_batch_size, d.eval_max_batches)
        save_student(student, out_dir / "model", world.tokenizer())
        write_json_atomic(out_dir / "metrics.json", metrics)
    if world_size > 1:
        torch.distributed.barrier()
    return metrics


# ================================================================================ influence-based data selection
class SelectConfig(BaseModel):
    """Pick the training blocks of a stage by gradient similarity to a target split (LESS/TracIn-style)."""

    model_config = ConfigDict(extra="forbid")

    influence: InfluenceConfig = Field(default_factory=InfluenceConfig)
    target_split: Literal["validation", "test"] = "validation"
    max_candidates: int | None = Field(default=None, ge=1, description="score only the first N train blocks")
    max_targets: int | None = Field(default=None, ge=1, description="use only the first N target blocks")


def select_training_data(cfg: SelectConfig, model_dir: str | Path, world: World, out_dir: str | Path) -> dict[str, Any]:
    """Score the world's train blocks with ``model_dir`` (a student or an HF model) and write the kept subset.

    The output is a packed dataset that any student stage trains on via ``data.train_data``.
    """
    model_dir = Path(model_dir)
    model = load_student(model_dir) if (model_dir / "bitnet.json").is_file() else load_teacher(model_dir)
    model = model.to(_device())
    candidates, targets = world.dataset("train"), world.dataset(cfg.target_split)
    cand = range(min(len(candidates), cfg.max_candidates or len(candidates)))
    targ = range(min(len(targets), cfg.max_targets or len(targets)))
    result = select_influential(model, candidates, targets, cfg.influence, candidate_indices=cand, target_indices=targ)
    info = {"target_split": cfg.target_split, "model": str(model_dir), **cfg.influence.model_dump(mode="json")}
    write_subset(candidates, result.indices, out_dir, info=info)
    stats = {k: v for k, v in result.stats.items() if k != "params"}
    write_json_atomic(Path(out_dir).with_name(Path(out_dir).name + ".selection.json"), stats)
    return stats
