"""Closed-form initialisation of the low-rank correction (LRC, Scetbon & Hensman, arXiv 2412.07902).

A :class:`~bitnet.layers.BitLinearLRC` computes ``y = Wq·Q(x) + U·(Vᵀ·x)`` where ``x`` is the layer's
unquantized (sub-normed) input, ``Q`` the per-token int8 activation quantizer and ``Wq`` the dequantized
ternary weight. LRC chooses the rank-r correction that best restores the full-precision output on
calibration inputs ``X`` (n × in, one row per token)::

    min_{rank(B) ≤ r}  ‖X·Wᵀ − Q(X)·Wqᵀ − X·B‖_F ,      B = V·Uᵀ  (in × out)

i.e. the paper's ``‖W·X − Wq·Q(X) − U·Vᵀ·X‖_F`` with X stored column-wise there and row-wise here. The
paper alternates updates of the quantized weight (GPTQ) with updates of U, V; our ternary ``Wq`` is fixed
(absmean rounding of the latent weight), so only the U/V step is needed. For a fixed ``Wq`` it is classical
reduced-rank regression (Izenman 1975) of the target ``Y = X·Wᵀ − Q(X)·Wqᵀ`` on ``X``; the derivation below
is ours, written from that objective (only the paper's abstract/summary pages were reachable here):

1. statistics ``Σ = XᵀX`` (in × in), ``C = XᵀY`` (in × out) and ``‖Y‖²``, accumulated batch by batch
   (:class:`CovarianceAccumulator`) so the number of calibration tokens costs no memory;
2. the unconstrained least-squares solution ``B* = Σ_λ⁻¹·C`` with a ridge ``λ = ridge·tr(Σ)/in``;
3. since ``‖Y − X·B‖² = ‖Y − X·B*‖² + ‖Σ^{1/2}(B − B*)‖²`` (exactly for λ = 0, and for the ridge-
   regularised objective otherwise), the rank-r optimum is ``B_r = B*·Q_r·Q_rᵀ`` where ``Q_r`` are the top-r
   right singular vectors of ``M = Σ^{1/2}·B*`` (= of the fitted values ``X·B*``, because
   ``MᵀM = (X·B*)ᵀ(X·B*)``). Everything goes through the in × in covariance: the cost does not grow with n
   beyond forming ``Σ`` and ``C``. With the ridge, ``B_r`` is the exact rank-r minimiser of
   ``‖Y − X·B‖² + λ‖B‖²``;
4. balanced factors: with the thin SVD ``B_r = A·S·Gᵀ``, ``V = A·S^{1/2}`` and ``U = G·S^{1/2}``
   (column i of U and of V both have norm ``√s_i``), which keeps later gradient training of U and V
   well-conditioned.

All of it runs in float64; results come back in the layer's dtype. :func:`lrc_svd_fallback` is the
activation-free baseline (truncated SVD of ``W − Wq``).

:func:`calibrate_lrc` runs calibration batches through the *student* with forward pre-hooks on every
``BitLinearLRC`` (the paper's setting needs no teacher: ``W`` is the layer's full-precision latent weight,
``Wq = layer.ternary_weight().dequantize()``, whatever the scale rule). When a ``teacher`` is given and holds an
``nn.Linear`` of the same shape at the same module path, its weight is used as ``W`` instead: the correction then
pulls each layer's output towards the *teacher's* layer applied to the student's inputs (for a freshly converted student
both choices coincide, since the latent weight is a copy of the teacher's). Biases cancel (same bias on
both sides) and are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import nn

from bitnet.layers import BitLinearLRC, bit_linears
from bitnet.quant import act_quant_value, weight_quant_value

Method = Literal["closed_form", "svd"]
_F64 = torch.float64
DEFAULT_MAX_STATS_BYTES = 2 << 30  # 2 GiB of float64 statistics per calibration pass


def _check_rank(rank: int, in_features: int, out_features: int, what: str = "layer") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"LRC rank must be an int, got {type(rank).__name__}")
    limit = min(in_features, out_features)
    if rank < 1 or rank > limit:
        raise ValueError(
            f"LRC rank must be in [1, min(in_features, out_features)] = [1, {limit}] for {what} "
            f"({in_features} -> {out_features}), got {rank}"
        )
    return rank


def _balanced_factors(b: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ``b`` (in × out, rank ≤ r, or any matrix to truncate) as ``V·Uᵀ`` with balanced singular values."""
    a, s, gh = torch.linalg.svd(b, full_matrices=False)
    root = s[:rank].sqrt()
    v = a[:, :rank] * root
    u = gh[:rank].t() * root
    return u.to(dtype), v.to(dtype)


