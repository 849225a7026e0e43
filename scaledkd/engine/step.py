"""The step every launcher shares: one micro-batch through teacher, student and losses, then backward and the
(boundary) optimiser step."""
from __future__ import annotations

import math
import time

import torch

from ..errors import NonFiniteLoss
from . import dist
from .module import TeacherRunner


PHASES = ("teacher", "student", "backward", "optimizer")


class PhaseTimer:
    """Wall milliseconds of each part of a step: ``teacher`` (forward), ``student`` (forward with every loss, and
    the cross-rank agreement on their values), ``backward``, ``optimizer`` (the boundary step, or the accumulation
    bookkeeping between boundaries), summed per logging window (:meth:`take`) and over the run (``run_*``). On
    CUDA each boundary synchronises, so the numbers are the device's; on a CPU they are exact as they are."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(PHASES, 0.0)
        self.tokens = 0
        self.run_sums = dict.fromkeys(PHASES, 0.0)
        self.run_steps = 0
        self.run_tokens = 0
        self.run_seconds = 0.0
        self._cuda = torch.cuda.is_available()
        self._last = 0.0

    def start(self) -> None:
        self._last = self._now()

    def mark(self, phase: str) -> None:
        now = self._now()
        self.sums[phase] += (now - self._last) * 1e3
        self._last = now

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def take(self, steps: int, seconds: float) -> dict[str, float]:
        """Close a window of ``steps`` optimiser steps that took ``seconds``: per-step means (``ms_<phase>``) and
        the tokens counted, added to the run's totals, then reset."""
        out = {f"ms_{phase}": total / max(1, steps) for phase, total in self.sums.items()}
        out["tokens"] = self.tokens
        for phase, total in self.sums.items():
            self.run_sums[phase] += total
        self.run_steps += steps
        self.run_tokens += self.tokens
        self.run_seconds += seconds
        self.sums = dict.fromkeys(PHASES, 0.0)
        self.tokens = 0
        return out

    def run_step_ms(self) -> dict[str, float]:
        """Per-optimiser-step milliseconds of each phase over every window taken so far."""
        return {phase: total / max(1, self.run_steps) for phase, total in self.run_sums.items()}


def distill_step(engine, teacher: TeacherRunner | None, batch: dict[str, torch.Tensor],
                 timer: PhaseTimer | None = None) -> dict[str, float]:
    """One micro-batch: teacher forward, student forward + losses, backward, (boundary) optimiser step.

    Loss terms are averaged across ranks before anything else so every rank agrees on a non-finite value and
    stops together, before the bad gradient reaches the weights. Returns ``{"loss": total, term: value}``; with a
    ``timer``, each part's wall time and the batch's tokens (real tokens, ``[B, L]`` mask sum) are added to it.
    """
    if timer is not None:
        timer.start()
        mask = batch.get("attention_mask")
        timer.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    t_out = teacher(batch) if teacher is not None else None
    if timer is not None:
        timer.mark("teacher")
    total, terms = engine(batch, t_out)
    names = ["loss", *terms]
    values = dist.mean_across_ranks(torch.stack([total.detach().float(), *(v.detach().float() for v in terms.values())]))
    if not torch.isfinite(values).all():
        bad = [f"{n}={v}" for n, v in zip(names, values.tolist()) if not math.isfinite(v)]
        raise NonFiniteLoss(
            f"non-finite loss at step {engine.global_steps + 1} (micro-batch {engine.micro_steps + 1}): "
            f"{', '.join(bad)}; nothing was updated with it"
        )
    if timer is not None:
        timer.mark("student")
    engine.backward(total)
    if timer is not None:
        timer.mark("backward")
    engine.step()
    if timer is not None:
        timer.mark("optimizer")
    return dict(zip(names, values.tolist()))
