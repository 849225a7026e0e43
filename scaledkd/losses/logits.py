"""Prediction-layer losses: the hard-label task loss and logit KD (Hinton et al., 2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import DistillLoss, LossBatch, LossSetup, ModelOutputs, register_loss


@register_loss("task")
class TaskLoss(DistillLoss):
    """Hard-label loss: cross-entropy for classification, MSE for regression (``num_labels == 1``).

    Shapes: logits ``[B, C]`` (``[B, 1]`` for regression), labels ``[B]``.
    The ``(1 - alpha) * CE + alpha * KD`` mix (docs/methods.md#vanilla-kd) is two terms with weights ``1 - alpha`` and
    ``alpha``, so each is logged on its own.
    """

    needs = frozenset({"labels", "logits"})
    tasks = frozenset({"classification", "regression"})

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        if batch.labels is None:
            raise ValueError("loss 'task' needs labels, but the batch has none (unlabeled data?)")
        logits = student.logits.float()
        if self.setup.task == "regression":
            return F.mse_loss(logits.squeeze(-1), batch.labels.float())
        return F.cross_entropy(logits, batch.labels.long())


@register_loss("logit_kd")
class LogitKD(DistillLoss):
    """Logit KD: ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, batch mean; MSE(z_s, z_t) for regression.

    Hinton et al., "Distilling the Knowledge in a Neural Network" (2015). A softmax-KL over one logit is
    identically 0, so regression students (STS-B) match the teacher's score with MSE instead.

    Shapes: logits ``[B, C]``.
    """

    needs = frozenset({"teacher", "logits"})
    tasks = frozenset({"classification", "regression"})

    def __init__(self, setup: LossSetup, temperature: float = 2.0) -> None:
        super().__init__(setup)
        if temperature <= 0:
            raise ValueError(f"loss 'logit_kd': temperature={temperature!r} must be > 0")
        self.temperature = temperature

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        s, t = student.logits.float(), teacher.logits.float()
        if s.shape != t.shape:
            raise ValueError(f"loss 'logit_kd': student logits {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        if self.setup.task == "regression":
            return F.mse_loss(s, t)
        T = self.temperature
        log_ps = F.log_softmax(s / T, dim=-1)
        log_pt = F.log_softmax(t / T, dim=-1)
        return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * T * T
