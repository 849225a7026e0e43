"""Early stopping on a held-out slice of the training rows (``train.early_stopping``; docs/configuration.md#budget).

The held-out rows are chosen once by :func:`~scaledkd.engine.budget.holdout_split` and never trained on; the dev
set is never looked at. Every ``train.eval_every`` steps the student is scored on them, and training stops once
``patience`` evaluations in a row did not beat the best score so far, but never before ``train.min_steps``.

Ranks: every rank scores the holdout (under ZeRO-3 each forward is a collective), then rank 0's decision and
record are broadcast, so every rank stops at the same step and checkpoints the same state. Resume: the record
(best score and step, evaluations without improvement, whether it stopped) lives in the loop state that every
checkpoint saves, so a resumed run counts on where it left off.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..config import (
    EARLY_STOPPING_EXTRA_METRICS,
    Config,
    ConfigError,
    EarlyStoppingConfig,
)
from ..data import TaskSpec
from ..evaluation import predict
from ..inputs import eval_batches
from ..metrics import compute_metrics
from . import dist

log = logging.getLogger("scaledkd")

STATE_KEY = "early_stopping"  # its record in the loop state (saved in every checkpoint)


def check_early_stopping(cfg: Config, spec: TaskSpec, task: str) -> None:
    """What ``train.early_stopping`` needs of the rest of the config: labelled training rows of a task that has the
    named metric.

    Raises:
        ConfigError: naming the value and the valid choices.
    """
    es = cfg.train.early_stopping
    if es is None:
        return
    if task not in ("classification", "regression"):
        raise ConfigError(f"train.early_stopping scores held-out labelled training rows, but data.task="
                          f"{cfg.data.task!r} has no labels to score; use it with a classification or regression task "
                          "(sst2, rte, stsb, ..., or csv/jsonl with a label_column), or set train.early_stopping=null")
    if cfg.data.supplementary is not None:
        raise ConfigError("train.early_stopping scores held-out labelled training rows, but data.supplementary makes "
                          "the training rows unlabeled; use early stopping in a stage without supplementary data")
    valid = [*EARLY_STOPPING_EXTRA_METRICS, *spec.metrics]
    if es.metric not in valid:
        raise ConfigError(f"train.early_stopping.metric={es.metric!r} is not a metric of data.task={cfg.data.task!r}; "
                          f"choose one of {valid}")


@torch.no_grad()
def holdout_scores(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], task: str, metric_name: str
                   ) -> dict[str, float]:
    """The task's metrics (as the dev evaluation computes them, ``score`` included) and ``loss``, the task loss
    against the gold labels (cross-entropy, or MSE for regression), over ``batches``.

    Shapes: logits ``[B, C]`` (``[B, 1]`` for regression), labels ``[B]``.
    """
    preds, refs, loss = predict(model, batches, task)  # the dev evaluation's own predictions
    return {**compute_metrics(metric_name, preds, refs), "loss": loss}


def initial_state() -> dict[str, Any]:
    """The record before the first evaluation."""
    return {"best": None, "best_step": None, "bad_evals": 0, "stopped": False}


class EarlyStopping:
    """Scores the holdout and keeps the record that decides when to stop.

    Args:
        config: ``train.early_stopping``.
        holdout: the held-out rows (tokenised like the training rows).
        batch_size, collate: how they are batched.
        task: ``classification`` or ``regression``; metric_name: the metric set (the task's name).
        floor: no stop before this optimiser step (``train.min_steps``, capped at the run's steps).
    """

    def __init__(self, config: EarlyStoppingConfig, holdout, batch_size: int,
                 collate: Callable[[list[dict[str, Any]]], Any], task: str, metric_name: str, floor: int = 0) -> None:
        self.config = config
        self.holdout = holdout
        self.batch_size = batch_size
        self.collate = collate
        self.task = task
        self.metric_name = metric_name
        self.floor = floor

    def better(self, value: float, best: float | None) -> bool:
        """Strictly better than ``best`` (lower for ``loss``, higher for every other metric)."""
        if best is None:
            return True
        return value < best if self.config.metric == "loss" else value > best

    def update(self, record: dict[str, Any], step: int, scores: Mapping[str, float]) -> dict[str, Any]:
        """The record after an evaluation at ``step`` with ``scores`` (a new dict; ``record`` is left as it was)."""
        record = {**initial_state(), **record}
        value = float(scores[self.config.metric])
        if self.better(value, record["best"]):
            record.update(best=value, best_step=step, bad_evals=0)
        else:
            record["bad_evals"] += 1
        record["stopped"] = record["bad_evals"] >= self.config.patience and step >= self.floor
        return record

    def scores(self, model: nn.Module) -> dict[str, float]:
        """``model``'s scores on the holdout (every rank runs it: ZeRO-3 forwards are collectives)."""
        batches = eval_batches(self.holdout, self.batch_size, self.collate, dist.device())
        return holdout_scores(model, batches, self.task, self.metric_name)

    def check(self, model: nn.Module, step: int, state: dict[str, Any], write: Callable[[dict[str, Any]], None]
              ) -> bool:
        """Score the holdout at ``step``, update ``state[STATE_KEY]`` with rank 0's record on every rank, log it
        (``{"event": "holdout", ...}`` and, when it stops, ``{"event": "early_stop", ...}``); True to stop."""
        scores = self.scores(model)
        record = dist.broadcast_object(self.update(state.get(STATE_KEY) or initial_state(), step, scores))
        state[STATE_KEY] = record
        write({"event": "holdout", "step": step, **scores, "best_step": record["best_step"],
               "bad_evals": record["bad_evals"]})
        if record["stopped"]:
            metric = self.config.metric
            log.info("early stopping at step %d: holdout %s has not improved on %.4f (step %d) for %d evaluations",
                     step, metric, record["best"], record["best_step"], record["bad_evals"])
            write({"event": "early_stop", "step": step, "metric": metric, "best": record["best"],
                   "best_step": record["best_step"], "bad_evals": record["bad_evals"]})
        return bool(record["stopped"])
