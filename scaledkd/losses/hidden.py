"""Hidden-state transfer: MSE (TinyBERT), cosine (DistilBERT) and [CLS] (Patient KD) between mapped layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..mappings import resolve_mapping
from ..taps import Tap
from .base import DistillLoss, LossBatch, LossSetup, ModelOutputs, make_projection, masked_mean, register_loss


class _HiddenPairs(DistillLoss):
    """Shared machinery: resolve (student, teacher) layer pairs, one width projection per pair."""

    needs = frozenset({"teacher", "hidden"})
    default_mapping = "uniform"

    def __init__(self, setup: LossSetup, projection: str = "auto", masked: bool = True) -> None:
        super().__init__(setup)
        s_cfg, t_cfg = setup.student_config, setup.teacher_config
        self.pairs = resolve_mapping(
            setup.mapping, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers,
            with_embeddings=True, default=self.default_mapping, where=f"losses[{setup.name}].mapping",
        )
        self.masked = masked
        where = f"loss {setup.name!r}"
        self.proj = nn.ModuleList(
            make_projection(s_cfg.hidden_size, t_cfg.hidden_size, projection, where) for _ in self.pairs
        )

    def taps(self) -> tuple[set[Tap], set[Tap]]:
        return {Tap("hidden", s) for s, _ in self.pairs}, {Tap("hidden", t) for _, t in self.pairs}

    def _mask(self, batch: LossBatch, like: torch.Tensor) -> torch.Tensor:
        # The unmasked variant reproduces reference code that averaged over padding too.
        return batch.attention_mask if self.masked else torch.ones(like.shape[:2], device=like.device)

    def pair_states(self, student: ModelOutputs, teacher: ModelOutputs):
        for proj, (s, t) in zip(self.proj, self.pairs):
            h_s = student.captures.hidden[s]  # [B, L, D_s]
            h_t = teacher.captures.hidden[t]  # [B, L, D_t]
            yield proj(h_s).float(), h_t.float()


@register_loss("hidden_mse")
class HiddenMSE(_HiddenPairs):
    """``sum over pairs of masked_mean((W h_s - h_t)^2)`` (TinyBERT, Jiao et al. 2020). Default mapping uniform
    with 0 <-> 0. Shapes: ``h_s [B, L, D_s]``, ``h_t [B, L, D_t]``, ``W: D_s -> D_t``."""

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        total = 0.0
        for h_s, h_t in self.pair_states(student, teacher):
            total = total + masked_mean((h_s - h_t).pow(2), self._mask(batch, h_s))
        return total


@register_loss("hidden_cos")
class HiddenCosine(_HiddenPairs):
    """``sum over pairs of masked_mean(1 - cos(W h_s, h_t))`` per token (DistilBERT, Sanh et al. 2019).
    Shapes: ``h_s [B, L, D_s]``, ``h_t [B, L, D_t]``."""

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        total = 0.0
        for h_s, h_t in self.pair_states(student, teacher):
            cos = F.cosine_similarity(h_s, h_t, dim=-1, eps=1e-8)  # [B, L]
            total = total + masked_mean(1.0 - cos, self._mask(batch, h_s))
        return total


@register_loss("pkd_cls")
class PatientCLS(_HiddenPairs):
    """Patient KD (Sun et al. 2019): ``sum over pairs of MSE(normalize(W h_s[:, 0]), normalize(h_t[:, 0]))``.
    Default mapping uniform over blocks (no embeddings). Shapes: ``[B, D]`` per pair."""

    def __init__(self, setup: LossSetup, projection: str = "auto") -> None:
        super().__init__(setup, projection=projection)
        self.pairs = [p for p in self.pairs if p != (0, 0)] or self.pairs
        self.proj = self.proj[: len(self.pairs)]

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        total = 0.0
        for h_s, h_t in self.pair_states(student, teacher):
            total = total + F.mse_loss(F.normalize(h_s[:, 0], dim=-1), F.normalize(h_t[:, 0], dim=-1))
        return total