class CovarianceAccumulator:
    """Streaming statistics of one layer for the closed-form LRC fit.

    Holds, in float64, ``xtx = ΣXᵀX`` (in × in), ``xty = ΣXᵀY`` (in × out), ``yty = Σ‖Y‖²`` and the token
    count, where ``Y = X·Wᵀ − Q(X)·Wqᵀ`` is computed per batch from the weights passed to :meth:`update`
    (every update of one accumulator must use the same ``W``/``Wq``). Memory is
    ``8·in·(in + out)`` bytes, independent of the number of tokens. The statistics are plain sums, so
    accumulators of data shards can be :meth:`merge`-d (or their tensors all-reduced).
    """

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        if in_features < 1 or out_features < 1:
            raise ValueError(f"feature sizes must be positive, got in={in_features}, out={out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.xtx = torch.zeros(in_features, in_features, dtype=_F64, device=device)
        self.xty = torch.zeros(in_features, out_features, dtype=_F64, device=device)
        self.yty = torch.zeros((), dtype=_F64, device=device)
        self.n_tokens = 0

    @staticmethod
    def nbytes(in_features: int, out_features: int) -> int:
        return 8 * in_features * (in_features + out_features + 1)

    @torch.no_grad()
    def update(self, x: torch.Tensor, weight: torch.Tensor, quantized_weight: torch.Tensor | None = None) -> None:
        """Add a batch of unquantized (sub-normed) inputs ``x`` (…, in).

        ``Q(x)`` is computed in ``x``'s dtype, as the layer does; ``quantized_weight`` defaults to
        ``weight_quant_value(weight)``.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, accumulator expects {self.in_features}")
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(
                f"weight has shape {tuple(weight.shape)}, expected ({self.out_features}, {self.in_features})"
            )
        wq = weight_quant_value(weight) if quantized_weight is None else quantized_weight
        x2 = x.detach().reshape(-1, self.in_features)
        xq = act_quant_value(x2)
        dev = self.xtx.device
        x64 = x2.to(device=dev, dtype=_F64)
        w64 = weight.detach().to(device=dev, dtype=_F64)
        wq64 = wq.detach().to(device=dev, dtype=_F64)
        self._add(x64, x64 @ w64.t() - xq.to(device=dev, dtype=_F64) @ wq64.t())

    @torch.no_grad()
    def _add(self, x64: torch.Tensor, y64: torch.Tensor) -> None:
        self.xtx.addmm_(x64.t(), x64)
        self.xty.addmm_(x64.t(), y64)
        self.yty += y64.pow(2).sum()
        self.n_tokens += x64.shape[0]

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        if (other.in_features, other.out_features) != (self.in_features, self.out_features):
            raise ValueError("cannot merge accumulators of different shapes")
        self.xtx += other.xtx.to(self.xtx.device)
        self.xty += other.xty.to(self.xty.device)
        self.yty += other.yty.to(self.yty.device)
        self.n_tokens += other.n_tokens
        return self

    def objective(self, u: torch.Tensor | None = None, v: torch.Tensor | None = None) -> float:
        """``‖Y − X·V·Uᵀ‖_F`` from the statistics alone (``u``/``v`` None: no correction)."""
        sq = self.yty.clone()
        if u is not None and v is not None:
            b = v.detach().to(self.xtx) @ u.detach().to(self.xtx).t()
            sq = sq - 2.0 * (b * self.xty).sum() + (b * (self.xtx @ b)).sum()
        return math.sqrt(max(float(sq), 0.0))


@torch.no_grad()
def init_lrc_from_stats(
    acc: CovarianceAccumulator, rank: int, ridge: float = 1e-6, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r reduced-rank-regression solution ``(U (out × r), V (in × r))`` from accumulated statistics."""
    _check_rank(rank, acc.in_features, acc.out_features, "the accumulator")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if acc.n_tokens == 0:
        raise ValueError("no calibration data was accumulated")
    sigma, c = acc.xtx, acc.xty
    d = acc.in_features
    lam = ridge * float(torch.diagonal(sigma).sum()) / d
    evals, evecs = torch.linalg.eigh(sigma + lam * torch.eye(d, dtype=_F64, device=sigma.device))
    # pseudo-inverse on the numerically null space (only relevant with ridge=0 or all-zero inputs)
    keep = evals > evals.max().clamp(min=0) * d * torch.finfo(_F64).eps
    safe = torch.where(keep, evals, torch.ones_like(evals))
    inv = torch.where(keep, 1.0 / safe, torch.zeros_like(evals))
    inv_sqrt = torch.where(keep, safe.rsqrt(), torch.zeros_like(evals))
    proj = evecs.t() @ c
    b_star = evecs @ (inv[:, None] * proj)  # (in, out) least-squares solution Σ_λ⁻¹·C
    m = evecs @ (inv_sqrt[:, None] * proj)  # Σ_λ^{1/2}·B*, whose Gram matrix is the fitted values' Gram
    _, _, qh = torch.linalg.svd(m, full_matrices=False)
    q_r = qh[:rank].t()  # (out, r) top right singular vectors
    # B_r = (B*·Q_r)·Q_rᵀ; rebalance through the thin SVD of the (in × r) factor.
    a, s, rh = torch.linalg.svd(b_star @ q_r, full_matrices=False)
    root = s.sqrt()
    v = a * root
    u = (q_r @ rh.t()) * root
    return u.to(dtype), v.to(dtype)


def lrc_closed_form(
    w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor, rank: int, ridge: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r ``(U, V)`` minimising ``‖X·Wᵀ − Q(X)·Wqᵀ − X·V·Uᵀ‖_F`` for inputs ``x`` (…, in).

    ``w`` is the full-precision weight (out × in), ``wq`` the dequantized ternary weight. Returned in
    ``w``'s dtype. Built on :class:`CovarianceAccumulator` + :func:`init_lrc_from_stats`.
    """
    out_f, in_f = w.shape
    _check_rank(rank, in_f, out_f)
    acc = CovarianceAccumulator(in_f, out_f, device=w.device)
    acc.update(x, w, wq)
    return init_lrc_from_stats(acc, rank, ridge=ridge, dtype=w.dtype)


@torch.no_grad()
def lrc_svd_fallback(w: torch.Tensor, wq: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-free baseline: balanced rank-r truncated SVD of ``W − Wq`` as ``U·Vᵀ``."""
    out_f, in_f = w.shape
    _check_rank(rank, in_f, out_f)
    diff = (w.detach().to(_F64) - wq.detach().to(_F64)).t()  # (in, out), the B = V·Uᵀ layout
    return _balanced_factors(diff, rank, w.dtype)


@torch.no_grad()
def lrc_objective(
    w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None
) -> float:
    """``‖X·Wᵀ − Q(X)·Wqᵀ − X·V·Uᵀ‖_F`` computed directly in float64 (``u``/``v`` None: no correction)."""
    x2 = x.detach().reshape(-1, w.shape[1])
    xq = act_quant_value(x2).to(_F64)
    x64 = x2.to(_F64)
    r = x64 @ w.detach().to(_F64).t() - xq @ wq.detach().to(_F64).t()
    if u is not None and v is not None:
        r = r - (x64 @ v.detach().to(_F64)) @ u.detach().to(_F64).t()
    return float(torch.linalg.matrix_norm(r))


def _run_batches(model: nn.Module, batches: Iterable, device: torch.device) -> None:
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            model(input_ids=batch.to(device))
        elif isinstance(batch, Mapping):
            kwargs = {k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in batch.items()}
            kwargs.pop("labels", None)
            model(**kwargs)
        else:
            raise TypeError(f"a calibration batch must be input ids or a mapping of model kwargs, not {type(batch)}")


def _reference_weight(teacher: nn.Module | None, name: str, layer: BitLinearLRC) -> torch.Tensor:
    if teacher is not None:
        try:
            ref = teacher.get_submodule(name)
        except AttributeError:
            ref = None
        if isinstance(ref, nn.Linear) and tuple(ref.weight.shape) == tuple(layer.weight.shape):
            return ref.weight.detach().to(device=layer.weight.device)
    return layer.weight.detach()


@torch.no_grad()
def calibrate_lrc(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable,
    rank: int,
    method: Method = "closed_form",
    *,
    ridge: float = 1e-6,
    max_stats_bytes: int = DEFAULT_MAX_STATS_BYTES,
) -> dict[str, float]:
    """Initialise every ``BitLinearLRC`` of ``student`` from calibration batches; returns, per layer name,
    the relative objective improvement ``1 − ‖residual with LRC‖_F / ‖residual without‖_F`` on the
    calibration data.

    ``student`` must be a converted BitNet student; plain BitLinears are turned into ``BitLinearLRC`` of
    ``rank`` via :func:`bitnet.convert.add_lrc` (existing adapters must have this rank). ``W`` is each layer's
    latent weight, or, when ``teacher`` has an ``nn.Linear`` of the same shape at the same path, the teacher's
    weight (other layers silently keep the latent weight; see the module docstring). ``batches`` is an
    iterable of input-id tensors or of model-kwarg mappings (``labels`` is dropped). The objective targets
    the fully quantized path (λ = 1) whatever the layers' current warm-up λ.

    Memory stays bounded: the float64 statistics of layers (in forward order) are grouped so that one pass
    over ``batches`` holds at most ``max_stats_bytes`` (always at least one layer). With several passes,
    later groups see inputs already produced by the corrected earlier groups (sequential calibration);
    an iterator of batches is then materialised into a list. ``method="svd"`` uses the activation-free
    fallback but still reports improvements on the calibration statistics.
    """
    if method not in ("closed_form", "svd"):
        raise ValueError(f"method must be 'closed_form' or 'svd', got {method!r}")
    groups = _stat_groups(_lrc_layers(student, rank), max_stats_bytes)
    if len(groups) > 1 and iter(batches) is batches:
        batches = list(batches)
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    results: dict[str, float] = {}
    try:
        for group in groups:
            results.update(_calibrate_group(student, teacher, group, batches, device, method, rank, ridge))
    finally:
        student.train(was_training)
    return results


def _lrc_layers(student: nn.Module, rank: int) -> list[tuple[str, BitLinearLRC]]:
    """The student's BitLinears as ``BitLinearLRC`` of ``rank`` (added when none has an adapter), checked."""
    layers = bit_linears(student)
    if not layers:
        raise ValueError("calibrate_lrc needs a converted BitNet student (no BitLinear found)")
    for name, layer in layers:
        _check_rank(rank, layer.in_features, layer.out_features, name)
        if isinstance(layer, BitLinearLRC) and layer.rank != rank:
            raise ValueError(f"{name} already has an LRC adapter of rank {layer.rank}, not {rank}")
    if not all(isinstance(m, BitLinearLRC) for _, m in layers):
        if any(isinstance(m, BitLinearLRC) for _, m in layers):
            raise ValueError("student mixes BitLinear and BitLinearLRC layers")
        from bitnet.convert import add_lrc

        add_lrc(student, rank)
        layers = bit_linears(student)
    return layers  # type: ignore[return-value]


def _stat_groups(layers: list[tuple[str, BitLinearLRC]], max_stats_bytes: int) -> list[list[tuple[str, BitLinearLRC]]]:
    """Consecutive layers whose float64 statistics fit ``max_stats_bytes`` together (at least one layer each)."""
    groups: list[list[tuple[str, BitLinearLRC]]] = [[]]
    used = 0
    for name, layer in layers:
        cost = CovarianceAccumulator.nbytes(layer.in_features, layer.out_features)
        if groups[-1] and used + cost > max_stats_bytes:
            groups.append([])
            used = 0
        groups[-1].append((name, layer))
        used += cost
    return groups


def _calibrate_group(student: nn.Module, teacher: nn.Module | None, group: list[tuple[str, BitLinearLRC]],
                     batches: Iterable, device: torch.device, method: Method, rank: int, ridge: float
                     ) -> dict[str, float]:
    """One pass over ``batches`` gathering the statistics of ``group``'s layers, then each layer's adapter set
    (closed form or SVD) and its relative objective improvement returned."""
    accs: dict[str, CovarianceAccumulator] = {}
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, layer in group:
        w = _reference_weight(teacher, name, layer)
        weights[name] = (w, layer.ternary_weight().dequantize().to(layer.weight.dtype))
        accs[name] = CovarianceAccumulator(layer.in_features, layer.out_features, device=layer.weight.device)

        def hook(mod: BitLinearLRC, args: tuple, _name: str = name) -> None:
            w_ref, wq = weights[_name]
            accs[_name].update(mod.normed_input(args[0]), w_ref, wq)

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        _run_batches(student, batches, device)
    finally:
        for h in handles:
            h.remove()
    results: dict[str, float] = {}
    for name, layer in group:
        acc = accs.pop(name)
        if acc.n_tokens == 0:
            raise ValueError(f"no calibration input reached {name}")
        if method == "closed_form":
            u, v = init_lrc_from_stats(acc, rank, ridge=ridge, dtype=layer.weight.dtype)
        else:
            u, v = lrc_svd_fallback(*weights[name], rank)
        layer.lrc_u.copy_(u)
        layer.lrc_v.copy_(v)
        before = acc.objective()
        after = acc.objective(layer.lrc_u, layer.lrc_v)
        results[name] = 1.0 - after / before if before > 0 else 0.0
    return results


__all__ = [
    "CovarianceAccumulator",
    "calibrate_lrc",
    "init_lrc_from_stats",
    "lrc_closed_form",
    "lrc_objective",
    "lrc_svd_fallback",
]
