"""Deterministic, resumable, rank-sharded batch iteration over a :class:`PackedDataset`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from bitnet.data.errors import DataError
from bitnet.data.packing import PackedDataset

_SEED_STRIDE = 1_000_003


class BlockLoader:
    """Infinite iterator of ``{"input_ids": LongTensor[B, T]}`` over epochs.

    Epoch ``e`` orders blocks by ``torch.randperm`` seeded with ``seed * 1_000_003 + e`` (identity without
    shuffle) and cuts that order into global batches; rank ``r`` takes global batches ``r, r + W, ...``.
    All ranks get ``epoch_batches`` batches per epoch; leftover blocks are dropped and the epoch advances.
    """

    def __init__(
        self,
        dataset: PackedDataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or seed < 0:
            raise DataError(
                f"invalid loader settings: batch_size={batch_size} seed={seed} rank={rank} world_size={world_size}"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.n_blocks = len(dataset)
        self._epoch_batches = self.n_blocks // (batch_size * world_size)
        if self._epoch_batches == 0:
            raise DataError(
                f"dataset has {self.n_blocks} blocks, fewer than batch_size*world_size="
                f"{batch_size * world_size} needed for one batch per rank"
            )
        self.epoch = 0
        self.position = 0
        self._order: torch.Tensor | None = None
        self._order_epoch = -1

    @property
    def epoch_batches(self) -> int:
        """Batches per epoch for this rank (the same for every rank)."""
        return self._epoch_batches

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.dataset.seq_len

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The global block order of ``epoch``."""
        if not self.shuffle:
            return torch.arange(self.n_blocks)
        g = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + epoch)
        return torch.randperm(self.n_blocks, generator=g)

    def batch_indices(self, epoch: int, position: int) -> torch.Tensor:
        """Block indices of this rank's batch ``position`` in ``epoch``."""
        if self._order_epoch != epoch or self._order is None:
            self._order, self._order_epoch = self.epoch_order(epoch), epoch
        start = (position * self.world_size + self.rank) * self.batch_size
        return self._order[start : start + self.batch_size]

    def __iter__(self) -> BlockLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.position >= self._epoch_batches:
            self.epoch += 1
            self.position = 0
        idx = self.batch_indices(self.epoch, self.position)
        self.position += 1
        return {"input_ids": self.dataset.get_batch(idx.numpy())}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: the next batch is ``position`` of ``epoch`` (rolling over when complete)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "n_blocks": self.n_blocks,
            "dataset_digest": self.dataset.digest,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken; the settings that define the order must match."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"malformed loader state (need epoch and position): {state!r}") from e
        current = self.state_dict()
        for k in ("seed", "batch_size", "world_size", "shuffle", "n_blocks", "dataset_digest"):
            if k in state and state[k] != current[k]:
                raise DataError(f"loader state mismatch for {k}: saved {state[k]!r}, loader has {current[k]!r}")
        if epoch < 0 or not 0 <= position <= self._epoch_batches:
            raise DataError(f"loader state out of range: epoch={epoch} position={position}")
        self.epoch, self.position = epoch, position


def iter_eval_batches(
    dataset: PackedDataset, batch_size: int, max_batches: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """All blocks in order, unshuffled, in batches of ``batch_size`` (the last one may be smaller)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    n = len(dataset)
    n_batches = -(-n // batch_size)
    limit = n_batches if max_batches is None else max(0, min(max_batches, n_batches))
    return (
        {"input_ids": dataset.get_batch(range(b * batch_size, min((b + 1) * batch_size, n)))} for b in range(limit)
    )
