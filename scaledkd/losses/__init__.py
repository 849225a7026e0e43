"""Loss registry. Built-in losses register here, on import of the package; plugins are named in the config."""
from __future__ import annotations

from . import attention, hidden, lm, logits  # noqa: F401  (registration)
from . import crild, ted  # noqa: F401  (registration: CR-ILD, TED)
from .base import LOSSES, DistillLoss, LossBatch, LossSetup, ModelOutputs, build_loss, masked_mean, register_loss

__all__ = [
    "LOSSES", "DistillLoss", "LossBatch", "LossSetup", "ModelOutputs", "build_loss", "masked_mean", "register_loss",
]
