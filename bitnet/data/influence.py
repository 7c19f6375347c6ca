"""Influence-based data selection (TracIn / LESS style), pure PyTorch.

Recipe (LESS, Xia et al. 2024, arXiv 2402.04333, without its LoRA warm-up and Adam preconditioning):

1. per-example gradient of the causal-LM loss (mean next-token cross-entropy) w.r.t. a chosen subset of
   the parameters, in eval mode (``torch.func``: ``functional_call`` + ``vmap`` + ``grad``; a plain loop
   as fallback); ``.grad`` is never touched;
2. a fixed-seed random projection (Rademacher ±1/√k as in LESS/TRAK, or Gaussian) of the flattened
   gradient to ``proj_dim`` dimensions, generated block-wise (``PROJ_BLOCK_ROWS`` rows at a time, each
   block seeded from ``(seed, parameter name, block index)``) so a large parameter subset never needs the
   dense ``d × proj_dim`` matrix in memory and the matrix does not depend on batch or cache size;
3. L2-normalised features; each candidate is scored by the cosine similarity of its feature to the mean
   target feature (LESS's ranking), or the max over targets / target groups (LESS's max over sub-tasks).
   By default both sides are first centred on the mean candidate feature: every example's gradient
   shares a large common direction (e.g. "flatten / sharpen the output distribution") that, for a small
   or briefly trained model, decides plain cosine rankings more than the domain does; removing it made
   in-domain-vs-out-of-domain selection reliable in our tests (``center=False`` gives plain LESS);
4. the top ``keep_fraction`` of the candidates is kept and can be written as a new packed dataset
   (:func:`write_subset`) that any stage trains on like any other ``PackedDataset``.

Default gradient subset: every norm gain vector (``*norm.weight``: input/post-attention norms of every
layer, the final norm, q/k norms, SubLN) — ``hidden × (2·layers + 1)`` numbers, cheap at any model
size, touching every depth, and in our measurements at least as discriminative as the whole last block
for a tenth of the cost. Note that a tied ``lm_head`` is the embedding matrix (vocab × hidden): large,
and its gradient mixes the input-embedding rows of the tokens present.

Parameter patterns (``InfluenceConfig.params``): a pattern containing ``*``, ``?`` or ``[`` is an
``fnmatch`` glob over the full parameter name; any other pattern matches names that contain it on
dot boundaries (``"lm_head"`` matches ``lm_head.weight``; ``"model.layers.1"`` does not match
``model.layers.10.…``). ``{last_block}`` expands to the last block of the model's largest ``ModuleList``
(e.g. ``model.layers.3``). Names are matched with tied aliases included, so ``"lm_head"`` finds a tied
``lm_head.weight`` although ``named_parameters()`` lists it only as ``model.embed_tokens.weight``; the
gradient is then that of the shared matrix (input-embedding and output-projection uses together).
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import re
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from bitnet.data.errors import DataError
from bitnet.data.packing import FORMAT, META_FILE, TOKENS_FILE, PackedDataset, _open_cached
from bitnet.io import atomic_dir, sha256_file, sha256_json, write_json_atomic

__all__ = [
    "PROJ_BLOCK_ROWS",
    "InfluenceConfig",
    "RandomProjector",
    "SelectionResult",
    "gradient_features",
    "influence_scores",
    "per_example_gradients",
    "resolve_params",
    "select_influential",
    "select_top",
    "write_subset",
]

PROJ_BLOCK_ROWS = 1024
"""Rows of the projection matrix generated per random block (part of the projection's definition)."""

LAST_BLOCK = "{last_block}"
INDICES_FILE = "indices.npy"
_GLOB_CHARS = re.compile(r"[*?\[]")


class InfluenceConfig(BaseModel):
    """Which gradients, how they are projected, and how much of the candidate set is kept."""

    model_config = ConfigDict(extra="forbid")

    params: list[str] = Field(
        default_factory=lambda: ["*norm.weight"],
        min_length=1,
        description="parameter name patterns (dot-bounded substrings or fnmatch globs; {last_block} expands); "
        "default: every norm gain vector (all layers, hidden-size each: cheap at any scale)",
    )
    proj_dim: int | None = Field(
        default=1024, ge=1, description="random projection size; None keeps the raw flattened gradient"
    )
    projection: Literal["rademacher", "gaussian"] = "rademacher"
    seed: int = Field(default=0, ge=0)
    keep_fraction: float = Field(default=0.05, gt=0.0, le=1.0)
    batch_size: int = Field(default=16, ge=1, description="examples per vmap call")
    normalize: bool = Field(default=True, description="L2-normalise each projected gradient (LESS)")
    reduce: Literal["mean", "max"] = "mean"
    center: bool = Field(
        default=True,
        description="subtract the mean candidate feature before the cosine (removes the gradient direction "
        "shared by every example; plain LESS = False)",
    )
    projection_cache_mb: float = Field(default=256, ge=0, description="projection blocks kept between batches")
    method: Literal["auto", "vmap", "loop"] = Field(
        default="auto", description="per-example gradients: torch.func vmap, a plain loop, or vmap with loop fallback"
    )


@dataclass(frozen=True)
class SelectionResult:
    """Kept candidate indices (best first), the scores of all candidates and run statistics."""

    indices: torch.Tensor
    scores: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# parameters


def _last_block(model: nn.Module) -> str:
    """Qualified name of the last entry of the model's largest ``ModuleList`` (its decoder layers)."""
    best: tuple[int, str, int] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, name, len(mod))
    if best is None:
        raise DataError(f"{LAST_BLOCK}: {type(model).__name__} has no ModuleList of blocks")
    _, name, n = best
    return f"{name}.{n - 1}" if name else str(n - 1)


