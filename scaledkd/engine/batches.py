"""Seeded, rank-sharded training micro-batches that a resumed run continues exactly where it stopped.

Both kinds answer ``batches(epoch, skip)`` for the loop, whose position is its micro-batch count. A map-style
dataset's position follows from that count alone (:class:`ShardedBatches`); a stream's does not (a packed row
reads as many documents as it needs), so :class:`StreamBatches` also keeps each rank's place in the stream, which
the checkpoint records per rank (``state_dict``/``load_state_dict``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..config import ConfigError
from ..inputs import EXAMPLE_IDS, Batch, to_device
from . import dist
from .budget import micro_batches_per_epoch


class ShardedBatches:
    """Seeded, rank-sharded micro-batches; the same (seed, epoch, position) always gives the same batch.

    Every rank gets the same number of micro-batches (the remainder of an epoch is dropped) so collectives
    stay in step; resuming skips the micro-batches already consumed. Each batch carries its rows' indices in
    the dataset (``example_ids [B]``), by which a teacher cache finds their stored outputs.

    ``rows``: the dataset indices to train on (the rest held out for early stopping,
    :func:`~scaledkd.engine.budget.holdout_split`); None trains on every row.
    """

    def __init__(self, dataset, batch_size: int, seed: int, collate: Callable[[list[dict[str, Any]]], Batch],
                 rows: list[int] | None = None) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.collate = collate
        self.rows = torch.tensor(rows, dtype=torch.long) if rows is not None else None
        n = len(rows) if rows is not None else len(dataset)
        self.per_epoch = micro_batches_per_epoch(n, batch_size, dist.world_size())

    def state_dict(self) -> None:
        """No position beyond the loop's micro-batch count."""
        return

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Nothing to restore (``skip`` does it)."""

    def __call__(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if self.rows is None:
            order = torch.randperm(len(self.dataset), generator=generator)
        else:
            order = self.rows[torch.randperm(len(self.rows), generator=generator)]
        mine = order[dist.rank():: dist.world_size()]
        for i in range(skip, self.per_epoch):
            idx = mine[i * self.batch_size:(i + 1) * self.batch_size].tolist()
            batch = self.collate([self.dataset[j] for j in idx])
            batch[EXAMPLE_IDS] = torch.tensor(idx, dtype=torch.long)
            yield to_device(batch, dist.device())


class StreamBatches:
    """Micro-batches of a streamed corpus (``data.streaming``): each rank reads its own share of the stream
    (:meth:`StreamRows.shard <scaledkd.data.stream.StreamRows.shard>`) and every rank yields a batch at every
    micro-step, since the stream is read again when it ends.

    The whole run is one "epoch" of ``micro_batches`` to the loop; a resumed run continues each rank's stream
    from the position its checkpoint recorded, not from the start.
    """

    def __init__(self, rows, batch_size: int, collate: Callable[[list[dict[str, Any]]], Batch],
                 micro_batches: int) -> None:
        self.rows = rows.shard(dist.rank(), dist.world_size())
        self.batch_size = batch_size
        self.collate = collate
        self.per_epoch = micro_batches
        self.taken = 0  # micro-batches yielded so far (restored on resume)

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: micro-batches taken and the stream's place (JSON-serialisable)."""
        return {"micro": self.taken, "stream": self.rows.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's :meth:`state_dict` of this rank.

        Raises:
            ConfigError: the checkpoint holds no stream position for this rank (written by fewer ranks, or by a
                run that did not stream).
        """
        if state is None or "stream" not in state:
            raise ConfigError(f"data.streaming: the checkpoint has no stream position for rank {dist.rank()} (it was "
                              "written by a run with fewer ranks, or without data.streaming); resume with the "
                              "same number of ranks and data settings")
        self.taken = state["micro"]
        self.rows.load_state_dict(state["stream"])

    def __call__(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        if skip != self.taken:
            raise ConfigError(f"data.streaming: the run continues after micro-batch {skip} but the stream's recorded "
                              f"position is after micro-batch {self.taken}; resume from the checkpoint that "
                              "recorded it")
        rows = iter(self.rows)
        while True:
            batch = [next(rows) for _ in range(self.batch_size)]
            self.taken += 1
            yield to_device(self.collate(batch), dist.device())
