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

import contextlib
import copy
from collections.abc import Mapping

import torch
from torch import nn

from ..inputs import loss_batch, model_inputs
from ..losses import DistillLoss, ModelOutputs
from ..mixup import CLEAN_MASK, LAMBDA, PROGRESS, STEP, EmbeddingMixup, MixedOutputs
from ..taps import Captures, Tap, TapManager

def _logits(out) -> torch.Tensor | None:
    return getattr(out, "logits", None)


class DistillModule(nn.Module):
    """Student + losses + weights; ``forward(batch, teacher_outputs) -> (total, {term: value})``.

    With ``mixup``, a prepared batch (:meth:`EmbeddingMixup.prepare`) runs the student on mixed embeddings; when a
    loss needs ``clean`` captures (CR-ILD's consistency term), a no-grad forward on the clean inputs runs first,
    through the student itself (under ZeRO-3 just another forward inside the engine's) or through an EMA copy of
    it when a loss asks for one (``ema_decay``; the copy lives here, so checkpoints keep it and exports drop it).

    Args:
        student: the student model (exported alone; ``losses`` hold distillation-only modules).
        losses: name -> built loss.
        weights: name -> weight in the total.
        mixup: CR-ILD's embedding mixup, hooked on the student here (and on the teacher by :class:`TeacherRunner`).
    """

    def __init__(self, student: nn.Module, losses: dict[str, DistillLoss], weights: dict[str, float],
                 mixup: EmbeddingMixup | None = None) -> None:
        super().__init__()
        clean = [loss for loss in losses.values() if "clean" in loss.needs]
        if clean and mixup is None:
            raise ValueError(f"loss {type(clean[0]).__name__} compares mixed and clean inputs; set train.mixup: true")
        decays = {loss.ema_decay for loss in clean if loss.ema_decay is not None}
        if len(decays) > 1:
            raise ValueError(f"losses ask for EMA students with different decays {sorted(decays)}; use one")
        self.ema_decay = decays.pop() if decays else None
        if self.ema_decay is not None and any(hasattr(p, "ds_id") for p in student.parameters()):
            raise ValueError("an EMA student needs full student weights; it is not supported under ZeRO-3 "
                             "(use the clean student forward: drop ema_decay)")
        # Copied before any hook is registered on the student, so the copy carries none.
        self.ema = copy.deepcopy(student).requires_grad_(False) if self.ema_decay is not None else None
        self.student = student
        self.losses = nn.ModuleDict(losses)
        self.weights = dict(weights)
        self.mixup = mixup
        self.wants_clean = bool(clean)
        self._ema_step = -1
        taps: set[Tap] = set()
        for loss in losses.values():
            taps |= loss.taps()[0]
        self.taps = TapManager(student, taps, detach=False)
        self.ema_taps = TapManager(self.ema, taps, detach=True) if self.ema is not None else None
        if mixup is not None:
            mixup.attach(student)

    @torch.no_grad()
    def _clean_forward(self, batch: Mapping[str, torch.Tensor]) -> Captures:
        """Captures of the student (or its EMA) on the clean inputs: no mixing, each row's own mask."""
        inputs = {**model_inputs(batch), "attention_mask": batch[CLEAN_MASK]}
        model, taps = self.student, self.taps
        if self.ema is not None:
            self._update_ema(int(batch[STEP]))
            model, taps = self.ema, self.ema_taps
        with taps.capture() as captures:
            model(**inputs)
        taps.check_complete(captures)
        return captures

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        """Once per optimiser step: ``ema = d * ema + (1 - d) * student`` over parameters (buffers copied)."""
        if step <= self._ema_step:
            return
        self._ema_step = step
        if step == 0:
            return  # the copy already equals the initial student
        d = self.ema_decay
        for e, s in zip(self.ema.parameters(), self.student.parameters(), strict=True):
            e.mul_(d).add_(s.detach().to(e.dtype), alpha=1.0 - d)
        for e, s in zip(self.ema.buffers(), self.student.buffers(), strict=True):
            e.copy_(s)

    def teacher_taps(self) -> set[Tap]:
        taps: set[Tap] = set()
        for loss in self.losses.values():
            taps |= loss.taps()[1]
        return taps

    def forward(self, batch: Mapping[str, torch.Tensor], teacher: ModelOutputs | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mixed = self.mixup is not None and LAMBDA in batch
        clean = self._clean_forward(batch) if mixed and self.wants_clean else None
        with self.taps.capture() as captures, (self.mixup.applied(batch) if mixed else contextlib.nullcontext()):
            out = self.student(**model_inputs(batch))
        self.taps.check_complete(captures)
        if mixed:
            student = MixedOutputs(logits=_logits(out), captures=captures, lam=float(batch[LAMBDA]),
                                   progress=float(batch[PROGRESS]), clean=clean, clean_mask=batch[CLEAN_MASK])
        else:
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
        mixup: the student's :class:`EmbeddingMixup`: the teacher sees the same mixed inputs.
    """

    def __init__(self, model: nn.Module, taps: set[Tap], mixup: EmbeddingMixup | None = None) -> None:
        self.model = model
        self.taps = TapManager(model, taps, detach=True)
        self.mixup = mixup
        if mixup is not None:
            mixup.attach(model)

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, torch.Tensor]) -> ModelOutputs:
        mixing = self.mixup.applied(batch) if self.mixup is not None else contextlib.nullcontext()
        with self.taps.capture() as captures, mixing:
            out = self.model(**model_inputs(batch))
        self.taps.check_complete(captures)
        logits = _logits(out)
        return ModelOutputs(logits=None if logits is None else logits.detach(), captures=captures)
