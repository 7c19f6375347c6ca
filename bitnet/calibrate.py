"""A calibrated ternary start: GPTQ's error-compensated rounding onto the per-group ternary grid.

Plain post-training quantization rounds every weight on its own: ``Q = s·RoundClip(W / s, -1, 1)``. GPTQ
(Frantar et al. 2022, arXiv 2210.17323) instead minimises each linear layer's *output* error on calibration inputs
``X`` (n × in, one row per token), ``‖X·Wᵀ − X·Qᵀ‖² = tr((W − Q)·H·(W − Q)ᵀ)/2`` with ``H = 2·XᵀX / n``: it
quantizes the columns of ``W`` one at a time and moves each column's rounding error onto the columns not yet
quantized, as the optimal brain surgeon update prescribes. With ``U`` the upper Cholesky factor of ``H⁻¹``
(``H⁻¹ = UᵀU``), column ``j`` is rounded to ``q_j`` and the rest updated by

    e = (w_j − q_j) / U[j, j],       W[:, k] −= e · U[j, k]   for every k > j.

Here the grid is ternary with one scale per group of ``g`` consecutive columns of a row (``g = 0``: one scale for
the whole matrix), as :mod:`kernels.quant` defines it: when column ``j`` starts a group, that group's scales are
the MSE-optimal ternary scales (:func:`kernels.quant.mse_scales`, on the fp16 grid) of the group's columns *as the
updates so far left them*; then ``q_j = s·clamp(round(w_j / s), -1, 1)`` per row. Per-tensor scales are chosen once
from the initial weight. Damping ``H + damp·mean(diag H)·I`` keeps ``H`` invertible; a dead input (``H[j, j] = 0``)
gets ``H[j, j] = 1`` and a zero weight column, as GPTQ does. Lazy batch updates (GPTQ §"Lazy batch-updates") apply
the updates of a block of columns to the columns after it in one matrix product; blocks hold whole groups, so a
group's scales see exactly the weights the column-by-column algorithm would.

:func:`calibrate_student` runs it block by block through a converted student (GPTQ's sequential scheme): the inputs
of each decoder block are the outputs of the blocks before it, *already quantized*; each BitLinear's ``H`` comes
from the input its ternary matmul sees (after its SubLN, before activation quantization). By default within a block
too (GPTQ's "true sequential" variant): the block's BitLinears in groups that share an input (Llama: q/k/v, o,
gate/up, down), each group's ``H`` from a pass of the block with the groups before it already quantized (int8
activations) and the rest in full precision, so ``o_proj``'s GPTQ compensates the ternary q/k/v's error. With
``sequential=False`` every ``H`` of a block comes from one pass with the block's own layers in full precision
(SmolLM2-135M, no SubLN, group scales, 16×256 calibration tokens: held-out ppl 14,249 that way, 3,575 true
sequential, 6,320 true sequential with ``H`` from the int8-quantized inputs instead, teacher 18.1). A SubLN that
conversion inserted is part of the student's layer, so GPTQ matches the student's full-precision function, not the
teacher's. The layer's latent weight becomes exactly ``s·codes``, so the ``mse`` rule recomputes the same scales and
codes from it, and ``learned`` scales start at ``s``: the student's first forward is the calibrated ternary model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bitnet.convert import decoder_layers
from bitnet.layers import BitLinear
from bitnet.quant import act_quant, rule_scales
from kernels.quant import expand_scales, fp16_grid, grouped_codes, mse_scales

__all__ = ["CalibrationError", "CalibrationReport", "best_gptq", "calibrate_student", "gptq_ternary", "output_error"]


class CalibrationError(ValueError):
    """A calibration that cannot give a faithful result (one line; the student is left as it was)."""


@dataclass
class CalibrationReport:
    """What :func:`calibrate_student` did: decoder layers, calibration tokens, wall seconds, and per BitLinear the
    relative output error ``tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)`` of plain MSE-scale rounding (``before``) and of GPTQ
    (``after``), both on the inputs the calibrated blocks before it produce."""

    layers: int
    tokens: int
    seconds: float = 0.0
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)

    @property
    def mean_before(self) -> float:
        return sum(self.before.values()) / max(len(self.before), 1)

    @property
    def mean_after(self) -> float:
        return sum(self.after.values()) / max(len(self.after), 1)

    def metrics(self) -> dict[str, float | int]:
        return {"calibration_layers": self.layers, "calibration_tokens": self.tokens,
                "calibration_seconds": self.seconds, "calibration_error_before": self.mean_before,
                "calibration_error_after": self.mean_after}


# ------------------------------------------------------------------------------------------------ GPTQ
def inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``), in float64, returned in float32.

    With ``J`` the reversal permutation and ``J·H·J = L·Lᵀ``, ``U = J·L⁻¹·J``: upper triangular, and
    ``UᵀU = J·L⁻ᵀ·L⁻¹·J = (J·H·J)⁻¹`` conjugated back by ``J``, i.e. ``H⁻¹``. One Cholesky and one triangular
    solve (``cholesky_inverse`` then a second Cholesky costs more, and scales badly with threads on a busy CPU)."""
    flipped = torch.flip(h.double(), (0, 1))
    low, info = torch.linalg.cholesky_ex(flipped)
    if int(info):
        raise CalibrationError("the damped calibration Hessian is not positive definite: raise calibration.damp")
    eye = torch.eye(h.shape[0], dtype=torch.float64, device=h.device)
    return torch.flip(torch.linalg.solve_triangular(low, eye, upper=False), (0, 1)).float()


