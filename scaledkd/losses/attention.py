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
from .attention_blocks import DEFAULT_BLOCK_SIZE, Heads, blocked_row_kl, blocked_score_mse, check_block_size
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


def attention_kl(target: Heads, pred: Heads, attention_mask: torch.Tensor, query_mask: torch.Tensor, causal: bool,
                 block_size: int | None) -> torch.Tensor:
    """Mean over real query rows and heads of ``KL(softmax(A_t) || softmax(A_s))``, ``A = q k^T / sqrt(d) + bias``.

    Args:
        target, pred: :func:`head_qk` outputs ``(q [B, H, L, d], k [B, H, L, d], bias or None)``; the target is
            a constant.
        attention_mask: ``[B, L]`` real keys; query_mask: ``[B, L]`` query rows that count.
        causal: also exclude future keys.
        block_size: query rows per block for :func:`~scaledkd.losses.attention_blocks.blocked_row_kl` (the
            default path: no ``[B, H, L, L]`` tensor is kept for backward); None = the plain autograd reference
            (:func:`row_kl` on full score maps).
    """
    if block_size is None:
        return row_kl(scores(*target), scores(*pred), key_mask(attention_mask, causal), query_mask)
    return blocked_row_kl(target, pred, attention_mask, query_mask, causal, block_size)


def score_mse(target: Heads, pred: Heads, attention_mask: torch.Tensor, query_mask: torch.Tensor, causal: bool,
              masked: bool, block_size: int | None) -> torch.Tensor:
    """``MSE(A_s, A_t)`` on pre-softmax scores over allowed keys of real query rows (``masked``: mean over those
    entries; else zero elsewhere and mean over all ``B H L L``). Arguments as :func:`attention_kl`."""
    if block_size is not None:
        return blocked_score_mse(target, pred, attention_mask, query_mask, causal, block_size, masked)
    allowed = key_mask(attention_mask, causal) & query_mask.bool()[:, None, :, None]  # real query rows too
    sq = (scores(*pred) - scores(*target)).pow(2).masked_fill(~allowed, 0.0)  # [B, H, L, L]
    denom = allowed.expand_as(sq).sum() if masked else torch.tensor(sq.numel())
    return sq.sum() / denom.clamp_min(1)


class _LayerPairs(DistillLoss):
    needs = frozenset({"teacher", "qkv"})
    default_mapping = "last"

    def __init__(self, setup: LossSetup, block_size: int | None = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(setup)
        self.pairs = resolve_mapping(
            setup.mapping, setup.student_config.num_hidden_layers, setup.teacher_config.num_hidden_layers,
            with_embeddings=False, default=self.default_mapping, where=f"losses[{setup.name}].mapping",
        )
        check_block_size(block_size, f"loss {setup.name!r}")
        self.block_size = block_size

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
    pairs (default: last <-> last). Shapes: ``A [B, H, L, L]``; heads must match. ``block_size``: query rows per
    block of the blocked kernel (:mod:`.attention_blocks`), or None for the plain reference."""

    def __init__(self, setup: LossSetup, block_size: int | None = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(setup, block_size)
        self._check_heads()

    def taps(self) -> tuple[set[Tap], set[Tap]]:
        return (qk_taps((s for s, _ in self.pairs), self.setup.student_config),
                qk_taps((t for _, t in self.pairs), self.setup.teacher_config))

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        total = 0.0
        for s, t in self.pairs:
            total = total + attention_kl(
                head_qk(teacher.captures, t, self.setup.teacher_config),
                head_qk(student.captures, s, self.setup.student_config),
                batch.attention_mask, batch.token_mask, self.setup.causal, self.block_size,
            )
        return total


@register_loss("attn_mse")
class AttentionMSE(_LayerPairs):
    """TinyBERT attention-score transfer: ``MSE(A_s, A_t)`` on pre-softmax scores with padded (and, for
    decoders, future) entries excluded; mean over the real entries and heads. Default mapping uniform.
    ``masked: false`` reproduces the reference code (padded entries set to 0, mean over all entries).
    ``block_size`` as in ``attn_kl``."""

    default_mapping = "uniform"

    def __init__(self, setup: LossSetup, masked: bool = True, block_size: int | None = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(setup, block_size)
        self._check_heads()
        self.masked = masked

    def taps(self) -> tuple[set[Tap], set[Tap]]:
        return (qk_taps((s for s, _ in self.pairs), self.setup.student_config),
                qk_taps((t for _, t in self.pairs), self.setup.teacher_config))

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        total = 0.0
        for s, t in self.pairs:
            total = total + score_mse(
                head_qk(teacher.captures, t, self.setup.teacher_config),
                head_qk(student.captures, s, self.setup.student_config),
                batch.attention_mask, batch.token_mask, self.setup.causal, self.masked, self.block_size,
            )
        return total


@register_loss("qkv_relation")
class QKVRelation(_LayerPairs):
    """Self-attention relation transfer (MiniLMv2, Wang et al. 2021): for X in ``relations`` (default Q, K, V),
    ``KL(softmax(X_t X_t^T / sqrt(d_r)) || softmax(X_s X_s^T / sqrt(d_r)))`` per relation head and real row,
    summed over relations and layer pairs (default: last <-> last).

    Both models' projections are reshaped to ``relation_heads`` heads (default: the teacher's head count), so
    widths and head counts may differ as long as both widths divide. Shapes: ``X [B, L, D] -> [B, H_r, L, d_r]``,
    relations ``[B, H_r, L, L]``. ``block_size`` as in ``attn_kl`` (a relation is the scores of ``q = k = X``).
    """

    def __init__(self, setup: LossSetup, relations: list[str] | None = None,
                 relation_heads: int | None = None, block_size: int | None = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(setup, block_size)
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

    def _relation_heads(self, x: torch.Tensor) -> Heads:
        """``X [B, L, D]`` as the ``(q, k, bias)`` whose scores are its relation: ``q = k = X [B, H_r, L, d_r]``."""
        xh = split_heads(x.float(), self.relation_heads)
        return xh, xh, None

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        total = 0.0
        for s, t in self.pairs:
            for r in self.relations:
                total = total + attention_kl(
                    self._relation_heads(getattr(teacher.captures, r)[t]),
                    self._relation_heads(getattr(student.captures, r)[s]),
                    batch.attention_mask, batch.token_mask, self.setup.causal, self.block_size,
                )
        return total


@register_loss("minilm_value")
class MiniLMValueRelation(QKVRelation):
    """MiniLM's value-relation transfer (Wang et al. 2020): ``qkv_relation`` restricted to V with the models'
    own head count (student and teacher heads must match)."""

    def __init__(self, setup: LossSetup, block_size: int | None = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(setup, relations=["v"], relation_heads=attention_geometry(setup.teacher_config)[0],
                         block_size=block_size)
        self._check_heads()
