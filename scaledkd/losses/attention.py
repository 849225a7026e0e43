"""Attention transfer and self-attention relation losses, computed from tapped Q/K/V projections.

Scores are rebuilt from the tapped projections only for the distilled layers, so both models keep their fused
attention kernels (SDPA/flash never materialise probabilities, and ``output_attentions`` returns nothing with
SDPA in transformers 5). Positions are put back as the block's attention applies them (:func:`head_qk`): rotary
decoders (Llama family) get Q and K rotated with the ``(cos, sin)`` their attention received, MPNet gets its
relative-position bias added, so the rebuilt scores are the model's real ones. Relation losses (MiniLMv2) are
defined on the projections themselves and use no positions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..arch import arch_of, attention_geometry
from ..mappings import resolve_mapping
from ..positions import apply_rope
from ..taps import Captures, Tap
from .base import DistillLoss, LossBatch, LossSetup, ModelOutputs, register_loss


def key_mask(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Which (query, key) entries are allowed: ``[B, 1, L, L]`` bool, padded keys (and future keys) off."""
    keys = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]
    if causal:
        L = attention_mask.shape[-1]
        tril = torch.ones(L, L, dtype=torch.bool, device=attention_mask.device).tril()
        keys = keys & tril[None, None]
    return keys


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, H*d]`` -> ``[B, H, L, d]``."""
    B, L, D = x.shape
    if D % heads:
        raise ValueError(f"width {D} is not divisible into {heads} heads")
    return x.view(B, L, heads, D // heads).transpose(1, 2)


def row_kl(target_logits: torch.Tensor, pred_logits: torch.Tensor, allowed: torch.Tensor,
           query_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real query rows (and heads) of ``KL(softmax(target) || softmax(pred))`` along the last dim.

    Args:
        target_logits, pred_logits: ``[B, H, L, L]`` scores.
        allowed: ``[B, 1, L, L]`` bool, entries that take part in the softmax.
        query_mask: ``[B, L]`` real query rows.
    """
    neg = torch.finfo(torch.float32).min  # finite, so 0 * (masked log-prob difference) stays 0, not NaN
    t = F.log_softmax(target_logits.float().masked_fill(~allowed, neg), dim=-1)
    s = F.log_softmax(pred_logits.float().masked_fill(~allowed, neg), dim=-1)
    kl = (t.exp() * (t - s)).masked_fill(~allowed, 0.0).sum(-1)  # [B, H, L]
    rows = query_mask.bool()[:, None, :].expand_as(kl)
    return kl[rows].sum() / rows.sum().clamp_min(1)


