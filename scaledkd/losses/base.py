"""The one loss signature, the loss registry and the masked reductions every loss uses.

Every loss is a :class:`DistillLoss`: built from a :class:`LossSetup` plus its own keyword parameters, it
declares the taps it needs on each model (``taps()``) and its capabilities (``needs``), and maps
``(student outputs, teacher outputs, batch)`` to a scalar masked mean. Only the engine weights, sums,
rescales across accumulation and reduces across ranks. A loss never knows about DeepSpeed.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..registry import Registry
from ..taps import Captures, Tap
from .head import OutputHead

Needs = frozenset[str]  # subset of {"teacher", "labels", "logits", "hidden", "qkv"}


@dataclass
class ModelOutputs:
    """What a forward gives the losses: final logits (None for bare encoders) and tap captures.

    A causal LM whose logit readers all declare ``logits_from_head`` skips its output head: ``logits`` is None and
    ``hidden_final`` with ``head`` stand for ``logits = head.module(hidden_final)`` (:mod:`scaledkd.losses.head`).
    """

    logits: torch.Tensor | None  # [B, C] classification/regression, [B, L, V] causal LM
    captures: Captures = field(default_factory=Captures)
    hidden_final: torch.Tensor | None = None  # [B, L, D] causal LM: the final norm's output, when logits were skipped
    head: OutputHead | None = None  # the output layer to apply to hidden_final


@dataclass
class LossBatch:
    """The parts of a batch a loss may read.

    Attributes:
        attention_mask: ``[B, L]`` 1 for real tokens (the union mask under mixup).
        labels: ``[B]`` class ids / ``[B]`` float targets / ``[B, L]`` next-token ids (-100 ignored); or None.
        loss_mask: ``[B, L]`` tokens that count for token-level losses (response-only SFT); None = attention_mask.
    """

    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None

    @property
    def token_mask(self) -> torch.Tensor:
        return self.loss_mask if self.loss_mask is not None else self.attention_mask


@dataclass(frozen=True)
class LossSetup:
    """What a loss may know when it is built: the two model configs, its resolved layer pairs and the task.

    Attributes:
        student_config, teacher_config: Hugging Face configs (teacher None when training without a teacher).
        mapping: the loss's raw mapping spec from the config (resolved by the loss, which knows whether
            layer 0 is allowed).
        task: ``classification``, ``regression``, ``agnostic`` or ``causal_lm``.
        name: the registry key, for error messages.
    """

    student_config: Any
    teacher_config: Any | None
    mapping: Any
    task: str
    name: str
    causal: bool = False


Artifacts = dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]  # file name -> (tensors, metadata)


class DistillLoss(nn.Module):
    """Base class: subclasses set ``needs`` and implement ``taps`` and ``forward``.

    Optional capabilities are declared here with their defaults, so the engine reads them and never probes a loss
    for attributes:

    - ``pairs``: the resolved ``(student, teacher)`` layer pairs of a layer-wise loss (recorded in the export's
      provenance); None for losses without a layer mapping.
    - ``ema_decay``: a loss comparing against clean inputs (``needs`` has ``clean``) may ask for an EMA copy of the
      student with this decay instead of the student itself.
    - ``artifacts()`` / ``load_artifacts()``: files the loss leaves in the run folder when the run finishes (TED's
      learned filters), and reading such files of an earlier stage before training.
    - trainable modules: the loss's own parameters (projections, filters, heads) train with the student; a loss
      without parameters has none (:attr:`trainable`).
    - ``logits_from_head``: a loss with ``logits`` in ``needs`` that can equally read ``ModelOutputs.hidden_final``
      and ``head`` (a causal LM's final hidden states and output layer) instead of full logits. When every loss
      reading a model's logits says so, the engine skips that model's head (decided once, at setup).
    - ``teacher_top_k``: a loss reading the teacher's logits that compares only the teacher's ``k`` largest per
      token (``lm_kd``'s ``top_k``); a teacher-output cache of a causal LM stores that many per token. None: it
      reads the whole distribution.
    """

    needs: ClassVar[Needs] = frozenset()
    tasks: ClassVar[frozenset[str] | None] = None  # None = any task
    pairs: list[tuple[int, int]] | None = None
    ema_decay: float | None = None
    teacher_top_k: int | None = None
    logits_from_head: bool = False

    def __init__(self, setup: LossSetup) -> None:
        super().__init__()
        self.setup = setup
        if "teacher" in self.needs and setup.teacher_config is None:
            raise ValueError(f"loss {setup.name!r} needs a teacher, but the config has teacher: null")
        if self.tasks is not None and setup.task not in self.tasks:
            raise ValueError(
                f"loss {setup.name!r} does not apply to task kind {setup.task!r}; it supports {sorted(self.tasks)}"
            )

    def taps(self) -> tuple[set[Tap], set[Tap]]:
        """(student taps, teacher taps) this loss reads."""
        return set(), set()

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        raise NotImplementedError

    @property
    def trainable(self) -> bool:
        """Whether the loss has parameters of its own that train (projections, filters, heads)."""
        return any(p.requires_grad for p in self.parameters())

    def artifacts(self) -> Artifacts:
        """Files to write into the run folder when the run finishes: ``{file name: (tensors, metadata)}``."""
        return {}

    def load_artifacts(self) -> None:
        """Read what an earlier stage's run left (its :meth:`artifacts`) before this run trains; nothing by default."""


LOSSES: Registry[type[DistillLoss]] = Registry("loss")
register_loss = LOSSES.register


def build_loss(name: str, setup: LossSetup, params: dict[str, Any]) -> DistillLoss:
    """Instantiate a registered loss, failing on unknown parameters with the accepted ones listed."""
    cls = LOSSES.get(name)
    sig = inspect.signature(cls.__init__)
    accepted = [p for p in sig.parameters if p not in ("self", "setup")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"loss {name!r} has no parameter {unknown[0]!r}; its parameters: {accepted}")
    return cls(setup, **params)


# ------------------------------------------------------------------------------------------ reductions


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set, and over all trailing dims.

    Args:
        values: ``[B, L, ...]``.
        mask: ``[B, L]`` (bool or 0/1).
    """
    mask = mask.to(values.dtype)
    while mask.dim() < values.dim():
        mask = mask.unsqueeze(-1)
    per_position = values.numel() // max(1, values.shape[0] * values.shape[1])
    denom = mask.sum() * per_position
    return (values * mask).sum() / denom.clamp_min(1.0)


def widths(config) -> int:
    return int(config.hidden_size)


def make_projection(d_student: int, d_teacher: int, kind: str, where: str) -> nn.Module:
    """A trainable ``Linear(D_s, D_t)`` (``linear``), ``Identity`` (``identity``), or either by width (``auto``)."""
    if kind not in ("auto", "linear", "identity"):
        raise ValueError(f"{where}: projection={kind!r} is not valid; choose one of ['auto', 'linear', 'identity']")
    if kind == "identity" or (kind == "auto" and d_student == d_teacher):
        if d_student != d_teacher:
            raise ValueError(
                f"{where}: projection='identity' needs equal widths, got student {d_student} and teacher {d_teacher}"
            )
        return nn.Identity()
    return nn.Linear(d_student, d_teacher)
