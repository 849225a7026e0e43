"""How long a run trains: the optimiser steps its budget keys give on its training rows, and which rows those are.

One function, :func:`plan_budget`, turns ``train.max_steps`` / ``train.epochs`` / ``train.min_steps`` and the number
of training rows into the run's step count; the engine's learning-rate schedule and loop, ``scaledkd validate`` and
the budget tests all read it, so what a recipe promises and what it runs cannot drift apart.

Rule (docs/configuration.md#budget): ``max_steps`` when set; else the steps ``epochs`` gives, raised to ``min_steps``
when they are fewer. A recipe sized in epochs for a large task (1 epoch of 20k SST-2 sentences = 625 steps) gives
about 80 steps on RTE; the floor keeps the number of updates, not the number of passes, from collapsing.

With ``train.early_stopping`` a seeded share of the training rows is held out (:func:`holdout_split`); the budget
counts only the rows that are trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import ConfigError, TrainConfig
from ..data.loading import derived_seed

HOLDOUT_PURPOSE = "early_stopping_holdout"  # derives the holdout's seed from train.seed


@dataclass(frozen=True)
class Budget:
    """The optimiser steps of a run and where the number came from.

    Attributes:
        steps: optimiser steps the run trains (the learning-rate schedule's length).
        rule: ``max_steps`` (set explicitly), ``epochs`` (``train.epochs`` on these rows) or ``min_steps`` (the
            floor raised it).
        epoch_steps: the steps ``train.epochs`` alone gives (None for a stream, whose length is unknown).
        steps_per_epoch: optimiser steps in one pass over the trained rows (None for a stream).
        train_rows: rows trained on (after the early-stopping holdout); None for a stream.
        holdout_rows: rows held out for early stopping (0 without it).
    """

    steps: int
    rule: Literal["max_steps", "epochs", "min_steps"]
    epoch_steps: int | None
    steps_per_epoch: float | None
    train_rows: int | None
    holdout_rows: int = 0

    @property
    def epochs(self) -> float | None:
        """Passes over the trained rows that ``steps`` amounts to."""
        return self.steps / self.steps_per_epoch if self.steps_per_epoch else None

    def describe(self) -> str:
        """One line for the log: the step count and, when the floor raised it, both numbers."""
        rows = f"{self.train_rows:,} training rows" if self.train_rows is not None else "rows not counted yet"
        if self.holdout_rows:
            rows += f" ({self.holdout_rows:,} more held out for early stopping)"
        if self.rule == "min_steps":
            return (f"train.min_steps={self.steps}: train.epochs gives {self.epoch_steps} optimiser steps on {rows}, "
                    f"fewer than the floor; training {self.steps} steps ({self.epochs:.1f} epochs)")
        if self.rule == "max_steps":
            return f"train.max_steps={self.steps}: training {self.steps} optimiser steps on {rows}"
        return f"train.epochs: {self.steps} optimiser steps on {rows} ({self.epochs:.1f} epochs)"

    def as_dict(self) -> dict[str, int | float | str | None]:
        """JSON-ready fields (``metrics.json``, ``scaledkd validate``)."""
        return {"steps": self.steps, "rule": self.rule, "epoch_steps": self.epoch_steps, "epochs": self.epochs,
                "train_rows": self.train_rows, "holdout_rows": self.holdout_rows}


def micro_batches_per_epoch(rows: int, batch_size: int, world_size: int) -> int:
    """Micro-batches each rank takes in one pass over ``rows`` (the last partial global batch is dropped, so every
    rank takes the same number and collectives stay in step).

    Raises:
        ConfigError: fewer rows than one global batch.
    """
    per_epoch = rows // (batch_size * world_size)
    if per_epoch == 0:
        fits = rows // world_size  # the largest per-rank batch these rows fill once
        fix = f"lower train.batch_size to at most {fits}" if fits else "train on more examples or on fewer ranks"
        raise ConfigError(f"the training set has {rows} examples, fewer than one global batch of "
                          f"{batch_size * world_size} (train.batch_size={batch_size} x {world_size} ranks); {fix}")
    return per_epoch


def holdout_size(rows: int, train: TrainConfig) -> int:
    """Rows ``train.early_stopping`` holds out of ``rows`` (at least one; 0 without early stopping)."""
    if train.early_stopping is None:
        return 0
    return max(1, round(rows * train.early_stopping.holdout))


def holdout_split(rows: int, train: TrainConfig) -> tuple[list[int], list[int]]:
    """The training rows' indices split into (trained, held out), both sorted.

    The same ``rows``, share and ``train.seed`` always give the same split, on every rank and on resume: the
    held-out rows are drawn by a generator of their own (seeded from ``train.seed`` for this purpose alone), not
    torch's global one.
    """
    k = holdout_size(rows, train)
    generator = torch.Generator().manual_seed(derived_seed(train.seed, HOLDOUT_PURPOSE))
    order = torch.randperm(rows, generator=generator).tolist()
    return sorted(order[k:]), sorted(order[:k])


def plan_budget(train: TrainConfig, rows: int | None, world_size: int) -> Budget:
    """The run's optimiser steps on ``rows`` training rows (before the early-stopping holdout) across
    ``world_size`` ranks; ``rows=None`` for a stream (``train.max_steps`` is then required).

    Raises:
        ConfigError: a stream without ``train.max_steps``, or fewer trained rows than one global batch.
    """
    if rows is None:
        if not train.max_steps:
            raise ConfigError("data.streaming=true reads a stream whose length is unknown, so train.epochs cannot be "
                              "counted; set train.max_steps")
        return Budget(steps=train.max_steps, rule="max_steps", epoch_steps=None, steps_per_epoch=None,
                      train_rows=None)
    held = holdout_size(rows, train)
    trained = rows - held
    if held and trained < train.batch_size * world_size:
        raise ConfigError(f"train.early_stopping.holdout={train.early_stopping.holdout} holds out {held} of {rows} "
                          f"training rows; the {trained} left are fewer than one global batch ({train.batch_size} x "
                          f"{world_size} ranks); lower the holdout or train.batch_size")
    per_epoch = micro_batches_per_epoch(trained, train.batch_size, world_size)
    epoch_steps = max(1, int(train.epochs * per_epoch / train.grad_accum))
    if train.max_steps:
        steps, rule = train.max_steps, "max_steps"
    elif train.min_steps and epoch_steps < train.min_steps:
        steps, rule = train.min_steps, "min_steps"
    else:
        steps, rule = epoch_steps, "epochs"
    return Budget(steps=steps, rule=rule, epoch_steps=epoch_steps, steps_per_epoch=per_epoch / train.grad_accum,
                  train_rows=trained, holdout_rows=held)