def head_qk(captures: Captures, layer: int, config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Query and key heads of one captured block, as that block's attention combines them.

    Returns float32 ``q [B, H, L, d]``, ``k [B, H, L, d]`` (GQA key heads repeated to H) and an additive score
    bias broadcastable to ``[B, H, L, L]`` (None when the architecture adds none), so that the block's
    pre-softmax, pre-mask scores are ``q k^T / sqrt(d) + bias``. Every attention-map loss reads its heads here,
    so position handling lives in one place: rotary families (``Arch.positions == "rope"``) rotate q and k with
    the captured ``(cos, sin)``; MPNet (``"bias"``) returns its captured relative-position bias ``[B, H, L, L]``.
    """
    heads, kv_heads, _ = attention_geometry(config)
    qh = split_heads(captures.q[layer].float(), heads)
    kh = split_heads(captures.k[layer].float(), kv_heads)
    bias = None
    positions = arch_of(config).positions
    if positions == "rope":
        cos, sin = captures.get(Tap("rope", layer))
        qh, kh = apply_rope(qh, cos, sin), apply_rope(kh, cos, sin)  # rotate before sharing keys, as the model
    elif positions == "bias":
        bias = captures.get(Tap("bias", layer)).float()
    if kv_heads != heads:
        kh = kh.repeat_interleave(heads // kv_heads, dim=1)
    return qh, kh, bias


def qk_taps(layers, config) -> set[Tap]:
    """The taps :func:`head_qk` reads for the given blocks of a model with ``config``: q, k and, where the
    architecture passes positions to its attention, those (``rope`` or ``bias``)."""
    positions = arch_of(config).positions
    kinds = ("q", "k") if positions is None else ("q", "k", positions)
    return {Tap(kind, layer) for layer in layers for kind in kinds}


def scores(qh: torch.Tensor, kh: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pre-softmax attention scores ``q k^T / sqrt(d) + bias``, ``[B, H, L, L]``, from :func:`head_qk`'s output."""
    a = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
    return a if bias is None else a + bias


class _LayerPairs(DistillLoss):
    needs = frozenset({"teacher", "qkv"})
    default_mapping = "last"

    def __init__(self, setup: LossSetup) -> None:
        super().__init__(setup)
        self.pairs = resolve_mapping(
            setup.mapping, setup.student_config.num_hidden_layers, setup.teacher_config.num_hidden_layers,
            with_embeddings=False, default=self.default_mapping, where=f"losses[{setup.name}].mapping",
        )

    def _check_heads(self) -> None:
        hs = attention_geometry(self.setup.student_config)[0]
        ht = attention_geometry(self.setup.teacher_config)[0]
        if hs != ht:
            raise ValueError(
                f"loss {self.setup.name!r} compares attention maps head by head, but the student has {hs} heads "
                f"and the teacher {ht}; use 'qkv_relation' with relation_heads to distil across head counts"
            )


@register_loss("attn_kl")
class AttentionKL(_LayerPairs):
    """Attention-distribution transfer: per head and real query row, ``KL(softmax(A_t) || softmax(A_s))`` with
    ``A = QK^T / sqrt(d) + mask`` (MobileBERT, Sun et al. 2020; MiniLM, Wang et al. 2020). Summed over layer
    pairs (default: last <-> last). Shapes: ``A [B, H, L, L]``; heads must match."""

    def __init__(self, setup: LossSetup) -> None:
        super().__init__(setup)
        self._check_heads()

    def taps(self) -> tuple[set[Tap], set[Tap]]:
        return (qk_taps((s for s, _ in self.pairs), self.setup.student_config),
                qk_taps((t for _, t in self.pairs), self.setup.teacher_config))

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        allowed = key_mask(batch.attention_mask, self.setup.causal)
        total = 0.0
        for s, t in self.pairs:
            a_s = scores(*head_qk(student.captures, s, self.setup.student_config))
            a_t = scores(*head_qk(teacher.captures, t, self.setup.teacher_config))
            total = total + row_kl(a_t, a_s, allowed, batch.token_mask)
        return total


@register_loss("attn_mse")
class AttentionMSE(_LayerPairs):
    """TinyBERT attention-score transfer: ``MSE(A_s, A_t)`` on pre-softmax scores with padded (and, for
    decoders, future) entries excluded; mean over the real entries and heads. Default mapping uniform.
    ``masked: false`` reproduces the reference code (padded entries set to 0, mean over all entries)."""

    default_mapping = "uniform"

    def __init__(self, setup: LossSetup, masked: bool = True) -> None:
        super().__init__(setup)
        self._check_heads()
        self.masked = masked

    def taps(self) -> tuple[set[Tap], set[Tap]]:
        return (qk_taps((s for s, _ in self.pairs), self.setup.student_config),
                qk_taps((t for _, t in self.pairs), self.setup.teacher_config))

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        allowed = key_mask(batch.attention_mask, self.setup.causal)
        allowed = allowed & batch.token_mask.bool()[:, None, :, None]  # real query rows too
        total = 0.0
        for s, t in self.pairs:
            a_s = scores(*head_qk(student.captures, s, self.setup.student_config))
            a_t = scores(*head_qk(teacher.captures, t, self.setup.teacher_config))
            sq = (a_s - a_t).pow(2).masked_fill(~allowed, 0.0)  # [B, H, L, L]
            denom = allowed.expand_as(sq).sum() if self.masked else torch.tensor(sq.numel())
            total = total + sq.sum() / denom.clamp_min(1)
        return total


@register_loss("qkv_relation")
class QKVRelation(_LayerPairs):
    """Self-attention relation transfer (MiniLMv2, Wang et al. 2021): for X in ``relations`` (default Q, K, V),
    ``KL(softmax(X_t X_t^T / sqrt(d_r)) || softmax(X_s X_s^T / sqrt(d_r)))`` per relation head and real row,
    summed over relations and layer pairs (default: last <-> last).

    Both models' projections are reshaped to ``relation_heads`` heads (default: the teacher's head count), so
    widths and head counts may differ as long as both widths divide. Shapes: ``X [B, L, D] -> [B, H_r, L, d_r]``,
    relations ``[B, H_r, L, L]``.
    """

    def __init__(self, setup: LossSetup, relations: list[str] | None = None,
                 relation_heads: int | None = None) -> None:
        super().__init__(setup)
        relations = list(relations or ["q", "k", "v"])
        bad = [r for r in relations if r not in ("q", "k", "v")]
        if bad or not relations:
            raise ValueError(f"loss {setup.name!r}: relations={relations!r}; choose from ['q', 'k', 'v']")
        self.relations = relations
        self.relation_heads = relation_heads or attention_geometry(setup.teacher_config)[0]
        for who, cfg in (("student", setup.student_config), ("teacher", setup.teacher_config)):
            heads, kv_heads, head_dim = attention_geometry(cfg)
            for r in relations:
                width = (heads if r == "q" else kv_heads) * head_dim
                if width % self.relation_heads:
                    raise ValueError(
                        f"loss {setup.name!r}: {who} {r.upper()} width {width} is not divisible into "
                        f"relation_heads={self.relation_heads}; pick relation_heads dividing both models' widths"
                    )

    def taps(self) -> tuple[set[Tap], set[Tap]]:
        return ({Tap(r, s) for s, _ in self.pairs for r in self.relations},
                {Tap(r, t) for _, t in self.pairs for r in self.relations})

    def _relation(self, x: torch.Tensor) -> torch.Tensor:
        xh = split_heads(x.float(), self.relation_heads)  # [B, H_r, L, d_r]
        return xh @ xh.transpose(-1, -2) / math.sqrt(xh.shape[-1])

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        allowed = key_mask(batch.attention_mask, self.setup.causal)
        total = 0.0
        for s, t in self.pairs:
            for r in self.relations:
                r_s = self._relation(getattr(student.captures, r)[s])
                r_t = self._relation(getattr(teacher.captures, r)[t])
                total = total + row_kl(r_t, r_s, allowed, batch.token_mask)
        return total


@register_loss("minilm_value")
class MiniLMValueRelation(QKVRelation):
    """MiniLM's value-relation transfer (Wang et al. 2020): ``qkv_relation`` restricted to V with the models'
    own head count (student and teacher heads must match)."""

    def __init__(self, setup: LossSetup) -> None:
        super().__init__(setup, relations=["v"], relation_heads=attention_geometry(setup.teacher_config)[0])
        self._check_heads()
