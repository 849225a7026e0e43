"""Embedding-output mixup for CR-ILD (Ko et al. 2023, "Revisiting Intermediate Layer Distillation for Compressing
Language Models: An Overfitting Perspective"; docs/methods.md#mixup).

Teacher and student both see ``e_mix = l * e + (1 - l) * e[rev]``: forward hooks on each model's embedding module
replace its output, with one ``l ~ Beta(a, a)``, ``l = max(l, 1 - l)`` per micro-batch shared by both models, the
reversed batch as partner, and the union of each row's and its partner's attention mask. Hooks read only the
module's output, never its parameters, so they are correct under ZeRO-3.

The loop calls :meth:`EmbeddingMixup.prepare` once per micro-batch: it draws ``l`` from (seed, micro-batch index),
so a resumed run draws the same values, and stores ``l``, the clean mask and the training progress in the batch.
Only forwards run inside :meth:`EmbeddingMixup.applied` are mixed; every other forward (dev evaluation, the clean
forward of the consistency term) sees clean embeddings.
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from . import arch
from .losses.base import ModelOutputs
from .taps import Captures

LAMBDA = "mixup_lambda"
CLEAN_MASK = "clean_attention_mask"
PROGRESS = "train_progress"
STEP = "train_step"


def partner(x: torch.Tensor) -> torch.Tensor:
    """The mixing partner of every row: the batch in reverse order. ``[B, ...] -> [B, ...]``."""
    return x.flip(0)


def union_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions real in a row or in its partner. ``[B, L] -> [B, L]``."""
    return torch.maximum(attention_mask, partner(attention_mask))


@dataclass
class MixedOutputs(ModelOutputs):
    """Student outputs on mixed inputs plus what a consistency term compares them with.

    Attributes:
        lam: the mixing weight ``l`` of this micro-batch (the row's own share).
        progress: training progress for ramps: epoch index / number of epochs.
        clean: captures of a no-grad forward on the clean inputs (student or its EMA), or None when no loss
            asked for it.
        clean_mask: ``[B, L]`` the clean inputs' attention mask (the batch's ``attention_mask`` is the union).
    """

    lam: float = 1.0
    progress: float = 0.0
    clean: Captures | None = None
    clean_mask: torch.Tensor | None = None


class EmbeddingMixup:
    """Draws ``l`` per micro-batch and mixes the embedding outputs of every attached model while armed.

    Args:
        alpha: Beta(alpha, alpha) concentration (1.0 = uniform, the paper's choice).
        seed: with the micro-batch index, determines ``l``.
    """

    def __init__(self, alpha: float = 1.0, seed: int = 0) -> None:
        if alpha <= 0:
            raise ValueError(f"mixup alpha={alpha!r} must be > 0")
        self.alpha = alpha
        self.seed = seed
        self._lam: float | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, model: nn.Module) -> None:
        """Hook ``model``'s embedding module (wrappers are unwrapped)."""
        self._handles.append(arch.embeddings(model).register_forward_hook(self._hook))

    def draw(self, index: int) -> float:
        """``l`` of micro-batch ``index``: ``max(l, 1 - l)`` with ``l ~ Beta(alpha, alpha)``; the same on every rank."""
        digest = hashlib.sha256(f"{self.seed}:mixup:{index}".encode()).digest()
        lam = random.Random(int.from_bytes(digest[:8], "big")).betavariate(self.alpha, self.alpha)
        return max(lam, 1.0 - lam)

    def prepare(self, batch: Mapping[str, torch.Tensor], index: int, step: int, progress: float) -> dict:
        """A copy of ``batch`` set up for one mixed micro-batch.

        Args:
            batch: a collated batch with ``attention_mask [B, L]``.
            index: the micro-batch index in the run (seeds ``l``).
            step: the optimiser step the micro-batch belongs to (EMA updates).
            progress: epoch index / number of epochs (consistency ramp).

        Returns:
            The batch with ``attention_mask`` = union mask, plus ``clean_attention_mask``, ``mixup_lambda``,
            ``train_step`` and ``train_progress``.
        """
        out = dict(batch)
        out[CLEAN_MASK] = batch["attention_mask"]
        out["attention_mask"] = union_mask(batch["attention_mask"])
        out[LAMBDA] = self.draw(index)
        out[STEP] = step
        out[PROGRESS] = progress
        return out

    @contextlib.contextmanager
    def applied(self, batch: Mapping[str, object]) -> Iterator[None]:
        """Mix the embedding outputs of forwards run inside this block (no-op for a batch without ``l``)."""
        lam = batch.get(LAMBDA)
        if lam is None:
            yield
            return
        self._lam = float(lam)
        try:
            yield
        finally:
            self._lam = None

    def _hook(self, _module: nn.Module, _args, output):
        if self._lam is None:
            return None
        lam = self._lam
        if isinstance(output, torch.Tensor):
            return lam * output + (1.0 - lam) * partner(output)
        first = output[0]  # families whose embedding module returns a tuple
        return (lam * first + (1.0 - lam) * partner(first), *output[1:])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
