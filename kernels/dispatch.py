"""Pick the BitLinear kernel: Triton on CUDA (when ``triton`` imports), the PyTorch path elsewhere.

One switch forces either: the environment variable ``BITDISTILL_KERNEL=auto|torch|triton`` or
:func:`set_kernel_backend` (which wins over the variable; ``None`` hands control back to it), or the
:func:`use_kernel_backend` context manager. ``triton`` on CPU tensors only works under ``TRITON_INTERPRET=1``
(Triton's interpreter, for tests); otherwise forcing it there raises.

``triton`` is optional: this module imports it only when the Triton path is chosen.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from types import ModuleType
from typing import Literal, cast

import torch

from kernels.packed_linear import DEFAULT_CHUNK_BYTES, packed_linear_torch
from kernels.packing import PackedTernary
from kernels.reference import ternary_linear_torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton")
ENV_VAR = "BITDISTILL_KERNEL"

_override: Backend | None = None


def _validate(name: str) -> Backend:
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return cast(Backend, value)


def set_kernel_backend(name: str | None) -> None:
    """Force ``torch`` or ``triton`` (or ``auto``) for every BitLinear; ``None`` defers to ``$BITDISTILL_KERNEL``."""
    global _override
    _override = None if name is None else _validate(name)


def kernel_backend() -> Backend:
    """The configured backend: :func:`set_kernel_backend`, else ``$BITDISTILL_KERNEL``, else ``auto``."""
    if _override is not None:
        return _override
    return _validate(os.environ.get(ENV_VAR, "auto") or "auto")


@contextmanager
def use_kernel_backend(name: str | None) -> Iterator[None]:
    global _override
    previous = _override
    set_kernel_backend(name)
    try:
        yield
    finally:
        _override = previous


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@cache
def _triton_module() -> ModuleType | None:
    if not triton_installed():
        return None
    try:
        from kernels import triton_kernels
    except Exception:  # a broken triton install must not break the PyTorch path
        return None
    return triton_kernels


def triton_module() -> ModuleType:
    mod = _triton_module()
    if mod is None:
        raise RuntimeError("the Triton kernel path needs `triton` (pip install 'bitdistill[kernels]')")
    return mod


def resolve_backend(device: torch.device) -> Literal["torch", "triton"]:
    """What runs for a tensor on ``device`` under the current setting."""
    choice = kernel_backend()
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if device.type != "cuda" and not triton_module().interpreting():
            raise RuntimeError(
                f"{ENV_VAR}=triton needs CUDA tensors (got {device.type}); TRITON_INTERPRET=1 set before triton is "
                "imported runs the kernels in Triton's CPU interpreter instead"
            )
        return "triton"
    if device.type == "cuda" and _triton_module() is not None:
        return "triton"
    return "torch"


def ternary_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """BitLinear's quantized forward at λ = 1 (act-quant + ternary matmul, STE backward) on the chosen path."""
    if resolve_backend(x.device) == "triton":
        return triton_module().ternary_linear_triton(x, weight, bias)
    return ternary_linear_torch(x, weight, bias)


def triton_takes_scales(device: torch.device, group: int) -> bool:
    """Whether a λ = 1 BitLinear with per-group (or stored per-tensor) scales runs on the Triton kernels here
    (:func:`scaled_ternary_linear`); otherwise it runs its PyTorch ops."""
    return resolve_backend(device) == "triton" and triton_module().supports_group(group)


def scaled_ternary_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group: int,
                          bias: torch.Tensor | None = None, *, learned: bool = False) -> torch.Tensor:
    """BitLinear at λ = 1 with ``scales`` (one per ``group`` values of a row; (1, 1) per tensor) on the Triton
    kernels; ``learned`` scales get LSQ's gradient (see ``kernels.triton_kernels.TritonScaledTernaryLinearFunction``).
    """
    return triton_module().scaled_ternary_linear_triton(x, weight, scales, group, bias, learned=learned)


def packed_linear(
    x: torch.Tensor, weight: PackedTernary, bias: torch.Tensor | None = None, *, chunk_bytes: int | None = None
) -> torch.Tensor:
    """Inference matmul on 2-bit packed weights on the chosen path (groups Triton cannot tile packed, i.e. not a
    multiple of 64 values, run the PyTorch path)."""
    if resolve_backend(x.device) == "triton" and triton_module().supports_group(weight.group, packed=True):
        return triton_module().packed_linear_triton(x, weight, bias)

    return packed_linear_torch(x, weight, bias, chunk_bytes=chunk_bytes or DEFAULT_CHUNK_BYTES)
