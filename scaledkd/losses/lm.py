"""Causal-LM losses: token-level logit distillation and the hard-label next-token loss
(docs/methods.md#decoder-lm-logit-divergences).

Both read logits ``[B, L, V]`` and the batch's token mask / labels, which the causal-LM collator
(``scaledkd/data/lm.py``) already aligns with the logits: position ``i`` predicts token ``i + 1``, and padding,
prompt tokens and predictions across a document boundary are masked out.

By default (``head_chunks: true``) they declare ``logits_from_head``: the engine then hands them each model's
final hidden states and output head instead of logits, and :mod:`scaledkd.losses.head` applies the head to
``chunk_size`` scored tokens at a time, so no ``[B, L, V]`` tensor of either model exists. With
``head_chunks: false`` (or when another loss needs full logits) they call the chunked functions of
:mod:`scaledkd.losses.divergence` on full logits, so a ``[B, L, V]`` float32 log-softmax of both models is
still never held at once.

A KD + CE mix is two terms (``lm_kd`` and ``lm_task`` with their weights), each logged on its own.
"""
from __future__ import annotations

import math

import torch

from .base import DistillLoss, LossBatch, LossSetup, ModelOutputs, register_loss
from .divergence import DIVERGENCES, chunked_cross_entropy, token_divergence
from .head import head_cross_entropy, head_token_divergence


def _check_chunk_size(name: str, chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"loss {name!r}: chunk_size={chunk_size!r} must be an integer >= 1 or null (unchunked)")


def _check_head_chunks(name: str, head_chunks: bool) -> bool:
    if not isinstance(head_chunks, bool):
        raise ValueError(f"loss {name!r}: head_chunks={head_chunks!r} must be true or false")
    return head_chunks


def _full_logits(outputs: ModelOutputs) -> torch.Tensor:
    """``[B, L, V]`` logits of a model whose head the engine skipped (another loss of the run wanted them in
    full from the other model): the head applied to all positions, as the model itself would."""
    if outputs.logits is not None:
        return outputs.logits
    return outputs.head.module(outputs.hidden_final)


@register_loss("lm_kd")
class LanguageModelKD(DistillLoss):
    """Token-level logit distillation for causal LMs: masked mean over scored tokens of
    ``T^2 * D(softmax(z_t / T), softmax(z_s / T))`` over the vocabulary.

    ``divergence``: ``forward_kl`` (word-level KD; Hinton et al. 2015, Kim & Rush 2016), ``reverse_kl``
    (MiniLLM, Gu et al. 2024), ``jsd`` with ``beta`` (GKD, Agarwal et al. 2024), ``skew_kl`` /
    ``skew_reverse_kl`` with ``alpha`` (DistiLLM, Ko et al. 2024) or ``tvd``; see
    :func:`~scaledkd.losses.divergence.token_divergence` for the exact conventions. ``top_k`` compares only the
    teacher's top-k ids (both renormalised). ``chunk_size`` scored tokens are processed at a time;
    ``head_chunks`` (default true) takes them from the models' final hidden states and output heads so that no
    ``[B, L, V]`` logits exist (false: the full-logits reference path).

    Shapes: logits ``[B, L, V]`` (same V: one tokenizer) or final hidden states ``[B, L, D]`` with the head,
    mask ``[B, L]`` aligned with them.
    """

    needs = frozenset({"teacher", "logits"})
    tasks = frozenset({"causal_lm"})

    def __init__(self, setup: LossSetup, divergence: str = "forward_kl", temperature: float = 1.0,
                 beta: float = 0.5, alpha: float = 0.1, top_k: int | None = None,
                 chunk_size: int | None = 256, head_chunks: bool = True) -> None:
        super().__init__(setup)
        where = f"loss {setup.name!r}"
        self.logits_from_head = _check_head_chunks(setup.name, head_chunks)
        if divergence not in DIVERGENCES:
            raise ValueError(f"{where}: divergence={divergence!r} is not valid; choose one of {list(DIVERGENCES)}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"{where}: temperature={temperature!r} must be a finite number > 0")
        for name, value in (("beta", beta), ("alpha", alpha)):
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{where}: {name}={value!r} must lie in [0, 1]")
        vocab_s, vocab_t = setup.student_config.vocab_size, setup.teacher_config.vocab_size
        if vocab_s != vocab_t:
            raise ValueError(f"{where}: student vocabulary {vocab_s} != teacher vocabulary {vocab_t}; token-level "
                             "distillation needs one shared tokenizer")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_t):
            raise ValueError(f"{where}: top_k={top_k!r} must be null or an integer in [1, {vocab_t}] (vocabulary)")
        _check_chunk_size(setup.name, chunk_size)
        self.divergence = divergence
        self.temperature = float(temperature)
        self.beta = float(beta)
        self.alpha = float(alpha)
        self.top_k = self.teacher_top_k = top_k
        self.chunk_size = chunk_size

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        params = dict(kind=self.divergence, temperature=self.temperature, beta=self.beta, alpha=self.alpha,
                      top_k=self.top_k, chunk_size=self.chunk_size)
        if self.logits_from_head and student.logits is None:
            if teacher.logits is None:
                return head_token_divergence(student.hidden_final, student.head, batch.token_mask,
                                             teacher_hidden=teacher.hidden_final, teacher_head=teacher.head, **params)
            return head_token_divergence(student.hidden_final, student.head, batch.token_mask,
                                         teacher_logits=teacher.logits, **params)
        return token_divergence(_full_logits(student), _full_logits(teacher), batch.token_mask, **params)


@register_loss("lm_task")
class LanguageModelTask(DistillLoss):
    """Hard-label next-token cross-entropy of the student, mean over scored tokens (labels != -100).

    ``head_chunks`` (default true): computed from the final hidden states and the output head, ``chunk_size``
    labelled tokens at a time, without ``[B, L, V]`` logits (false: the full-logits reference path).

    Shapes: logits ``[B, L, V]`` or final hidden states ``[B, L, D]`` with the head, labels ``[B, L]`` aligned
    with them (label ``i`` = token ``i + 1``).
    """

    needs = frozenset({"labels", "logits"})
    tasks = frozenset({"causal_lm"})

    def __init__(self, setup: LossSetup, chunk_size: int | None = 256, head_chunks: bool = True) -> None:
        super().__init__(setup)
        _check_chunk_size(setup.name, chunk_size)
        self.logits_from_head = _check_head_chunks(setup.name, head_chunks)
        self.chunk_size = chunk_size

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        if batch.labels is None:
            raise ValueError(f"loss {self.setup.name!r} needs next-token labels, but the batch has none")
        if self.logits_from_head and student.logits is None:
            return head_cross_entropy(student.hidden_final, student.head, batch.labels, chunk_size=self.chunk_size)
        return chunked_cross_entropy(_full_logits(student), batch.labels, chunk_size=self.chunk_size)
