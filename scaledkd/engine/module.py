"""The two sides of a distillation step.

:class:`DistillModule` is what the student's DeepSpeed engine wraps: the student, the losses (with their
trainable projections, registered here before the engine is built so they are optimised and sharded with the
student) and the student's taps. Its ``forward`` runs the student and every loss inside the engine's forward,
so ZeRO-3 gathers projection weights like any other student parameter.

:class:`TeacherRunner` runs the frozen teacher (plain, or its own ZeRO-3 inference engine) under ``no_grad``
and returns detached captures. A teacher-output cache replaces it with anything that returns the same
:class:`~scaledkd.losses.ModelOutputs` for a batch.

Causal LMs whose logit readers all take the head form (``DistillLoss.logits_from_head``) run without their output
head: the forward stops after the final norm and the losses apply the head chunk by chunk
(:mod:`scaledkd.losses.head`). Both sides decide this once, when they are built.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Mapping

import torch
from torch import nn

from .. import arch
from ..inputs import loss_batch, model_inputs
from ..losses import DistillLoss, ModelOutputs
from ..losses.head import HEAD_ARCHS, FusedHead, OutputHead, output_head
from ..mixup import CLEAN_MASK, LAMBDA, PROGRESS, STEP, EmbeddingMixup, MixedOutputs
from ..taps import Captures, Tap, TapManager

log = logging.getLogger(__name__)

def _logits(out) -> torch.Tensor | None:
    return getattr(out, "logits", None)


def _head_form(model: nn.Module, readers: list[DistillLoss]) -> OutputHead | None:
    """The model's head, to be skipped, when every loss reading its logits takes the head form and the model's
    logits are exactly ``lm_head(final hidden states)``; else None (the model runs in full)."""
    if not all(loss.logits_from_head for loss in readers):
        return None
    head = output_head(arch.unwrap(model))
    if head is None:
        if readers and getattr(arch.unwrap(model).config, "model_type", None) is not None:
            log.info("%s: logits come from the full head (the head-chunked path supports %s)",
                     arch.unwrap(model).config.model_type, ", ".join(sorted(HEAD_ARCHS)))
        return None
    params = list(head.parameters())

    def gathered():
        # Partitioned (ZeRO-3) weights are gathered once for a whole no-grad chunk loop, on every rank alike.
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    return OutputHead(head, gathered, FusedHead(head))


def _final_hidden(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[B, L, D]`` final (post-norm) hidden states of a causal LM, its head applied to no position.

    The model's own forward runs (so a DeepSpeed engine's forward hooks all fire as usual) with
    ``logits_to_keep`` an empty index: the head sees ``[B, 0, D]``. The base model's output is read by a hook.
    """
    base = arch.unwrap(model).base_model
    seen: list[torch.Tensor] = []
    handle = base.register_forward_hook(lambda _m, _a, out: seen.append(out[0]))
    try:
        model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device))
    finally:
        handle.remove()
    return seen[-1]


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
        self.head = _head_form(student, [loss for loss in losses.values() if "logits" in loss.needs])
        # A submodule, so that the student's engine hooks it (the head itself stays the student's).
        self.fused_head = self.head.fused if self.head is not None else None
        self._head_registered = False

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

    def teacher_head(self) -> bool:
        """Whether every loss reading the teacher's logits takes them as final hidden states and head (for
        :class:`TeacherRunner`'s ``head``)."""
        return all(loss.logits_from_head for loss in self.losses.values() if {"teacher", "logits"} <= loss.needs)

    def _register_head(self) -> None:
        """Under ZeRO-3 (parameters carry ``ds_id`` once the engine wraps this module), tell DeepSpeed that
        :class:`FusedHead`'s forward and backward use the head's weights (see its docstring)."""
        self._head_registered = True
        params = list(self.head.module.parameters())
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            for p in params:
                deepspeed.zero.register_external_parameter(self.fused_head, p)

    def forward(self, batch: Mapping[str, torch.Tensor], teacher: ModelOutputs | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.head is not None and not self._head_registered:
            self._register_head()
        mixed = self.mixup is not None and LAMBDA in batch
        clean = self._clean_forward(batch) if mixed and self.wants_clean else None
        with self.taps.capture() as captures, (self.mixup.applied(batch) if mixed else contextlib.nullcontext()):
            if self.head is None:
                logits, hidden = _logits(self.student(**model_inputs(batch))), None
            else:
                logits, hidden = None, _final_hidden(self.student, model_inputs(batch))
        self.taps.check_complete(captures)
        if mixed:
            student = MixedOutputs(logits=logits, captures=captures, hidden_final=hidden, head=self.head,
                                   lam=float(batch[LAMBDA]), progress=float(batch[PROGRESS]), clean=clean,
                                   clean_mask=batch[CLEAN_MASK])
        else:
            student = ModelOutputs(logits=logits, captures=captures, hidden_final=hidden, head=self.head)
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
        head: the losses take the teacher's logits as final hidden states and head
            (:meth:`DistillModule.teacher_head`); a causal LM that supports it then runs without its head.
    """

    def __init__(self, model: nn.Module, taps: set[Tap], mixup: EmbeddingMixup | None = None,
                 head: bool = False) -> None:
        self.model = model
        self.taps = TapManager(model, taps, detach=True)
        self.mixup = mixup
        if mixup is not None:
            mixup.attach(model)
        self.head = _head_form(model, []) if head else None

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, torch.Tensor]) -> ModelOutputs:
        mixing = self.mixup.applied(batch) if self.mixup is not None else contextlib.nullcontext()
        with self.taps.capture() as captures, mixing:
            if self.head is not None:
                hidden = _final_hidden(self.model, model_inputs(batch)).detach()
                outputs = ModelOutputs(logits=None, captures=captures, hidden_final=hidden, head=self.head)
            else:
                logits = _logits(self.model(**model_inputs(batch)))
                outputs = ModelOutputs(logits=None if logits is None else logits.detach(), captures=captures)
        self.taps.check_complete(captures)
        return outputs
