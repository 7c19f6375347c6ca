"""Data parallelism past one GPU: FSDP2 sharding, activation checkpointing, teacher placement, full state dicts.

Every function here is PyTorch's own engine applied per decoder block:

- :func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` to each decoder block and then to the root
  (embeddings, final norm, lm_head). BitLinear latent weights are sharded like any ``nn.Linear`` weight: FSDP
  all-gathers a block's parameters before its forward, so ``weight_quant`` sees the whole matrix and its per-tensor
  scale Δ = mean|W| is the unsharded one.
- Mixed precision on CUDA: bf16 compute (``param_dtype``), fp32 master weights (the sharded parameters the
  optimizer updates) and fp32 gradient reduction (``reduce_dtype``). Optional CPU offload of parameters, gradients
  and optimizer states (``CPUOffloadPolicy``).
- :func:`apply_activation_checkpointing` recomputes each decoder block in backward (composable
  ``torch.distributed._composable.checkpoint``: no wrapper modules, so parameter names stay the same).
- :func:`place_teacher` puts a frozen teacher on the device, replicated or sharded.
- :func:`full_state_dict` gathers a (possibly sharded) model into full CPU tensors on rank 0.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

Parallel = Literal["ddp", "fsdp"]
TeacherPlacement = Literal["auto", "replicate", "shard"]

# A replicated teacher may take at most this fraction of the GPU's memory under ``placement="auto"``; the rest is
# for the student's parameters, gradients, optimizer states and activations (see bitnet.plan for the full count).
TEACHER_REPLICATE_FRACTION = 0.25


class ParallelConfigError(ValueError):
    """A parallel layout that cannot run (e.g. FSDP with one process)."""


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def require_fsdp_world(parallel: str, n_processes: int) -> None:
    """FSDP shards over processes: with one there is nothing to shard over, so it is refused up front."""
    if parallel == "fsdp" and n_processes < 2:
        raise ParallelConfigError(
            f"train.parallel=fsdp needs at least 2 processes (e.g. torchrun --nproc_per_node=2), this run has "
            f"{n_processes}; use parallel=ddp on one process"
        )


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a HF causal LM (the project's architecture rule, else any ``*DecoderLayer``)."""
    from bitnet.convert import UnsupportedArchitectureError, decoder_layers

    try:
        return list(decoder_layers(model))
    except UnsupportedArchitectureError:
        blocks = [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]
        if not blocks:
            raise ParallelConfigError(f"no decoder blocks found in {type(model).__name__} to shard") from None
        return blocks


def compute_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 when the trainer's precision resolves to it on this device (the ``autocast_context`` rule), else None."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size(),))


def shard_model(
    model: nn.Module,
    device: torch.device,
    *,
    precision: str = "auto",
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply FSDP2 to every decoder block, then to the root; returns ``model`` (sharded in place).

    Mixed precision (bf16 compute, fp32 reduction) only on CUDA: on CPU (gloo, the tests) everything stays fp32.
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    require_fsdp_world("fsdp", world_size())
    mesh = _mesh(device)
    dtype = compute_dtype(device, precision) if device.type == "cuda" else None
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    # no model.to(device) first: fully_shard moves each block to the mesh's device as it shards it, so a model that
    # does not fit one GPU whole is never placed on one (with offload the shards stay in host memory)
    for block in decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each decoder block's activations in backward instead of keeping them (names unchanged).

    Apply before :func:`shard_model` so that FSDP's all-gather hooks sit outside the recomputed region.
    """
    from torch.distributed._composable import checkpoint

    for block in decoder_blocks(model):
        checkpoint(block)
    return model


def place_teacher(
    teacher: nn.Module,
    device: torch.device,
    *,
    placement: TeacherPlacement = "auto",
    precision: str = "auto",
) -> nn.Module:
    """Freeze ``teacher`` (eval mode, no gradients ever) and put it on ``device``, replicated or FSDP-sharded.

    ``auto`` replicates when the teacher's weights take at most a quarter of the GPU (or on CPU), and shards over
    the processes otherwise. A sharded teacher all-gathers one block at a time in its forward, so every rank must
    run the teacher's forward the same number of times (true in the lock-step training loop). On CUDA with bf16
    the teacher is stored in bf16 (2 bytes per parameter).
    """
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    dtype = compute_dtype(device, precision) if device.type == "cuda" else None
    if dtype is not None:
        teacher.to(dtype)
    n = world_size()
    if placement == "auto":
        placement = "replicate"
        if device.type == "cuda" and n > 1:
            nbytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
            total = torch.cuda.get_device_properties(device).total_memory
            placement = "shard" if nbytes > TEACHER_REPLICATE_FRACTION * total else "replicate"
    if placement == "replicate":
        return teacher.to(device)
    if n < 2:
        raise ParallelConfigError("teacher placement 'shard' needs at least 2 processes; use 'replicate'")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = _mesh(device)
    mp = MixedPrecisionPolicy(param_dtype=dtype) if dtype else MixedPrecisionPolicy()
    for block in decoder_blocks(teacher):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(teacher, mesh=mesh, mp_policy=mp)
    return teacher


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full state dict as CPU tensors on rank 0 (``{}`` on other ranks).

    Sharded models gather their shards: every rank must call this (it is a collective). Unsharded models (DDP or
    one process) return their own state dict on rank 0 without communication.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return dict(state) if rank == 0 else {}
    if rank != 0:
        return {}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
