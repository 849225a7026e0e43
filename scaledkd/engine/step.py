"""The step every launcher shares: one micro-batch through teacher, student and losses, then backward and the
(boundary) optimiser step."""
from __future__ import annotations

import math

import torch

from ..errors import NonFiniteLoss
from . import dist
from .module import TeacherRunner


def distill_step(engine, teacher: TeacherRunner | None, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """One micro-batch: teacher forward, student forward + losses, backward, (boundary) optimiser step.

    Loss terms are averaged across ranks before anything else so every rank agrees on a non-finite value and
    stops together, before the bad gradient reaches the weights. Returns ``{"loss": total, term: value}``.
    """
    t_out = teacher(batch) if teacher is not None else None
    total, terms = engine(batch, t_out)
    names = ["loss", *terms]
    values = dist.mean_across_ranks(torch.stack([total.detach().float(), *(v.detach().float() for v in terms.values())]))
    if not torch.isfinite(values).all():
        bad = [f"{n}={v}" for n, v in zip(names, values.tolist()) if not math.isfinite(v)]
        raise NonFiniteLoss(
            f"non-finite loss at step {engine.global_steps + 1} (micro-batch {engine.micro_steps + 1}): "
            f"{', '.join(bad)}; nothing was updated with it"
        )
    engine.backward(total)
    engine.step()
    return dict(zip(names, values.tolist()))
