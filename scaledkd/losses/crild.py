"""CR-ILD's consistency regularisation (Ko et al. 2023, "Revisiting Intermediate Layer Distillation for
Compressing Language Models: An Overfitting Perspective"; docs/methods.md#cr-ild).

Stage 1 of CR-ILD runs last-layer ILD (``attn_kl`` / ``hidden_mse`` / ``qkv_relation`` with ``mapping: last``) on
mixed embeddings (``train.mixup``, :mod:`scaledkd.mixup`), optionally on supplementary data
(``data.supplementary``), plus this term; stage 2 is prediction-layer KD (``logit_kd``, T = 2).
"""
from __future__ import annotations

import torch

from ..mixup import MixedOutputs, partner
from ..taps import Tap
from .attention import attention_kl, head_qk, qk_taps
from .attention_blocks import DEFAULT_BLOCK_SIZE, Heads, check_block_size
from .base import DistillLoss, LossBatch, LossSetup, ModelOutputs, masked_mean, register_loss

DIVERGENCES = ("attn_kl", "hidden_mse", "both")
RAMPS = ("epoch", "none")


@register_loss("crild_consistency")
class CRILDConsistency(DistillLoss):
    """Pull the student's output on the mixed input toward its own clean outputs of both mixed rows:
    ``ramp * [l * D(x_mix, x_clean) + (1 - l) * D(x_mix, x_clean[rev])]``, with ``x_clean`` from a no-grad forward
    of the student (or of its EMA copy, ``ema_decay``) on the clean inputs, ``rev`` the reversed batch (the mixup
    partner) and ``ramp = epoch / num_epochs``. The paper's ``w_ic = 0.1`` is this loss's ``weight``.

    ``D`` on the student's layer ``layer`` (default: the last block):
    ``attn_kl``: per head and query row ``KL(softmax(A_clean) || softmax(A_mix))``, ``A = QK^T / sqrt(d)``, over the
    clean row's real keys and queries; ``hidden_mse``: ``masked_mean((h_mix - h_clean)^2)`` over the clean row's real
    tokens; ``both``: their sum. Each target row is compared where it is defined (its own mask), while ``x_mix`` was
    computed with the union mask. Shapes: ``A [B, H, L, L]``, ``h [B, L, D]``.

    Args:
        divergence: ``attn_kl``, ``hidden_mse`` or ``both``.
        layer: 1-based student block (default: the last).
        ramp: ``epoch`` (epoch index / number of epochs, the paper's) or ``none`` (always 1).
        ema_decay: compare with an EMA copy of the student (the paper's alternative, e.g. 0.999) instead of the
            student itself.
        block_size: query rows per block of the blocked attention KL (:mod:`.attention_blocks`); None = the plain
            reference on full ``[B, H, L, L]`` maps.
    """

    needs = frozenset({"clean", "hidden", "qkv"})  # narrowed per instance by ``divergence``

    def __init__(self, setup: LossSetup, divergence: str = "both", layer: int | None = None, ramp: str = "epoch",
                 ema_decay: float | None = None, block_size: int | None = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(setup)
        where = f"loss {setup.name!r}"
        if divergence not in DIVERGENCES:
            raise ValueError(f"{where}: divergence={divergence!r} is not valid; choose one of {list(DIVERGENCES)}")
        if ramp not in RAMPS:
            raise ValueError(f"{where}: ramp={ramp!r} is not valid; choose one of {list(RAMPS)}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"{where}: ema_decay={ema_decay!r} must be in (0, 1), or null for the student itself")
        n = setup.student_config.num_hidden_layers
        self.layer = n if layer is None else int(layer)
        if not 1 <= self.layer <= n:
            raise ValueError(f"{where}: layer={layer!r} is out of range; valid: 1..{n}")
        self.attn = divergence in ("attn_kl", "both")
        self.hidden = divergence in ("hidden_mse", "both")
        self.ramp = ramp
        self.ema_decay = ema_decay
        check_block_size(block_size, where)
        self.block_size = block_size
        self.needs = frozenset({"clean", *(["qkv"] if self.attn else []), *(["hidden"] if self.hidden else [])})

    def taps(self) -> tuple[set[Tap], set[Tap]]:
        taps = qk_taps([self.layer], self.setup.student_config) if self.attn else set()
        return taps | ({Tap("hidden", self.layer)} if self.hidden else set()), set()

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        if not isinstance(student, MixedOutputs) or student.clean is None:
            raise ValueError(f"loss {self.setup.name!r} needs mixed inputs and a clean forward; set train.mixup: true")
        lam, mix, clean = student.lam, student.captures, student.clean
        own, rev = student.clean_mask, partner(student.clean_mask)  # [B, L] where each target row is defined
        total = torch.zeros((), device=own.device)
        if self.attn:
            config, causal = self.setup.student_config, self.setup.causal
            heads_mix, heads_clean = head_qk(mix, self.layer, config), head_qk(clean, self.layer, config)
            total = total + lam * attention_kl(heads_clean, heads_mix, own, own, causal, self.block_size)
            total = total + (1.0 - lam) * attention_kl(_partner_heads(heads_clean), heads_mix, rev, rev, causal,
                                                       self.block_size)
        if self.hidden:
            h_mix = mix.hidden[self.layer].float()
            h_clean = clean.hidden[self.layer].float()
            total = total + lam * masked_mean((h_mix - h_clean).pow(2), own)
            total = total + (1.0 - lam) * masked_mean((h_mix - partner(h_clean)).pow(2), rev)
        return (student.progress if self.ramp == "epoch" else 1.0) * total


def _partner_heads(heads: Heads) -> Heads:
    """The heads of every row's mixing partner: ``q``, ``k`` and a per-row ``[B, H, L, L]`` bias reversed along the
    batch; a bias without a batch dim (fewer than 4 dims) is the same for every row."""
    q, k, bias = heads
    return partner(q), partner(k), None if bias is None else partner(bias) if bias.dim() == 4 else bias