def _matches(name: str, pattern: str) -> bool:
    if _GLOB_CHARS.search(pattern):
        return fnmatch.fnmatchcase(name, pattern)
    return re.search(rf"(?:^|\.){re.escape(pattern)}(?:\.|$)", name) is not None


def resolve_params(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Parameter]:
    """Parameters whose name (tied aliases included) matches any pattern, keyed by canonical name.

    The canonical name is the one ``model.named_parameters()`` reports (first alias of a shared tensor),
    in model order. Raises :class:`DataError` if a pattern matches nothing.
    """
    if not patterns:
        raise DataError("no parameter patterns given")
    expanded = [p.replace(LAST_BLOCK, _last_block(model)) if LAST_BLOCK in p else p for p in patterns]
    selected: dict[int, nn.Parameter] = {}
    unmatched = []
    for pattern, shown in zip(expanded, patterns):
        hit = False
        for name, p in model.named_parameters(remove_duplicate=False):
            if _matches(name, pattern):
                hit = True
                selected[id(p)] = p
        if not hit:
            unmatched.append(shown if shown == pattern else f"{shown} (= {pattern})")
    if unmatched:
        some = ", ".join(n for n, _ in list(model.named_parameters(remove_duplicate=False))[:6])
        bad = ", ".join(map(repr, unmatched))
        raise DataError(f"parameter pattern(s) {bad} match no parameter (names look like: {some}, ...)")
    return {n: p for n, p in model.named_parameters() if id(p) in selected}


# --------------------------------------------------------------------------------------------------
# per-example gradients


