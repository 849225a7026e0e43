"""Causal-LM logit losses computed from the final hidden states and the output head, chunk by chunk
(docs/methods.md#decoder-lm-logit-divergences, "Logits from the head").

A causal LM's logits are ``lm_head(h)`` with ``h [B, L, D]`` the final norm's output. At V = 128k the
``[B, L, V]`` logits (and their gradient) dwarf everything else a distillation step holds, so when every loss
that reads a model's logits can take this form, the engine stops the model before its head
(:class:`OutputHead`, ``ModelOutputs.hidden_final``) and these functions apply the head to ``chunk_size``
scored tokens at a time: per chunk the student's (and the teacher's) ``[C, V]`` logits exist, the per-token
divergence or cross-entropy of :mod:`scaledkd.losses.divergence` runs on them, and the chunk is dropped. No
tensor with a row per token and a column per vocabulary id ever exists, in the forward or the backward.

Only architectures whose logits are exactly ``lm_head(base_model(...).last_hidden_state)`` qualify
(:data:`HEAD_ARCHS`; no logit scaling or soft-capping after the head).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .divergence import (
    IGNORE_INDEX,
    Divergence,
    _check_chunk_size,
    _check_mask,
    cross_entropy_rows_sum,
    cross_entropy_rows_sum_and_grad,
    divergence_rows,
)

__all__ = ["HEAD_ARCHS", "FusedHead", "OutputHead", "head_cross_entropy", "head_token_divergence", "output_head"]

# config.model_type values whose causal-LM forward computes ``logits = lm_head(last_hidden_state)`` and nothing
# else (checked in transformers 5's modeling files: the final norm is inside the base model, the head is a plain
# Linear, possibly tied to the input embeddings; Gemma's soft-capping or Cohere's logit scale would not qualify).
HEAD_ARCHS = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3"})

# Rows of one chunk: (student logit rows [C, V], index of the chunk's first row) -> (float32 sum, and for the
# fused path its float32 [C, V] gradient w.r.t. the student rows).
_ChunkSum = Callable[[torch.Tensor, slice], torch.Tensor]
_ChunkSumAndGrad = Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]


class FusedHead(nn.Module):
    """The chunk loop with gradients (:class:`_FusedHeadRows`) run as the forward of a module of its own.

    The engine registers the head's parameters as this module's external parameters under ZeRO-3
    (``deepspeed.zero.register_external_parameter``), so DeepSpeed gathers them once for this call, and again
    before this call's backward, when autograd accumulates the weight's gradient into the parameter: that
    needs the full weight, which a partitioned parameter only has while a module using it runs.

    Args:
        head: the ``nn.Linear(D, V)`` output head. Held by reference, not as a submodule: it stays the model's
            (one owner, no duplicate keys in state dicts).
    """

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self._head = [head]

    @property
    def head(self) -> nn.Linear:
        return self._head[0]

    def forward(self, rows: torch.Tensor, chunk_sum_and_grad: _ChunkSumAndGrad, chunk_size: int,
                scale: float) -> torch.Tensor:
        """``scale * sum over chunks of loss(head(rows[chunk]))`` for rows ``[M, D]``: a float32 scalar."""
        head = self.head
        return _FusedHeadRows.apply(rows, head.weight, head.bias, chunk_sum_and_grad, chunk_size, scale)


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output layer as the losses apply it: ``logits = module(hidden_final)``.

    Attributes:
        module: the model's ``lm_head`` (``nn.Linear(D, V)``; its weight may be the input embedding matrix).
        gathered: a context in which ``module``'s parameters hold their full values, for the chunk loops without
            gradient. The engine supplies it: under ZeRO-3 it gathers the partitioned weights once per loop on
            every rank (a no-op otherwise).
        fused: the :class:`FusedHead` the loops with gradient run in (the engine registers it with the student
            so that ZeRO-3 gathers the head for it); None builds an unregistered one, enough without ZeRO-3.
    """

    module: nn.Linear
    gathered: Callable[[], AbstractContextManager] = field(default=contextlib.nullcontext)
    fused: FusedHead | None = None


