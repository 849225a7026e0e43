"""Seeded, rank-sharded training micro-batches that a resumed run continues exactly where it stopped."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..config import ConfigError
from ..inputs import Batch, to_device
from . import dist


class ShardedBatches:
    """Seeded, rank-sharded micro-batches; the same (seed, epoch, position) always gives the same batch.

    Every rank gets the same number of micro-batches (the remainder of an epoch is dropped) so collectives
    stay in step; resuming skips the micro-batches already consumed.
    """

    def __init__(self, dataset, batch_size: int, seed: int, collate: Callable[[list[dict[str, Any]]], Batch]) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.collate = collate
        self.per_epoch = len(dataset) // (batch_size * dist.world_size())
        if self.per_epoch == 0:
            raise ConfigError(
                f"the training set has {len(dataset)} examples, fewer than one global batch "
                f"({batch_size} x {dist.world_size()} ranks); lower train.batch_size"
            )

    def __call__(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
        mine = order[dist.rank():: dist.world_size()]
        for i in range(skip, self.per_epoch):
            idx = mine[i * self.batch_size:(i + 1) * self.batch_size].tolist()
            yield to_device(self.collate([self.dataset[j] for j in idx]), dist.device())
