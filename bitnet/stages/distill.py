"""What the student stages (layer-wise, CPT, KD, LRC) share: the student/teacher pair and how a student is saved."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitnet.convert import add_lrc
from bitnet.layers import set_quant_lambda
from bitnet.parallel import place_teacher
from bitnet.stages.base import Inputs, model_dir, teacher_source
from bitnet.stages.training import Proc, StageData, held_out_perplexity, train_and_save
from bitnet.student import load_student, save_student
from bitnet.teacher import load_teacher
from bitnet.trainer import Callback, LossFn, TrainConfig
from bitnet.world import World, check_seq_len_fits, check_tokenizer_matches, open_world

STUDENT_INPUTS = ("student", "teacher", "world")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper."""
    return getattr(model, "module", model)


def lm_forward(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> Any:
    return model(input_ids=ids, labels=ids, **kwargs)


def load_pair(inputs: Inputs, proc: Proc, train: TrainConfig) -> tuple[nn.Module, nn.Module, World]:
    """The student to train, the frozen teacher (no gradients; replicated or sharded as ``train`` says) and the
    world, with matching vocabularies: the world must be tokenized with the teacher's tokenizer (not merely one of
    the same size), the teacher must be an architecture the student stages support, and both models must have
    positions for the world's blocks. All of it is checked before any step (the teacher's before its weights)."""
    world = open_world(inputs["world"])
    world.tokenizer()  # a malformed world tokenizer: one line now, not at the save after training
    source = teacher_source(inputs["teacher"])
    check_seq_len_fits(world.seq_len, check_teacher_architecture(source), f"teacher {source}")
    check_tokenizer_matches(world, source)
    student = load_student(model_dir(inputs["student"])).to(proc.device)
    check_seq_len_fits(world.seq_len, student.config, f"student {model_dir(inputs['student'])}")
    teacher = place_teacher(load_teacher(source), proc.device, placement=train.teacher_placement,
                            precision=train.precision)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"teacher vocab ({teacher.config.vocab_size}) differs from the student's "
                         f"({student.config.vocab_size})")
    if world.info.get("vocab_size", 0) > teacher.config.vocab_size:
        raise ValueError(f"the world's tokenizer has {world.info['vocab_size']} tokens, more than the teacher's "
                         f"vocabulary ({teacher.config.vocab_size})")
    return student, teacher, world


def check_teacher_architecture(source: str) -> Any:
    """Refuse, before loading any weights, a teacher whose architecture the student stages cannot align with
    (e.g. GPT-2: no q/k/v projections for the attention-relation loss, no SubLN placement rule). Returns the
    teacher's transformers config."""
    from transformers import AutoConfig

    from bitnet.families import UnsupportedFamilyError, family_for, model_types

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot read the teacher's config from {source}: {str(e).splitlines()[0]}") from e
    try:
        family_for(config.model_type)
    except UnsupportedFamilyError:
        raise UnsupportedFamilyError(f"teacher {source} is a {config.model_type!r} model; the student stages support "
                                     f"{', '.join(model_types())}") from None
    return config


def fresh_student(inputs: Inputs, lrc_rank: int = 0) -> nn.Module:
    """A new CPU copy of the input student (with LRC adapters of ``lrc_rank``): what FSDP consolidates into."""
    student = load_student(model_dir(inputs["student"]))
    return add_lrc(student, lrc_rank) if lrc_rank else student


def check_same_depth_and_width(stage: str, student: nn.Module, teacher: nn.Module) -> None:
    """Hidden states can be aligned layer by layer only between models of equal depth and width."""
    for key in ("num_hidden_layers", "hidden_size"):
        t, s = getattr(teacher.config, key), getattr(student.config, key)
        if t != s:
            raise ValueError(f"{stage}: teacher {key} ({t}) differs from the student's ({s}); "
                             "hidden states cannot be aligned")


def save_trained_student(model: nn.Module, metrics: dict[str, Any], *, world: World, data: StageData, out: Path
                         ) -> None:
    """How every student stage ends: fully quantized (λ = 1), its validation perplexity into ``metrics``, the student
    and the world's tokenizer to ``out/model``."""
    set_quant_lambda(model, 1.0)
    metrics["val_ppl"] = held_out_perplexity(model, world, "validation", data)
    save_student(model, out / "model", world.tokenizer())


def train_student(
    stage: str,
    student: nn.Module,
    world: World,
    out: Path,
    *,
    proc: Proc,
    train: TrainConfig,
    data: StageData,
    loss_fn: LossFn,
    callbacks: Iterable[Callback] = (),
    extra: dict[str, Any] | None = None,
    rebuild: Callable[[], nn.Module] | None = None,
) -> dict[str, Any]:
    """Train, then save the fully quantized student (λ = 1) to ``out/model`` with its validation perplexity.
    ``rebuild``: a fresh student of the same structure, for FSDP's consolidated save."""

    def save(model: nn.Module, metrics: dict[str, Any]) -> None:
        save_trained_student(model, metrics, world=world, data=data, out=out)

    metrics = train_and_save(student, proc=proc, train=train, data=data, world=world, out=out, save=save,
                             loss_fn=loss_fn, callbacks=callbacks, desc=stage, rebuild=rebuild)
    return {"stage": stage, **metrics, **(extra or {})}