def output_head(model: nn.Module) -> nn.Linear | None:
    """The ``lm_head`` of a causal LM whose logits are exactly ``lm_head(last_hidden_state)``, else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(model.config, "model_type", None) not in HEAD_ARCHS or not isinstance(head, nn.Linear):
        return None
    return head


def head_token_divergence(
    student_hidden: torch.Tensor,
    student_head: OutputHead,
    mask: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: OutputHead | None = None,
    teacher_logits: torch.Tensor | None = None,
    kind: Divergence = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    top_k: int | None = None,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """:func:`~scaledkd.losses.divergence.token_divergence` of the logits ``student_head(student_hidden)``,
    without ever forming them for all tokens.

    Same value, gradient, conventions (``T**2`` scale, ``-inf`` teacher ids, ``top_k``) and errors as
    ``token_divergence`` on full logits; the teacher comes as its final hidden states and head (applied per
    chunk, without gradient) or as full logits ``[B, L, V]`` (a teacher-output cache, or a teacher whose head
    runs in full).

    Args:
        student_hidden: ``[B, L, D]`` the student's final (post-norm) hidden states.
        student_head: the student's output head; its parameters get their gradient through autograd.
        mask: ``[B, L]`` bool or 0/1, aligned with the hidden states (position i predicts token i + 1).
        teacher_hidden, teacher_head: ``[B, L, D_t]`` and the teacher's head; or
        teacher_logits: ``[B, L, V]``.
        kind, temperature, beta, alpha, top_k: as in ``token_divergence``.
        chunk_size: scored tokens per chunk; None applies the head to all scored tokens at once with plain
            autograd (the reference; it holds ``[n_masked, V]`` logits).

    Returns:
        Float32 scalar (a zero with a gradient path to the student when no token is scored).
    """
    if (teacher_logits is None) == (teacher_hidden is None or teacher_head is None):
        raise ValueError("give the teacher either as teacher_logits or as teacher_hidden with teacher_head")
    vocab = _vocab(student_head)
    rows_sum, rows_sum_and_grad = divergence_rows(kind, vocab, temperature, beta, alpha, top_k)
    _check_chunk_size(chunk_size)
    keep = _check_mask(mask, _batch_shape(student_hidden))
    b_idx, l_idx = keep.nonzero(as_tuple=True)  # [M], [M]

    if teacher_logits is not None:
        if tuple(teacher_logits.shape) != (*_batch_shape(student_hidden), vocab):
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} do not match the student's "
                             f"[B, L, V] = {(*_batch_shape(student_hidden), vocab)}")
        teacher_logits = teacher_logits.detach()
        gathered = []

        def teacher_rows(part: slice) -> torch.Tensor:  # a fresh [C, V] copy
            return teacher_logits[b_idx[part], l_idx[part]]
    else:
        if _batch_shape(teacher_hidden) != _batch_shape(student_hidden) or _vocab(teacher_head) != vocab:
            raise ValueError(f"teacher hidden states {tuple(teacher_hidden.shape)} with V={_vocab(teacher_head)} "
                             f"do not match the student's {tuple(student_hidden.shape)} with V={vocab}")
        t_rows = teacher_hidden.detach()[b_idx, l_idx]  # [M, D_t]: small next to any [., V] tensor
        t_module = teacher_head.module
        gathered = [teacher_head]

        def teacher_rows(part: slice) -> torch.Tensor:
            with torch.no_grad():
                return F.linear(t_rows[part], t_module.weight, t_module.bias)

    if rows_sum is None:  # identically 0 (skew divergences at alpha = 1)
        rows_sum = lambda s, t: s.sum().float() * 0.0
        rows_sum_and_grad = lambda s, t: (s.sum().float() * 0.0, torch.zeros_like(s, dtype=torch.float32))

    def chunk_sum(student_rows: torch.Tensor, part: slice) -> torch.Tensor:
        return rows_sum(student_rows, teacher_rows(part))

    def chunk_sum_and_grad(student_rows: torch.Tensor, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return rows_sum_and_grad(student_rows, teacher_rows(part))

    return _head_row_mean(student_hidden, student_head, b_idx, l_idx, chunk_sum, chunk_sum_and_grad, chunk_size,
                          temperature**2, gathered)


def head_cross_entropy(
    hidden: torch.Tensor,
    head: OutputHead,
    labels: torch.Tensor,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """:func:`~scaledkd.losses.divergence.chunked_cross_entropy` of ``head(hidden)``, chunk by chunk.

    Args:
        hidden: ``[B, L, D]`` final hidden states.
        head: the output head (``V`` outputs).
        labels: ``[B, L]`` token ids in ``[0, V)`` aligned with ``hidden``, or -100 for tokens that do not count.
        chunk_size: labelled tokens per chunk; None = one plain-autograd pass (the reference).

    Returns:
        Float32 scalar: mean cross-entropy over labelled tokens.
    """
    if labels.shape != _batch_shape(hidden) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer [B, L] tensor matching hidden states {tuple(hidden.shape)}, "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    _check_chunk_size(chunk_size)
    vocab = _vocab(head)
    keep = labels != IGNORE_INDEX
    b_idx, l_idx = keep.nonzero(as_tuple=True)
    targets = labels[b_idx, l_idx]  # [M]
    bad = targets[(targets < 0) | (targets >= vocab)]
    if bad.numel():
        raise ValueError(f"label {bad[0].item()} is out of range: labels must be in [0, V={vocab}) or {IGNORE_INDEX}")

    def chunk_sum(rows: torch.Tensor, part: slice) -> torch.Tensor:
        return cross_entropy_rows_sum(rows, targets[part])

    def chunk_sum_and_grad(rows: torch.Tensor, part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return cross_entropy_rows_sum_and_grad(rows, targets[part])

    return _head_row_mean(hidden, head, b_idx, l_idx, chunk_sum, chunk_sum_and_grad, chunk_size, 1.0, [])


# ------------------------------------------------------------------------------------------ chunking


def _head_row_mean(
    hidden: torch.Tensor,
    head: OutputHead,
    b_idx: torch.Tensor,
    l_idx: torch.Tensor,
    chunk_sum: _ChunkSum,
    chunk_sum_and_grad: _ChunkSumAndGrad,
    chunk_size: int | None,
    scale: float,
    also_gathered: list[OutputHead],
) -> torch.Tensor:
    """``scale * sum_rows(loss(head(hidden[b, l]))) / n`` over the ``n`` scored positions ``(b_idx, l_idx)``.

    Every rank runs this whatever its number of scored tokens (zero included), so that under ZeRO-3 each one
    gathers the heads the same number of times and the head weight gets a (zero) gradient on every rank.
    """
    n = b_idx.numel()
    scale = scale / max(n, 1)
    rows = hidden[b_idx, l_idx]  # [M, D], a copy: the only per-token tensor kept for the backward
    if chunk_size is None:
        # The reference: the head module on all scored rows at once, plain autograd.
        with contextlib.ExitStack() as stack:
            for other in also_gathered:
                stack.enter_context(other.gathered())
            return chunk_sum(head.module(rows), slice(0, n)) * scale
    module = head.module
    with contextlib.ExitStack() as stack:
        for other in also_gathered:
            stack.enter_context(other.gathered())
        if torch.is_grad_enabled() and any(t.requires_grad for t in (rows, *module.parameters())):
            fused = head.fused if head.fused is not None else FusedHead(module)
            return fused(rows, chunk_sum_and_grad, chunk_size, scale)
        stack.enter_context(head.gathered())
        weight, bias = module.weight, module.bias
        with torch.no_grad():
            total = rows.new_zeros((), dtype=torch.float32)
            for start in range(0, n, chunk_size):
                part = slice(start, start + chunk_size)
                total += chunk_sum(F.linear(rows[part], weight, bias), part)
            return total * scale


class _FusedHeadRows(torch.autograd.Function):
    """``scale * sum over chunks of loss(rows[chunk] @ W.T + b)`` with its gradients computed chunk by chunk in
    the forward pass, for the rows ``[M, D]``, the weight ``[V, D]`` and the bias ``[V]``; backward rescales them.

    Why this and not ``torch.utils.checkpoint`` around ``head(h_chunk) -> chunk loss`` per chunk:

    - ZeRO-3. Every call of a partitioned module all-gathers its weight, a collective. Per-chunk head calls (and
      their recomputation in the backward) would make one gather per chunk, and the number of chunks is each
      rank's own number of scored tokens, so ranks would issue different numbers of collectives and hang or
      mix up their buffers. Here the student's head weights are gathered once per loss call and once for its
      backward, by :class:`FusedHead` (this Function's only caller), on every rank; the teacher's once per loss
      call by its :attr:`OutputHead.gathered`. The weight's gradient still reaches the parameter through
      autograd: it is this Function's gradient for its ``weight`` input, so autograd accumulates it (together
      with the input-embedding gradient when the weights are tied) and ZeRO's gradient hooks reduce and
      partition it exactly once, as for any parameter. Assigning ``.grad`` by hand would bypass both.
    - Cost. Each chunk's logits are computed once (checkpointing recomputes the student's and the teacher's in
      the backward), and the per-chunk gradient is the hand-derived one of
      :mod:`~scaledkd.losses.divergence` (about four ``[C, V]`` float32 buffers, against nine under autograd).

    The price: the ``[V, D]`` weight gradient (float32 accumulator) exists from the forward on, and is computed
    even if no backward follows, so this path is taken only when a gradient is needed. No double backward.
    """

    @staticmethod
    def forward(
        ctx,
        rows: torch.Tensor,  # [M, D]
        weight: torch.Tensor,  # [V, D]
        bias: torch.Tensor | None,  # [V]
        chunk_sum_and_grad: _ChunkSumAndGrad,
        chunk_size: int,
        scale: float,
    ) -> torch.Tensor:
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_rows = torch.zeros_like(rows) if need_rows else None  # [M, D]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        total = rows.new_zeros((), dtype=torch.float32)
        for start in range(0, rows.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            h = rows[part]  # [C, D]
            chunk_total, g = chunk_sum_and_grad(F.linear(h, weight, bias), part)  # g: [C, V] float32
            total += chunk_total
            g = g.mul_(scale)
            if grad_rows is not None:
                # d(logits) rounded once to the model's dtype, as autograd through the head would.
                grad_rows[part] = g.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(g.t(), h.float())
            if grad_bias is not None:
                grad_bias += g.sum(0)
            del g
        ctx.save_for_backward(
            grad_rows,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
        )
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        grads = [None if g is None else g.mul_(grad_output) for g in ctx.saved_tensors]  # in place, as in divergence
        return (*grads, None, None, None)


# ------------------------------------------------------------------------------------------ helpers


def _batch_shape(hidden: torch.Tensor) -> tuple[int, int]:
    if hidden.dim() != 3 or not hidden.is_floating_point():
        raise ValueError(f"hidden states must be a float [B, L, D] tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    return tuple(hidden.shape[:2])


def _vocab(head: OutputHead) -> int:
    return int(head.module.out_features)
