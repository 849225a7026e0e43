"""The two sides of a distillation step.

:class:`DistillModule` is what the student's DeepSpeed engine wraps: the student, the losses (with their
trainable projections, registered here before the engine is built so they are optimised and sharded with the
student) and the student's taps. Its ``forward`` runs the student and every loss inside the engine's forward,
so ZeRO-3 gathers projection weights like any other student parameter.

:class:`TeacherRunner` runs the frozen teacher (plain, or its own ZeRO-3 inference engine) under ``no_grad``
and returns detached captures. A teacher-output cache replaces it with anything that returns the same
:class:`~scaledkd.losses.ModelOutputs` for a batch.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..losses import DistillLoss, LossBatch, ModelOutputs
from ..taps import Tap, TapManager

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def loss_batch(batch: Mapping[str, torch.Tensor]) -> LossBatch:
    return LossBatch(attention_mask=batch["attention_mask"], labels=batch.get("labels"),
                     loss_mask=batch.get("loss_mask"))


def _logits(out) -> torch.Tensor | None:
    return getattr(out, "logits", None)


class DistillModule(nn.Module):
    """Student + losses + weights; ``forward(batch, teacher_outputs) -> (total, {term: value})``.

    Args:
        student: the student model (exported alone; ``losses`` hold distillation-only modules).
        losses: name -> built loss.
        weights: name -> weight in the total.
    """

    def __init__(self, student: nn.Module, losses: dict[str, DistillLoss], weights: dict[str, float]) -> None:
        super().__init__()
        self.student = student
        self.losses = nn.ModuleDict(losses)
        self.weights = dict(weights)
        taps: set[Tap] = set()
        for loss in losses.values():
            taps |= loss.taps()[0]
        self.taps = TapManager(student, taps, detach=False)

    def teacher_taps(self) -> set[Tap]:
        taps: set[Tap] = set()
        for loss in self.losses.values():
            taps |= loss.taps()[1]
        return taps

    def forward(self, batch: Mapping[str, torch.Tensor], teacher: ModelOutputs | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.taps.capture() as captures:
            out = self.student(**model_inputs(batch))
        self.taps.check_complete(captures)
        student = ModelOutputs(logits=_logits(out), captures=captures)
        lb = loss_batch(batch)
        terms = {name: loss(student, teacher, lb) for name, loss in self.losses.items()}
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, terms


class TeacherRunner:
    """Frozen teacher forward with detached captures.

    Args:
        model: the teacher, or its DeepSpeed inference engine (ZeRO-3); captures resolve on the unwrapped model.
        taps: what the losses read from the teacher.
    """

    def __init__(self, model: nn.Module, taps: set[Tap]) -> None:
        self.model = model
        self.taps = TapManager(model, taps, detach=True)

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, torch.Tensor]) -> ModelOutputs:
        with self.taps.capture() as captures:
            out = self.model(**model_inputs(batch))
        self.taps.check_complete(captures)
        logits = _logits(out)
        return ModelOutputs(logits=None if logits is None else logits.detach(), captures=captures)