def damped(weight: torch.Tensor, hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``W`` (float32 copy) with dead columns zeroed, and ``H + damp·mean(diag H)·I`` with dead diagonals set to 1."""
    w = weight.detach().float().clone()
    h = hessian.detach().to(w.device, torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    return w, h


def _check_group(weight: torch.Tensor, hessian: torch.Tensor, group: int) -> None:
    out, n = weight.shape
    if hessian.shape != (n, n):
        raise ValueError(f"a Hessian of shape {tuple(hessian.shape)} does not fit a {out}×{n} weight")
    if group < 0 or (group and n % group):
        raise ValueError(f"a group of {group} does not divide a row of {n} values")


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread for the column loop on a CPU: its operations are single rows (hundreds of values), where
    thread start-up and barriers cost more than the work (tenfold on a busy 2-core machine). Elementwise results do
    not depend on the thread count."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def gptq_ternary(weight: torch.Tensor, hessian: torch.Tensor, group: int, damp: float = 0.01,
                 block: int = 128, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ onto the ternary grid with per-group MSE scales (module docstring), with lazy batch updates.

    ``weight`` (out, in), ``hessian`` (in, in), ``group`` values per scale (0 = one per tensor). Returns the codes
    (int8, (out, in), in {-1, 0, 1}) and the scales (float32 on the fp16 grid, (out, in // group) or (1, 1)):
    the quantized weight is ``codes · expand_scales(scales)``. Columns in natural order, or with ``act_order`` by
    descending ``diag(H)`` (GPTQ's ``desc_act``) with static groups: every scale chosen up front, the MSE scales of
    the weight (dead columns zeroed), since a group's columns are then scattered. A group whose codes all end at 0
    gets the scale the ``mse`` rule gives an all-zero group, so that ``s·codes`` gives back both. Deterministic."""
    _check_group(weight, hessian, group)
    out, n = weight.shape
    w, h = damped(weight, hessian, damp)
    order = static = None
    if act_order:
        scales = fp16_grid(mse_scales(w, group)).reshape((1, 1) if group == 0 else (out, n // group))
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
        static = expand_scales(scales, group, (out, n)).expand(out, n)[:, order].t().contiguous()  # (in, out)
    elif group == 0:
        scales = fp16_grid(mse_scales(weight, 0)).reshape(1, 1).to(weight.device)
    else:
        scales = torch.zeros(out, n // group, dtype=torch.float32, device=weight.device)
    hinv = inverse_cholesky(h)
    wt = w.t().contiguous()  # column j of W is row j: every update below touches contiguous rows
    codes = torch.zeros(n, out, dtype=torch.int8, device=w.device)
    step = max(block // group, 1) * group if group else max(block, 1)  # blocks of whole groups
    s = scales.reshape(1).expand(out) if group == 0 else scales[:, 0]
    for i1 in range(0, n, step):
        i2 = min(i1 + step, n)
        w1, u1 = wt[i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        with _one_thread(w.device):
            for i in range(i2 - i1):
                j = i1 + i
                if static is not None:
                    s = static[j]
                elif group and j % group == 0:
                    s = fp16_grid(mse_scales(w1[i:i + group].t(), group))[:, 0]
                    scales[:, j // group] = s
                c = torch.clamp(torch.round(w1[i] / s), -1, 1)
                e = (w1[i] - c * s) / u1[i, i]
                w1[i + 1:] -= u1[i, i + 1:, None] * e
                err1[i] = e
                codes[j] = c.to(torch.int8)
        wt[i2:] -= hinv[i1:i2, i2:].t() @ err1
    if order is not None:
        codes[order] = codes.clone()
    codes = codes.t().contiguous()
    if group:
        empty = codes.reshape(out, n // group, group).eq(0).all(-1)
        scales = torch.where(empty, fp16_grid(torch.zeros_like(scales)), scales)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """``codes · s`` (float32) with per-group ``scales`` broadcast over the weight."""
    return codes.float() * expand_scales(scales.float(), group, codes.shape)


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error ``tr((W − Q)·H·(W − Q)ᵀ) / tr(W·H·Wᵀ)`` (0 for a zero ``W·H·Wᵀ``)."""
    w = weight.detach().float()
    h = hessian.float()
    d = w - quantized.float()
    num = float(((d @ h) * d).sum())
    den = float(((w @ h) * w).sum())
    return num / den if den > 0 else 0.0


# ------------------------------------------------------------------------------------------------ the student
Record = tuple[tuple[Any, ...], dict[str, Any]]  # a decoder layer's call without its hidden states


class _Stop(Exception):
    """Ends the capture pass after the last decoder layer (the head is not needed)."""


def capture_inputs(student: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]
                   ) -> tuple[list[torch.Tensor], list[list[Record]]]:
    """Block 0's hidden states for every batch, and every layer's other arguments (attention mask, position
    embeddings, ...: what the model passes it, per layer, since masks may differ by layer type). Every decoder
    layer is a pass-through while capturing, and the last one stops the forward."""
    hidden: list[torch.Tensor] = []
    calls: list[list[Record]] = []

    def recorder(i: int) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:
            h, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
            if i == 0:
                hidden.append(h)
            calls[-1].append((rest, kwargs))
            if i == len(layers) - 1:
                raise _Stop
            return h

        return record

    device = next(student.parameters()).device
    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        for ids in batches:
            calls.append([])
            try:
                student(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
            if len(calls[-1]) != len(layers):
                raise CalibrationError(f"the model called {len(calls[-1])} of its {len(layers)} decoder layers")
    finally:
        for layer in layers:
            del layer.forward
    return hidden, calls


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class HessianHooks:
    """Forward pre-hooks on a block's BitLinears accumulating ``Σ XᵀX`` of each one's normed input (float32).
    Layers without SubLN that receive the same tensor (q/k/v, gate/up) share one product per batch."""

    def __init__(self, layers: dict[str, BitLinear]) -> None:
        self.layers = layers
        self.sums = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
                     for name, m in layers.items()}
        self.rows = 0
        self._batch: dict[str, Any] = {}  # layer → key of its input this batch
        self._inputs: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}  # key → (input kept alive, normed rows)
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
            assert isinstance(module, BitLinear)
            x = args[0]
            key: Any = ("x", id(x)) if module.sub_norm is None else ("n", name)
            if key not in self._inputs:
                rows = module.normed_input(x).detach().float().reshape(-1, module.in_features)
                self._inputs[key] = (x, rows)
            self._batch[name] = key

        return pre

    def flush(self) -> None:
        """Add this batch's products to the sums."""
        products = {key: rows.t() @ rows for key, (_, rows) in self._inputs.items()}
        for name, key in self._batch.items():
            self.sums[name] += products[key]
        counts = {rows.shape[0] for _, rows in self._inputs.values()}
        if len(counts) > 1:
            raise CalibrationError(f"the BitLinears of one block saw different numbers of tokens: {sorted(counts)}")
        self.rows += counts.pop() if counts else 0
        self._batch.clear()
        self._inputs.clear()

    def hessians(self) -> dict[str, torch.Tensor]:
        """``H = 2·XᵀX / n`` per layer; a non-finite one is refused, naming its layer."""
        out = {}
        for name, s in self.sums.items():
            if not torch.isfinite(s).all():
                raise CalibrationError(f"the calibration Hessian of {name} holds NaN or inf values (non-finite "
                                       "activations reach it)")
            out[name] = s * (2.0 / max(self.rows, 1))
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _matmul(layer: BitLinear, quantized_inputs: bool, x: torch.Tensor) -> torch.Tensor:
    return F.linear(act_quant(x, layer.quant_lambda) if quantized_inputs else x, layer.weight, layer.bias)


@contextmanager
def plain_matmuls(layers: Iterable[BitLinear], *, quantized_inputs: bool) -> Iterator[None]:
    """Every layer's ternary matmul replaced by ``F.linear(x', W, b)`` with its latent ``W`` (SubLN and LRC stay):
    ``x' = x``, the full-precision layer (the Hessian pass), or ``x' = act_quant(x, λ)``: once ``W`` is exactly
    ``s·codes`` (:func:`_quantize_layer` checks it) that *is* the layer's quantized forward (``q(W) = W``, so the
    λ blend ``W + λ·(q(W) − W)`` is ``W`` too), without recomputing the scales from ``W`` at every call."""
    layers = list(layers)
    for m in layers:
        m.quantized_forward = partial(_matmul, m, quantized_inputs)
    try:
        yield
    finally:
        for m in layers:
            del m.quantized_forward


Original = tuple[BitLinear, torch.Tensor, torch.Tensor | None]  # a layer, its latent weight and learned scales


Quantizer = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]  # (W, H, group) → codes, s


def best_gptq(weight: torch.Tensor, hessian: torch.Tensor, group: int, *, damp: float, act_order: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gptq_ternary` in natural order, and with ``act_order`` also by descending ``diag(H)`` (static
    groups): the one of lower output error (natural order on a tie)."""
    best = gptq_ternary(weight, hessian, group, damp)
    if act_order:
        other = gptq_ternary(weight, hessian, group, damp, act_order=True)
        if output_error(weight, dequantize(*other, group), hessian) < output_error(weight, dequantize(*best, group),
                                                                                      hessian):
            best = other
    return best


def _quantize_layer(name: str, layer: BitLinear, h: torch.Tensor, quantize: Quantizer, report: CalibrationReport,
                    originals: list[Original]) -> None:
    """GPTQ one BitLinear and make its latent weight exactly ``s·codes`` (learned scales start at ``s``)."""
    group, w = layer.scale_group, layer.weight.detach()
    codes, scales = quantize(w, h, group)
    plain_scales = rule_scales(w, group, "mse")
    q = dequantize(codes, scales, group)
    report.before[name] = output_error(w, dequantize(grouped_codes(w, plain_scales, group), plain_scales, group), h)
    report.after[name] = output_error(w, q, h)
    learned = None if layer.weight_scales is None else layer.weight_scales.detach().to("cpu", copy=True)
    originals.append((layer, w.to("cpu", copy=True), learned))
    layer.weight.copy_(q.to(layer.weight.dtype))
    if layer.scale_rule == "learned":
        layer.configure_scales(group, "learned", scales)
    check = layer.ternary_weight()
    if not (torch.equal(check.codes, codes) and torch.equal(check.scales.float(), scales)):
        raise CalibrationError(f"{name}: its {layer.weight.dtype} latent weight cannot hold s·codes exactly (the "
                               "scale rule would recompute other codes or scales); calibrate in float32")


def _restore(originals: list[Original]) -> None:
    for layer, weight, learned in reversed(originals):
        layer.weight.copy_(weight.to(layer.weight.device))
        if learned is not None:
            layer.configure_scales(layer.scale_group, "learned", learned)


def _calibrate_block(block: nn.Module, prefix: str, hidden: list[torch.Tensor], records: list[Record],
                     quantize: Quantizer, report: CalibrationReport, originals: list[Original]) -> None:
    """GPTQ's scheme: every BitLinear's ``H`` from one pass of the block in full precision over all batches, all
    checked, then GPTQ each BitLinear."""
    linears = {f"{prefix}.{n}": m for n, m in block.named_modules() if isinstance(m, BitLinear)}
    hooks = HessianHooks(linears)
    try:
        with plain_matmuls(linears.values(), quantized_inputs=False):  # GPTQ: the block's own inputs in full precision
            for h, (rest, kwargs) in zip(hidden, records):
                block(h, *rest, **kwargs)
                hooks.flush()
    finally:
        hooks.remove()
    hessians = hooks.hessians()  # all of the block's checked before any of its layers is written
    for name, layer in linears.items():
        _quantize_layer(name, layer, hessians[name], quantize, report, originals)


def block_groups(block: nn.Module, linears: dict[str, BitLinear], hidden: torch.Tensor, record: Record
                 ) -> list[list[str]]:
    """The block's BitLinears in the order its forward calls them, consecutive calls on the same input tensor in
    one group (Llama: ``[q, k, v], [o], [gate, up], [down]``), from one full-precision pass on one batch. A layer
    called again keeps its first group; layers the forward never calls come last, one group."""
    calls: list[tuple[str, torch.Tensor]] = []  # the inputs stay referenced: identity comparisons stay sound

    def recorder(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
            calls.append((name, args[0]))

        return pre

    handles = [m.register_forward_pre_hook(recorder(name)) for name, m in linears.items()]
    try:
        with plain_matmuls(linears.values(), quantized_inputs=False):
            block(hidden, *record[0], **record[1])
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    placed: set[str] = set()
    last: torch.Tensor | None = None
    for name, x in calls:
        if name in placed:
            continue
        if groups and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
            last = x
        placed.add(name)
    unused = [name for name in linears if name not in placed]
    return groups + ([unused] if unused else [])


def _stop(module: nn.Module, args: tuple[Any, ...]) -> None:
    raise _Stop


def _calibrate_block_sequential(block: nn.Module, prefix: str, hidden: list[torch.Tensor], records: list[Record],
                                quantize: Quantizer, report: CalibrationReport, originals: list[Original]) -> None:
    """GPTQ's "true sequential" scheme: the block's groups of BitLinears (:func:`block_groups`) one after the other,
    each group's ``H`` gathered from a pass of the block over all batches in which the groups before it are already
    quantized (their quantized forward, int8 activations) and the rest in full precision; the pass stops at the
    group's last layer. So ``o_proj`` sees the attention of the ternary q/k/v, ``down_proj`` the ternary MLP's
    gate·up, and each layer's GPTQ compensates the errors of the ones before it in the block."""
    linears = {f"{prefix}.{n}": m for n, m in block.named_modules() if isinstance(m, BitLinear)}
    done: list[BitLinear] = []
    for group in block_groups(block, linears, hidden[0], records[0]):
        members = {name: linears[name] for name in group}
        hooks = HessianHooks(members)
        stop = members[group[-1]].register_forward_pre_hook(_stop)  # after the Hessian hooks: they fire first
        pending = [m for m in linears.values() if all(m is not d for d in done)]
        try:
            with plain_matmuls(done, quantized_inputs=True), plain_matmuls(pending, quantized_inputs=False):
                for h, (rest, kwargs) in zip(hidden, records):
                    try:
                        block(h, *rest, **kwargs)
                    except _Stop:
                        pass
                    hooks.flush()
        finally:
            stop.remove()
            hooks.remove()
        hessians = hooks.hessians()  # the group's all checked before any of its layers is written
        for name, layer in members.items():
            _quantize_layer(name, layer, hessians[name], quantize, report, originals)
            done.append(layer)


def _check_student(student: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]) -> int:
    """Refusals before anything runs; returns the number of calibration tokens."""
    linears = [(n, m) for n, m in student.named_modules() if isinstance(m, BitLinear)]
    if not linears:
        raise CalibrationError("calibration needs a converted BitNet student (no BitLinear found)")
    absmean = [n for n, m in linears if m.scale_rule == "absmean"]
    if absmean:
        raise CalibrationError(f"calibration needs scale_rule mse or learned, not absmean ({absmean[0]}): an absmean "
                               "scale recomputed from the calibrated s·codes would shrink it")
    tokens = sum(int(b.numel()) for b in batches)
    widest = max(m.scale_group or m.in_features for _, m in linears)
    if tokens < widest:
        raise CalibrationError(f"calibration data smaller than one block per group: {tokens} tokens for scale "
                               f"groups of {widest} columns (the Hessian would be rank-deficient)")
    if not layers:
        raise CalibrationError("the student has no decoder layers to calibrate")
    return tokens


@torch.no_grad()
def calibrate_student(student: nn.Module, batches: Iterable[torch.Tensor], *, damp: float = 0.01,
                      sequential: bool = True, act_order: bool = True, progress: bool = False) -> CalibrationReport:
    """GPTQ every BitLinear of a converted student, decoder block by decoder block, in place (module docstring).

    ``batches``: LongTensors (b, seq) of token ids. ``sequential``: within a block, each group of BitLinears
    calibrated on the outputs of the already quantized ones before it (:func:`_calibrate_block_sequential`); else
    every ``H`` from one full-precision pass of the block (:func:`_calibrate_block`). ``act_order``: every layer
    also by descending ``diag(H)`` with static groups, keeping the lower output error (:func:`best_gptq`). Only one
    block's activations of all batches are held at a time. On any failure the student is left as it was."""
    quantize = partial(best_gptq, damp=damp, act_order=act_order)
    calibrate_block = _calibrate_block_sequential if sequential else _calibrate_block
    t0 = time.perf_counter()
    data = [torch.as_tensor(b) for b in batches]
    layers = decoder_layers(student)
    report = CalibrationReport(layers=len(layers), tokens=_check_student(student, layers, data))
    names = {m: n for n, m in student.named_modules()}
    originals: list[Original] = []
    was_training = student.training
    student.eval()
    try:
        hidden, calls = capture_inputs(student, layers, data)
        for i in tqdm(range(len(layers)), desc="calibrate", unit="layer", disable=not progress):
            records = [c[i] for c in calls]
            calibrate_block(layers[i], names[layers[i]], hidden, records, quantize, report, originals)
            linears = [m for m in layers[i].modules() if isinstance(m, BitLinear)]
            with plain_matmuls(linears, quantized_inputs=True):  # the quantized block's outputs feed the next one
                for b, (rest, kwargs) in enumerate(records):
                    hidden[b] = _first(layers[i](hidden[b], *rest, **kwargs))
    except BaseException:
        _restore(originals)
        raise
    finally:
        student.train(was_training)
    report.seconds = time.perf_counter() - t0
    return report