def _logits(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one ``[1, T, V]`` logits row against ``ids[T]``."""
    return F.cross_entropy(logits[0, :-1].float(), ids[1:])


def _make_loss(model: nn.Module, frozen: dict[str, torch.Tensor]):
    def loss(selected: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, ({**frozen, **selected},), (ids.unsqueeze(0),), {"use_cache": False})
        return _lm_loss(_logits(out), ids)

    return loss


def _grads_vmap(model: nn.Module, params: dict[str, nn.Parameter], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    sel = {n: p.detach() for n, p in params.items()}
    fn = torch.func.vmap(torch.func.grad(_make_loss(model, frozen)), in_dims=(None, 0))
    with warnings.catch_warnings():
        # SDPA has no vmap batching rule on CPU: functorch falls back to a per-example loop for that op only.
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        return fn(sel, batch)


def _grads_loop(model: nn.Module, params: dict[str, nn.Parameter], batch: torch.Tensor) -> dict[str, torch.Tensor]:
    names, tensors = list(params), list(params.values())
    rows: list[tuple[torch.Tensor, ...]] = []
    for ids in batch:
        with torch.enable_grad():
            out = model(ids.unsqueeze(0), use_cache=False)
            rows.append(torch.autograd.grad(_lm_loss(_logits(out), ids), tensors, allow_unused=True))
    res = {}
    for j, (n, p) in enumerate(zip(names, tensors)):
        res[n] = torch.stack([r[j] if r[j] is not None else torch.zeros_like(p) for r in rows])
    return res


class _TrainingOff:
    """Every module in eval mode (and, for the loop, ``requires_grad`` on exactly the selected
    parameters); the previous per-module modes and flags come back on exit."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], set_requires_grad: bool) -> None:
        self.model, self.params, self.set_req = model, params, set_requires_grad

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.req = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        if self.set_req:
            sel = {id(p) for p in self.params.values()}
            for p in self.model.parameters():
                p.requires_grad_(id(p) in sel)

    def __exit__(self, *exc: object) -> None:
        for p, r in self.req:
            p.requires_grad_(r)
        for m, t in self.modes:
            m.training = t


def per_example_gradients(
    model: nn.Module,
    batch: torch.Tensor,
    params: dict[str, nn.Parameter],
    method: Literal["vmap", "loop"] = "vmap",
) -> dict[str, torch.Tensor]:
    """``{name: Tensor[B, *param.shape]}``: gradient of each row's mean next-token CE (eval mode).

    ``batch`` is a ``LongTensor[B, T]`` (T ≥ 2). Never touches ``.grad``; restores train mode and
    ``requires_grad`` flags.
    """
    if batch.ndim != 2 or batch.shape[1] < 2:
        raise DataError(f"expected a [batch, seq_len>=2] tensor of token ids, got shape {tuple(batch.shape)}")
    batch = batch.to(next(iter(params.values())).device, torch.long)
    with _TrainingOff(model, params, set_requires_grad=method == "loop"):
        return (_grads_vmap if method == "vmap" else _grads_loop)(model, params, batch)


# --------------------------------------------------------------------------------------------------
# random projection


class RandomProjector:
    """Fixed-seed random projection of named, flattened gradients to ``proj_dim`` dimensions.

    Entry ``(r, j)`` of parameter ``name``'s block ``r // PROJ_BLOCK_ROWS`` is drawn from a generator seeded
    by ``sha256(seed, name, block)``: deterministic for a given seed, device type and parameter name,
    independent of batch size, of the other selected parameters and of the cache. Blocks are cached up to
    ``cache_mb`` MiB and regenerated on demand beyond that. Scaled by 1/√k so inner products are preserved
    in expectation.
    """

    def __init__(
        self,
        proj_dim: int,
        seed: int = 0,
        kind: Literal["rademacher", "gaussian"] = "rademacher",
        cache_mb: float = 256,
    ) -> None:
        if proj_dim < 1:
            raise DataError(f"proj_dim must be >= 1, got {proj_dim}")
        self.proj_dim, self.seed, self.kind = proj_dim, seed, kind
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: dict[tuple[str, int, str], torch.Tensor] = {}
        self._cached_bytes = 0

    def _block_seed(self, name: str, block: int) -> int:
        h = hashlib.sha256(f"{self.kind}/{self.seed}/{self.proj_dim}/{name}/{block}".encode()).digest()
        return int.from_bytes(h[:8], "little") & (2**63 - 1)

    def block(self, name: str, block: int, rows: int, device: torch.device) -> torch.Tensor:
        """Rows ``block*PROJ_BLOCK_ROWS ...`` (``rows`` of them) of ``name``'s projection matrix, float32."""
        key = (name, block, str(device))
        if (hit := self._cache.get(key)) is not None and hit.shape[0] == rows:
            return hit
        gen = torch.Generator(device=device)
        gen.manual_seed(self._block_seed(name, block))
        k = self.proj_dim
        if self.kind == "rademacher":
            # 8 signs per random byte: about twice as fast as drawing each sign on its own
            byte = torch.randint(0, 256, (rows, (k + 7) // 8), generator=gen, device=device, dtype=torch.uint8)
            bits = (byte.unsqueeze(-1) >> torch.arange(8, device=device, dtype=torch.uint8)) & 1
            m = bits.reshape(rows, -1)[:, :k].to(torch.float32)
            m.mul_(2.0 / math.sqrt(k)).sub_(1.0 / math.sqrt(k))
        else:
            m = torch.randn((rows, k), generator=gen, device=device, dtype=torch.float32).div_(math.sqrt(k))
        if self._cached_bytes + m.numel() * 4 <= self.cache_bytes:
            self._cache[key] = m
            self._cached_bytes += m.numel() * 4
        return m

    def project(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """``Tensor[B, proj_dim]`` (float32) from ``{name: Tensor[B, ...]}``."""
        out: torch.Tensor | None = None
        for name, g in grads.items():
            flat = g.reshape(g.shape[0], -1).float()
            if out is None:
                out = torch.zeros(flat.shape[0], self.proj_dim, device=flat.device)
            for b, start in enumerate(range(0, flat.shape[1], PROJ_BLOCK_ROWS)):
                chunk = flat[:, start : start + PROJ_BLOCK_ROWS]
                out.addmm_(chunk, self.block(name, b, chunk.shape[1], flat.device))
        if out is None:
            raise DataError("nothing to project: no gradients")
        return out


# --------------------------------------------------------------------------------------------------
# features


def _index_array(indices: Any, n: int | None) -> np.ndarray:
    """``indices`` (sequence, range, array or tensor; ``None`` = all ``n``) as a flat int64 array."""
    if indices is None:
        return np.arange(n or 0, dtype=np.int64)
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    return np.asarray(indices, dtype=np.int64).reshape(-1)


def _projector(cfg: InfluenceConfig) -> RandomProjector | None:
    if cfg.proj_dim is None:
        return None
    return RandomProjector(cfg.proj_dim, cfg.seed, cfg.projection, cfg.projection_cache_mb)


def _iter_examples(examples: Any, indices: Sequence[int] | np.ndarray | torch.Tensor | None) -> Iterator[torch.Tensor]:
    if isinstance(examples, PackedDataset):
        n = examples.num_blocks
        idx = _index_array(indices, n)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise DataError(f"block index out of range for {n} blocks in {examples.path}")
        for i in idx:
            yield examples[int(i)]
        return
    if indices is not None:
        raise DataError("indices are only accepted together with a PackedDataset")
    if isinstance(examples, torch.Tensor):
        if examples.ndim == 1:
            examples = examples.unsqueeze(0)
        if examples.ndim != 2:
            raise DataError(f"expected token ids of shape [n, seq_len], got {tuple(examples.shape)}")
        yield from examples
        return
    for x in examples:
        x = torch.as_tensor(x)
        if x.ndim != 1:
            raise DataError(f"each example must be a 1-D tensor of token ids, got shape {tuple(x.shape)}")
        yield x


def _batches(examples: Iterator[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Consecutive examples of equal length, at most ``size`` per batch."""
    buf: list[torch.Tensor] = []
    for x in examples:
        if x.shape[0] < 2:
            raise DataError(f"an example needs at least 2 tokens for a next-token loss, got {x.shape[0]}")
        if buf and (len(buf) == size or buf[0].shape[0] != x.shape[0]):
            yield torch.stack(buf)
            buf = []
        buf.append(x.long())
    if buf:
        yield torch.stack(buf)


def _features(
    model: nn.Module,
    examples: Any,
    cfg: InfluenceConfig,
    indices: Any = None,
    projector: RandomProjector | None = None,
    params: dict[str, nn.Parameter] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    params = resolve_params(model, cfg.params) if params is None else params
    if projector is None:
        projector = _projector(cfg)
    method = cfg.method
    rows: list[torch.Tensor] = []
    t0, n = time.perf_counter(), 0
    for batch in _batches(_iter_examples(examples, indices), cfg.batch_size):
        if method == "auto":
            try:
                grads = per_example_gradients(model, batch, params, "vmap")
                method = "vmap"
            except Exception as e:  # noqa: BLE001 - any functorch incompatibility: fall back to the loop
                why = (str(e).splitlines() or [""])[0][:200]
                warnings.warn(f"vmap per-example gradients failed ({type(e).__name__}: {why}); "
                              "using a per-example loop",
                              RuntimeWarning, stacklevel=3)
                method = "loop"
                grads = per_example_gradients(model, batch, params, "loop")
        else:
            grads = per_example_gradients(model, batch, params, method)
        if projector is not None:
            f = projector.project(grads)
        else:
            f = torch.cat([g.reshape(g.shape[0], -1).float() for g in grads.values()], dim=1)
        del grads
        if cfg.normalize:
            f = F.normalize(f, dim=1)
        rows.append(f.cpu())
        n += f.shape[0]
    if not rows:
        raise DataError("no examples to compute gradient features for")
    dt = time.perf_counter() - t0
    info = {"method": method, "n": n, "seconds": dt, "examples_per_s": n / dt if dt > 0 else float("inf")}
    return torch.cat(rows), info


def gradient_features(
    model: nn.Module,
    examples: PackedDataset | torch.Tensor | Iterable[torch.Tensor],
    cfg: InfluenceConfig,
    *,
    indices: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    projector: RandomProjector | None = None,
) -> torch.Tensor:
    """``Tensor[n, proj_dim]`` (float32, CPU): projected, optionally normalised per-example LM-loss gradients.

    ``examples``: a :class:`PackedDataset` (all blocks, or ``indices``), a ``LongTensor[n, T]`` or an
    iterable of 1-D ``LongTensor`` (consecutive equal-length examples are batched). With
    ``cfg.proj_dim=None`` the rows are the raw flattened gradients (parameters in model order).
    """
    return _features(model, examples, cfg, indices, projector)[0]


# --------------------------------------------------------------------------------------------------
# scoring and selection


def influence_scores(
    candidate_feats: torch.Tensor,
    target_feats: torch.Tensor,
    reduce: Literal["mean", "max"] = "mean",
    *,
    groups: Sequence[int] | torch.Tensor | None = None,
    center: bool | torch.Tensor = True,
) -> torch.Tensor:
    """``Tensor[n]``: cosine similarity of each candidate's gradient feature to the targets'.

    Features are first L2-normalised. ``center=True`` subtracts the mean of the normalised candidate
    features from candidates and targets alike (a tensor: that mean precomputed, e.g. over a pool scored in
    shards); ``False`` is plain LESS. ``mean``: cosine to the mean of the (normalised, centred) target
    features — without centring this ranks exactly like LESS's mean cosine over targets. ``max``: max
    cosine over single targets. With ``groups`` (one group id per target, e.g. a sub-task) each group is
    first reduced to its mean, then ``reduce`` runs over groups (``max`` = LESS's max over sub-tasks).
    """
    if candidate_feats.ndim != 2 or target_feats.ndim != 2:
        raise DataError("features must be 2-D [n, dim] tensors")
    if target_feats.shape[0] == 0:
        raise DataError("empty target set: no target features to score against")
    if candidate_feats.shape[0] == 0:
        raise DataError("empty candidate set: no candidate features to score")
    if candidate_feats.shape[1] != target_feats.shape[1]:
        raise DataError(f"feature sizes differ: candidates {candidate_feats.shape[1]}, targets {target_feats.shape[1]}")
    if reduce not in ("mean", "max"):
        raise DataError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    c = F.normalize(candidate_feats.float(), dim=1)
    t = F.normalize(target_feats.float(), dim=1)
    if isinstance(center, torch.Tensor):
        if center.shape != (c.shape[1],):
            raise DataError(f"center must have shape ({c.shape[1]},), got {tuple(center.shape)}")
        c, t = c - center.to(c), t - center.to(c)
    elif center:
        mu = c.mean(0)
        c, t = c - mu, t - mu
    if groups is not None:
        g = torch.as_tensor(groups).reshape(-1)
        if g.numel() != t.shape[0]:
            raise DataError(f"groups has {g.numel()} entries for {t.shape[0]} targets")
        t = torch.stack([t[g == v].mean(0) for v in torch.unique(g)])
    elif reduce == "mean":
        t = t.mean(0, keepdim=True)
    sims = F.normalize(c, dim=1) @ F.normalize(t, dim=1).T
    return sims.mean(1) if reduce == "mean" else sims.max(1).values


def select_top(scores: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Indices of the ``ceil(keep_fraction * n)`` best scores, by descending score, ties by lower index."""
    if not (isinstance(keep_fraction, (int, float)) and 0.0 < keep_fraction <= 1.0):
        raise DataError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    scores = torch.as_tensor(scores)
    if scores.ndim != 1 or scores.numel() == 0:
        raise DataError(f"scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise DataError(f"{int(torch.isnan(scores).sum())} score(s) are NaN")
    n = scores.numel()
    k = min(n, max(1, math.ceil(keep_fraction * n - 1e-9)))
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return order[:k].long()


def _check_sets(candidates: PackedDataset, targets: PackedDataset, cfg: InfluenceConfig,
                candidate_indices: Sequence[int] | np.ndarray | torch.Tensor | None,
                target_indices: Sequence[int] | np.ndarray | torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """The candidate and target block indices, or a one-line refusal of a selection that cannot run."""
    if not 0.0 < cfg.keep_fraction <= 1.0:
        raise DataError(f"keep_fraction must be in (0, 1], got {cfg.keep_fraction}")
    cand_idx = _index_array(candidate_indices, len(candidates))
    targ_idx = _index_array(target_indices, len(targets))
    if targ_idx.size == 0:
        raise DataError("empty target set: nothing to select towards")
    if cand_idx.size == 0:
        raise DataError("empty candidate set: nothing to select from")
    if candidates.vocab_size != targets.vocab_size:
        raise DataError(
            f"candidates and targets use different vocabularies ({candidates.vocab_size} vs {targets.vocab_size})"
        )
    return cand_idx, targ_idx


def select_influential(
    model: nn.Module,
    candidates: PackedDataset,
    targets: PackedDataset,
    cfg: InfluenceConfig,
    *,
    candidate_indices: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    target_indices: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    target_groups: Sequence[int] | torch.Tensor | None = None,
) -> SelectionResult:
    """Score candidate blocks by gradient similarity to the target blocks; keep the top ``keep_fraction``.

    ``indices`` of the result are candidate block indices (into ``candidates``, not into
    ``candidate_indices``), best first; ``scores`` covers every scored candidate in input order.
    """
    cand_idx, targ_idx = _check_sets(candidates, targets, cfg, candidate_indices, target_indices)
    params = resolve_params(model, cfg.params)
    projector = _projector(cfg)
    t0 = time.perf_counter()
    tf, t_info = _features(model, targets, cfg, targ_idx, projector, params)
    cf, c_info = _features(model, candidates, cfg, cand_idx, projector, params)
    if c_info["method"] != t_info["method"]:
        c_info["method"] = f"{t_info['method']}+{c_info['method']}"
    scores = influence_scores(cf, tf, cfg.reduce, groups=target_groups, center=cfg.center)
    order = select_top(scores, cfg.keep_fraction)
    kept = torch.from_numpy(cand_idx)[order]
    stats = {
        "n_candidates": int(cand_idx.size),
        "n_targets": int(targ_idx.size),
        "n_kept": int(kept.numel()),
        "keep_fraction": cfg.keep_fraction,
        "params": list(params),
        "grad_dim": int(sum(p.numel() for p in params.values())),
        "proj_dim": cfg.proj_dim,
        "projection": cfg.projection,
        "seed": cfg.seed,
        "reduce": cfg.reduce,
        "center": cfg.center,
        "method": c_info["method"],
        "examples_per_s": c_info["examples_per_s"],
        "score_mean": float(scores.mean()),
        "score_kept_mean": float(scores[order].mean()),
        "score_threshold": float(scores[order[-1]]),
        "seconds_targets": t_info["seconds"],
        "seconds_candidates": c_info["seconds"],
        "seconds": time.perf_counter() - t0,
        "candidates_digest": candidates.digest,
        "targets_digest": targets.digest,
    }
    return SelectionResult(indices=kept, scores=scores, stats=stats)


# --------------------------------------------------------------------------------------------------
# writing a selection


def _check_selection(idx: np.ndarray, n: int, path: Path) -> None:
    """A non-empty selection of distinct blocks inside ``[0, n)``; one-line :class:`DataError` otherwise."""
    if idx.size == 0:
        raise DataError("empty selection: no blocks to write")
    if idx.min() < 0 or idx.max() >= n:
        raise DataError(f"selected block index out of range [0, {n}) for {path}")
    if np.unique(idx).size != idx.size:
        raise DataError("selection contains duplicate block indices")


def _copy_blocks(blocks: np.ndarray, idx: np.ndarray, path: Path, dtype: np.dtype, eos: int) -> int:
    """Blocks ``idx`` of ``blocks`` (n, seq_len) written in order to the ``.npy`` at ``path``, streamed through a
    memory map so that a large selection never sits in memory as a whole; returns the EOS tokens kept."""
    seq_len = blocks.shape[1]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(idx.size * seq_len,))
    step, n_docs = max(1, (1 << 22) // seq_len), 0
    for s in range(0, idx.size, step):
        chunk = np.asarray(blocks[idx[s : s + step]], dtype=dtype)
        out[s * seq_len : s * seq_len + chunk.size] = chunk.reshape(-1)
        n_docs += int(np.count_nonzero(chunk == eos))
    out.flush()
    del out
    return n_docs


def write_subset(
    dataset: PackedDataset,
    indices: Sequence[int] | np.ndarray | torch.Tensor,
    out_dir: str | Path,
    *,
    info: dict[str, Any] | None = None,
) -> PackedDataset:
    """Write blocks ``indices`` of ``dataset`` (in that order) as a new packed dataset at ``out_dir``.

    Same ``tokens.npy`` + ``meta.json`` format as :func:`~bitnet.data.packing.build_packed_dataset` (same
    seq_len, dtype, vocabulary, EOS and tokenizer digest; ``n_docs`` counts the EOS tokens kept), plus
    ``indices.npy`` (the source block of each block) and ``meta["subset"]`` (source digest, ``info``; no path: the
    files depend on the source's contents only, wherever it lives).
    Atomic; an existing output with the same key (source digest + indices + info) is reused.
    """
    out_dir = Path(out_dir)
    idx = _index_array(indices, None)
    n = dataset.num_blocks
    _check_selection(idx, n, dataset.path)
    m = dataset.meta
    indices_digest = hashlib.sha256(idx.tobytes()).hexdigest()
    key = sha256_json({"format": FORMAT, "subset_of": dataset.digest, "indices": indices_digest, "info": info})
    if (cached := _open_cached(out_dir, key)) is not None:
        return cached
    seq_len, dtype, eos = dataset.seq_len, np.dtype(m["dtype"]), m["eos_token_id"]
    blocks = dataset.tokens[: n * seq_len].reshape(n, seq_len)
    with atomic_dir(out_dir, marker=META_FILE) as tmp:
        n_docs = _copy_blocks(blocks, idx, tmp / TOKENS_FILE, dtype, eos)
        np.save(tmp / INDICES_FILE, idx, allow_pickle=False)
        tokens_sha = sha256_file(tmp / TOKENS_FILE)
        meta = {
            "format": FORMAT,
            "seq_len": seq_len,
            "n_tokens": int(idx.size * seq_len),
            "n_docs": n_docs,
            "n_blocks": int(idx.size),
            "dtype": str(dtype),
            "vocab_size": m["vocab_size"],
            "eos_token_id": eos,
            "tokenizer_digest": m["tokenizer_digest"],
            "key": key,
            "key_extra": m.get("key_extra"),
            "tokens_sha256": tokens_sha,
            "digest": sha256_json({"tokens_sha256": tokens_sha, "seq_len": seq_len}),
            "subset": {
                "source_digest": dataset.digest,
                "source_blocks": n,
                "indices_sha256": sha256_file(tmp / INDICES_FILE),
                "info": info,
            },
        }
        write_json_atomic(tmp / META_FILE, meta)
    return PackedDataset(out_dir)
