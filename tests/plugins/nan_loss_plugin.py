"""A user plugin (named in a recipe's ``plugins``) registering a loss that turns NaN after N calls."""
from __future__ import annotations

import torch

from scaledkd.losses import DistillLoss, LossSetup, register_loss


@register_loss("nan_after")
class NanAfter(DistillLoss):
    """0 for the first ``calls`` forwards, then NaN: drives the non-finite-loss stop in tests."""

    needs = frozenset({"logits"})

    def __init__(self, setup: LossSetup, calls: int = 2) -> None:
        super().__init__(setup)
        self.calls = calls
        self.seen = 0

    def forward(self, student, teacher, batch):
        self.seen += 1
        zero = student.logits.sum() * 0.0
        return zero if self.seen <= self.calls else zero + torch.nan
