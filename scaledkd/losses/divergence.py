"""Token-level logit divergences for decoder (causal LM) distillation, computed in memory-bounded chunks.

Per token, over the vocabulary, masked to real (and, for instruction data, response) tokens
(docs/methods.md#decoder-lm-logit-divergences):

- ``forward_kl``       ``KL(p_t || p_s)``, mode covering (Hinton et al., 2015; the usual word-level KD).
- ``reverse_kl``       ``KL(p_s || p_t)``, mode seeking (MiniLLM, Gu et al., 2024).
- ``jsd``              generalised Jensen-Shannon divergence JSD(beta) (GKD, Agarwal et al., 2024); see
                       :func:`token_divergence` for the beta convention.
- ``skew_kl``          ``KL(p_t || a*p_t + (1-a)*p_s)`` (DistiLLM, Ko et al., 2024).
- ``skew_reverse_kl``  ``KL(p_s || a*p_s + (1-a)*p_t)`` (DistiLLM).
- ``tvd``              total variation distance ``0.5 * sum_v |p_t - p_s|`` (also in DistiLLM's code base).

plus :func:`chunked_cross_entropy`, the hard-label next-token loss these are usually mixed with.

Why chunks: a ``[B, L, V]`` float32 log-softmax at L = 1,024 and V = 128k is 512 MiB per sequence, and a
naive divergence keeps several such tensors (both log-softmaxes, the probabilities, the mixture, their
products) alive for the backward pass. Here only the masked rows are visited, ``chunk_size`` of them at a
time, so the float32 working set is ``O(chunk_size * V)`` whatever B and L are.

These are plain functions (no registry, no config); the registered losses in this package wrap them.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "Divergence",
    "RowsSum",
    "RowsSumAndGrad",
    "chunked_cross_entropy",
    "cross_entropy_rows_sum",
    "cross_entropy_rows_sum_and_grad",
    "divergence_rows",
    "token_divergence",
]

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)

IGNORE_INDEX = -100  # label value skipped by chunked_cross_entropy (the Hugging Face convention)

# Stand-in for log(0) at vocabulary ids the teacher rules out (-inf logits). A finite value keeps every
# intermediate finite: exp() of it underflows to exactly 0, so those ids add 0 * (finite) = 0 to each sum,
# and no inf - inf or 0 * inf can appear in the forward or the backward pass (where a torch.where over
# -inf values would still propagate NaN gradients through its unselected branch).
_LOG_ZERO = -1e30

# The math of one chunk of rows, given the rows themselves (see divergence_rows): student rows [C, V] and the
# teacher rows [C, V] or the target ids [C] -> float32 scalar sum (autograd) ...
RowsSum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# ... or that sum with its float32 [C, V] gradient w.r.t. the student rows, by hand (may overwrite its inputs).
RowsSumAndGrad = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# A chunk's loss from (student rows [C, V] in the input dtype, batch ids [C], position ids [C]): a float32
# scalar sum over the rows (differentiable, autograd) ...
_ChunkSum = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# ... or that sum together with its float32 gradient [C, V] w.r.t. the rows, derived by hand. May reuse the
# rows' memory: it is only ever given a fresh gathered copy.
_ChunkSumAndGrad = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------------------------------ public API


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    kind: Divergence = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    top_k: int | None = None,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """Masked mean over tokens of a divergence between teacher and student next-token distributions.

    ``p_t = softmax(teacher_logits / T)`` and ``p_s = softmax(student_logits / T)`` per token; the result is
    ``T**2 * sum_{masked tokens} D(p_t, p_s) / n_masked``. The ``T**2`` factor (Hinton et al., 2015) keeps
    the gradient magnitude roughly independent of T, since the soft targets' gradients scale as ``1/T**2``;
    it is applied to every kind alike so that switching ``kind`` never changes the scaling contract (at the
    default T = 1 it is a no-op).

    Generalised JSD follows the GKD paper and current TRL ``GKDTrainer.generalized_jsd_loss`` (some earlier
    TRL releases weighted the mixture the other way round, ``beta * p_s + (1 - beta) * p_t``)::

        M = beta * p_t + (1 - beta) * p_s
        JSD(beta) = beta * KL(p_t || M) + (1 - beta) * KL(p_s || M)

    ``beta = 0.5`` is the symmetric Jensen-Shannon divergence. Both terms vanish at the end points, but
    ``JSD(beta) / beta -> KL(p_t || p_s)`` (forward KL) as ``beta -> 0`` and
    ``JSD(beta) / (1 - beta) -> KL(p_s || p_t)`` (reverse KL) as ``beta -> 1``; as in TRL, ``beta = 0`` and
    ``beta = 1`` exactly *are* forward and reverse KL (unscaled), so a TRL recipe's beta means the same here.
    Note the jump: ``beta = 1e-3`` gives about ``1e-3 * forward KL``.

    Skew divergences follow DistiLLM: with ``a = alpha``, ``skew_kl = KL(p_t || a*p_t + (1-a)*p_s)`` and
    ``skew_reverse_kl = KL(p_s || a*p_s + (1-a)*p_t)``; ``alpha = 0`` gives forward / reverse KL, and
    ``alpha = 1`` gives 0.

    Vocabulary ids whose teacher logit is ``-inf`` (banned or padded ids) are outside the comparison: the
    student is renormalised over the teacher's finite ids, exactly as ``top_k`` renormalises both models over
    the teacher's top-k ids. This keeps every kind finite (the true reverse KL is +inf as soon as the student
    puts mass where the teacher has none) and gives those ids zero gradient. A token whose teacher logits are
    all ``-inf`` compares two uniform distributions and contributes 0.

    Args:
        student_logits: ``[B, L, V]``, any float dtype; all arithmetic is float32.
        teacher_logits: ``[B, L, V]``; treated as constant (no gradient flows into it).
        mask: ``[B, L]`` bool or 0/1: the tokens that count (real tokens; response tokens only for SFT data).
            Causal LMs predict token i+1 at position i, so pass the mask aligned with the logits.
        kind: one of :data:`DIVERGENCES`.
        temperature: T > 0, dividing both models' logits.
        beta: JSD(beta) mixing weight in [0, 1] (``jsd`` only).
        alpha: skew mixing weight in [0, 1] (``skew_kl`` and ``skew_reverse_kl`` only).
        top_k: keep only the teacher's ``top_k`` logits per token (1 <= top_k <= V) and renormalise both
            distributions over those ids; None compares full distributions.
        chunk_size: masked tokens per chunk; None computes all tokens at once with plain autograd (the
            reference the chunked path is tested against; it holds ``[n_masked, V]`` float32 intermediates).

    Returns:
        Float32 scalar. If no token is masked in, a zero that still depends on ``student_logits`` so that
        ``backward()`` works on every rank.

    Raises:
        ValueError: unknown ``kind``; mismatched shapes (in particular different vocabulary sizes, i.e.
            different tokenizers); a mask of the wrong shape or with values other than 0/1; ``temperature``,
            ``beta``, ``alpha``, ``top_k`` or ``chunk_size`` out of range.
    """
    _check_logits(student_logits, teacher_logits)
    rows_sum, rows_sum_and_grad = divergence_rows(kind, student_logits.shape[-1], temperature, beta, alpha, top_k)
    _check_chunk_size(chunk_size)
    keep = _check_mask(mask, tuple(student_logits.shape[:2]))

    teacher_logits = teacher_logits.detach()
    if rows_sum is None:  # identically 0, with no dependence on the student
        return student_logits.sum().float() * 0.0

    def chunk_sum(student_rows: torch.Tensor, b: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        return rows_sum(student_rows, teacher_logits[b, l])

    def chunk_sum_and_grad(
        student_rows: torch.Tensor, b: torch.Tensor, l: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rows_sum_and_grad(student_rows, teacher_logits[b, l])

    return _masked_row_mean(
        student_logits, keep, chunk_sum, chunk_sum_and_grad, chunk_size, scale=temperature**2
    )


def divergence_rows(
    kind: Divergence,
    vocab: int,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    top_k: int | None = None,
) -> tuple[RowsSum | None, RowsSumAndGrad | None]:
    """The per-chunk math of :func:`token_divergence`, for callers that produce the logit rows themselves.

    Validates the parameters exactly as :func:`token_divergence` does and returns two functions of
    ``(student rows [C, V], teacher rows [C, V])``: the summed divergence with plain autograd (the reference),
    and that sum together with its float32 ``[C, V]`` gradient w.r.t. the student rows, derived by hand (the
    memory-lean path; it may overwrite both inputs, so give it fresh rows). Neither applies the ``T**2`` scale
    or the mean. ``(None, None)`` means the divergence is identically 0 (skew divergences at ``alpha = 1``).
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence kind {kind!r}; valid choices: {', '.join(DIVERGENCES)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0")
    for name, value in (("beta", beta), ("alpha", alpha)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value!r} must lie in [0, 1]")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab):
        raise ValueError(f"top_k={top_k!r} must be None or an integer in [1, V={vocab}]")
    if kind in ("skew_kl", "skew_reverse_kl") and alpha == 1.0:
        # The mixture is the first distribution itself.
        return None, None

    def rows_sum(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return _row_divergence(student, teacher, kind, temperature, beta, alpha, top_k).sum()

    def rows_sum_and_grad(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _divergence_sum_and_grad(student, teacher, kind, temperature, beta, alpha, top_k)

    return rows_sum, rows_sum_and_grad


def chunked_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens, in chunks (the hard-label term of LM distillation).

    Callers pass already-shifted tensors: ``logits[:, :-1]`` with ``labels[:, 1:]`` (slices are fine; nothing
    is copied for them). Tokens labelled :data:`IGNORE_INDEX` (-100) are skipped, so padding and prompt
    tokens cost nothing. Same memory discipline as :func:`token_divergence`.

    Args:
        logits: ``[B, L, V]`` student logits, any float dtype; the loss is computed in float32.
        labels: ``[B, L]`` integer token ids in ``[0, V)``, or -100 for tokens that do not count.
        chunk_size: labelled tokens per chunk; None = one plain-autograd pass (the reference).

    Returns:
        Float32 scalar: summed token cross-entropy divided by the number of labelled tokens (a zero with a
        gradient path if there is none).

    Raises:
        ValueError: ``logits`` not ``[B, L, V]`` float, ``labels`` not ``[B, L]`` integer, a label outside
            ``[0, V)`` other than -100, or ``chunk_size`` < 1.
    """
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float [B, L, V] tensor, got {logits.dtype} {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2] or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an integer [B, L] tensor matching logits {tuple(logits.shape)}, "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    _check_chunk_size(chunk_size)
    vocab = logits.shape[-1]
    keep = labels != IGNORE_INDEX
    kept = labels[keep]
    bad = kept[(kept < 0) | (kept >= vocab)]
    if bad.numel():
        raise ValueError(f"label {bad[0].item()} is out of range: labels must be in [0, V={vocab}) or {IGNORE_INDEX}")

    def chunk_sum(rows: torch.Tensor, b: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        return cross_entropy_rows_sum(rows, labels[b, l])

    def chunk_sum_and_grad(rows: torch.Tensor, b: torch.Tensor, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cross_entropy_rows_sum_and_grad(rows, labels[b, l])

    return _masked_row_mean(logits, keep, chunk_sum, chunk_sum_and_grad, chunk_size, scale=1.0)


def cross_entropy_rows_sum(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed float32 cross-entropy of logit rows ``[C, V]`` against token ids ``[C]`` (plain autograd)."""
    return F.cross_entropy(rows.float(), targets, reduction="sum")


def cross_entropy_rows_sum_and_grad(rows: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy_rows_sum` and its float32 ``[C, V]`` gradient w.r.t. ``rows``, by hand.

    ``rows`` may be overwritten (float32 rows are used in place): give it a fresh tensor.
    """
    s = rows.float()  # [C, V]
    target = targets.unsqueeze(-1)  # [C, 1]
    lse = s.logsumexp(-1, keepdim=True)  # [C, 1]
    total = (lse - s.gather(-1, target)).sum()
    grad = s.sub_(lse).exp_()  # softmax(s) - onehot(label), in place
    grad.scatter_add_(-1, target, grad.new_full(target.shape, -1.0))
    return total, grad


# ------------------------------------------------------------------------------------------ the math


def _row_divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    temperature: float,
    beta: float,
    alpha: float,
    top_k: int | None,
) -> torch.Tensor:
    """Per-row divergence of ``[R, V]`` logit rows -> ``[R]``, in float32."""
    s = student.float()  # [R, V]
    t = teacher.float()  # [R, V]
    if temperature != 1.0:
        s = s / temperature
        t = t / temperature
    if top_k is not None:
        t, ids = t.topk(top_k, dim=-1)  # [R, k]
        s = s.gather(-1, ids)  # [R, k]
    # Teacher -inf ids leave the comparison for both models (see token_divergence); _LOG_ZERO keeps it finite.
    excluded = torch.isneginf(t)
    t = t.masked_fill(excluded, _LOG_ZERO)
    s = s.masked_fill(excluded, _LOG_ZERO)
    log_ps = F.log_softmax(s, dim=-1)
    log_pt = F.log_softmax(t, dim=-1)

    if kind == "forward_kl":
        return _kl(log_pt, log_ps)
    if kind == "reverse_kl":
        return _kl(log_ps, log_pt)
    if kind == "jsd":
        # TRL's end points: exactly forward / reverse KL rather than the (vanishing) formula.
        if beta == 0.0:
            return _kl(log_pt, log_ps)
        if beta == 1.0:
            return _kl(log_ps, log_pt)
        log_m = _log_mix(log_pt, log_ps, beta)
        return beta * _kl(log_pt, log_m) + (1.0 - beta) * _kl(log_ps, log_m)
    if kind == "skew_kl":
        return _kl(log_pt, _log_mix(log_pt, log_ps, alpha))
    if kind == "skew_reverse_kl":
        return _kl(log_ps, _log_mix(log_ps, log_pt, alpha))
    if kind == "tvd":
        return 0.5 * (log_pt.exp() - log_ps.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence kind {kind!r}; valid choices: {', '.join(DIVERGENCES)}")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row from log-probabilities ``[R, V]`` -> ``[R]``."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, a: float) -> torch.Tensor:
    """``log(a * p + (1 - a) * q)`` without leaving log space (no underflow for tiny probabilities)."""
    if a == 0.0:
        return log_q
    if a == 1.0:
        return log_p
    # logaddexp is elementwise: no stacked [2, R, V] copy as with logsumexp(torch.stack(...)).
    return torch.logaddexp(log_p + math.log(a), log_q + math.log1p(-a))


def _divergence_sum_and_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    temperature: float,
    beta: float,
    alpha: float,
    top_k: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed divergence of ``[C, V]`` logit rows and its gradient w.r.t. the student rows, by hand.

    The memory-lean twin of :func:`_row_divergence` (which, with autograd, is the reference it is tested
    against): every step works in place, so at most four ``[C, V]`` float32 buffers are alive at once where
    autograd keeps about nine, and there is no graph to build. With ``g = dD/d(log p_s)`` per id, the chain
    rule through ``log_softmax`` gives ``dD/ds = g - p_s * sum(g)`` for the tempered logits ``s``:

    - forward KL: ``g = -p_t``, so ``p_s - p_t``.
    - reverse KL: ``g = p_s (r + 1)`` with ``r = log p_s - log p_t``, so ``p_s (r - KL)``.
    - JSD(beta): ``g = (1 - beta) p_s (log p_s - log m)`` (the other terms cancel because ``m`` is the mixture).
    - skew KL: ``g = -(1 - a) p_t p_s / m``.
    - skew reverse KL: ``g = p_s (log p_s - log m + 1 - a p_s / m)``.
    - TVD: ``g = -0.5 sign(p_t - p_s) p_s`` (sign(0) = 0, the subgradient autograd's ``abs`` uses).

    Args:
        student: ``[C, V]`` gathered rows (a fresh copy; its memory may be reused).
        teacher: ``[C, V]`` gathered rows (a fresh copy).

    Returns:
        (float32 scalar sum over the rows, float32 ``[C, V]`` gradient w.r.t. ``student``).
    """
    rows, vocab = student.shape
    s = student.float()  # [C, V]
    t = teacher.float()  # [C, V]
    if temperature != 1.0:
        s = s.div_(temperature)
        t = t.div_(temperature)
    ids = None
    if top_k is not None:
        t, ids = t.topk(top_k, dim=-1)  # [C, k]
        s = s.gather(-1, ids)  # [C, k]
    excluded = torch.isneginf(t)
    log_pt = t.masked_fill_(excluded, _LOG_ZERO)
    log_ps = s.masked_fill_(excluded, _LOG_ZERO)
    del excluded
    log_pt = log_pt.sub_(log_pt.logsumexp(-1, keepdim=True))  # in-place log_softmax
    log_ps = log_ps.sub_(log_ps.logsumexp(-1, keepdim=True))

    # The end points that reduce to plain KL (TRL's JSD convention; DistiLLM's skew at alpha = 0).
    if (kind == "jsd" and beta == 0.0) or (kind == "skew_kl" and alpha == 0.0):
        kind = "forward_kl"
    elif (kind == "jsd" and beta == 1.0) or (kind == "skew_reverse_kl" and alpha == 0.0):
        kind = "reverse_kl"

    if kind == "forward_kl":
        p_t = log_pt.exp()
        total = log_pt.sub_(log_ps).mul_(p_t).sum()
        grad = log_ps.exp_().sub_(p_t)
    elif kind == "reverse_kl":
        r = log_pt.neg_().add_(log_ps)  # log p_s - log p_t
        p_s = log_ps.exp_()
        kl = (p_s * r).sum(-1, keepdim=True)  # [C, 1]
        total = kl.sum()
        grad = r.sub_(kl).mul_(p_s)
    elif kind == "jsd":
        log_m = _log_mix_new(log_pt, log_ps, beta)
        p_t = log_pt.exp()
        kl_t = log_pt.sub_(log_m).mul_(p_t).sum()
        del p_t, log_pt
        g = log_m.neg_().add_(log_ps)  # log p_s - log m
        p_s = log_ps.exp_()
        g = g.mul_(p_s)  # p_s (log p_s - log m): per-id KL(p_s || m) terms, and g / (1 - beta)
        kl_s = g.sum(-1, keepdim=True)  # [C, 1]
        total = beta * kl_t + (1.0 - beta) * kl_s.sum()
        grad = g.sub_(p_s.mul_(kl_s)).mul_(1.0 - beta)
    elif kind == "skew_kl":
        log_m = _log_mix_new(log_pt, log_ps, alpha)
        ratio = log_pt - log_m
        log_w = log_m.neg_().add_(log_pt).add_(log_ps)  # log(p_t p_s / m)
        p_t = log_pt.exp_()
        total = ratio.mul_(p_t).sum()
        del ratio, p_t, log_pt
        g = log_w.exp_().mul_(-(1.0 - alpha))
        p_s = log_ps.exp_()
        grad = g.sub_(p_s.mul_(g.sum(-1, keepdim=True)))
    elif kind == "skew_reverse_kl":
        log_m = _log_mix_new(log_ps, log_pt, alpha)
        del log_pt
        r = log_m.neg_().add_(log_ps)  # log p_s - log m
        p_s = log_ps.exp_()
        p_r = p_s * r
        total = p_r.sum()
        g = r.exp_().mul_(-alpha).add_(1.0).mul_(p_s).add_(p_r)  # p_s (1 - a p_s / m) + p_s r
        del p_r
        grad = g.sub_(p_s.mul_(g.sum(-1, keepdim=True)))
    elif kind == "tvd":
        p_s = log_ps.exp_()
        d = log_pt.exp_().sub_(p_s)  # p_t - p_s
        total = 0.5 * d.abs().sum()
        g = d.sign_().mul_(p_s).mul_(-0.5)
        grad = g.sub_(p_s.mul_(g.sum(-1, keepdim=True)))
    else:
        raise ValueError(f"unknown divergence kind {kind!r}; valid choices: {', '.join(DIVERGENCES)}")

    if temperature != 1.0:
        grad = grad.div_(temperature)  # d/dz = d/ds / T for s = z / T
    if ids is not None:
        grad = grad.new_zeros(rows, vocab).scatter_(-1, ids, grad)  # ids outside the top-k get no gradient
    return total, grad


def _log_mix_new(log_p: torch.Tensor, log_q: torch.Tensor, a: float) -> torch.Tensor:
    """:func:`_log_mix` for 0 < a < 1 into one new buffer (the inputs are left untouched)."""
    out = log_p + math.log(a)
    return torch.logaddexp(out, log_q + math.log1p(-a), out=out)


# ------------------------------------------------------------------------------------------ chunking


def _masked_row_mean(
    logits: torch.Tensor,
    keep: torch.Tensor,
    chunk_sum: _ChunkSum,
    chunk_sum_and_grad: _ChunkSumAndGrad,
    chunk_size: int | None,
    scale: float,
) -> torch.Tensor:
    """``scale * sum_rows(loss) / n_kept`` over the ``[B, L]`` positions where ``keep`` is set.

    ``chunk_size=None`` is one plain-autograd pass (the reference); otherwise chunks of ``chunk_size`` kept
    rows go through :class:`_ChunkedRowLoss` when a gradient is needed, or a no-grad loop when it is not.
    """
    b_idx, l_idx = keep.nonzero(as_tuple=True)  # [M], [M]: only these rows are ever read
    n_kept = b_idx.numel()
    if n_kept == 0:
        return logits.sum().float() * 0.0
    scale = scale / n_kept
    if chunk_size is None:
        return chunk_sum(logits[b_idx, l_idx], b_idx, l_idx) * scale
    if torch.is_grad_enabled() and logits.requires_grad:
        return _ChunkedRowLoss.apply(logits, b_idx, l_idx, chunk_sum_and_grad, chunk_size, scale)
    with torch.no_grad():
        total = logits.new_zeros((), dtype=torch.float32)
        for start in range(0, n_kept, chunk_size):
            b, l = b_idx[start : start + chunk_size], l_idx[start : start + chunk_size]
            total += chunk_sum(logits[b, l], b, l)
        return total * scale


class _ChunkedRowLoss(torch.autograd.Function):
    """Forward computes the loss *and* its gradient chunk by chunk; backward only rescales the stored gradient.

    Why this and not ``torch.utils.checkpoint`` around each chunk: the gradient w.r.t. the logits has to
    exist in full (``[B, L, V]``, input dtype) during the backward pass anyway, and storing it is all this
    needs. Checkpointing would instead keep the student *and* teacher logits alive until backward, recompute
    every chunk's forward under autograd (about nine ``[C, V]`` float32 buffers per chunk instead of the four
    of the hand-derived gradient) and accumulate one ``[B, L, V]`` index-backward result per chunk
    (transiently two or three logit-sized buffers). Here the peak is: inputs + one logit-sized gradient
    buffer + one chunk's float32 working set, and the teacher logits (and the student's, if the caller drops
    them) can be freed right after the forward. The cost: the gradient is computed even if backward never
    runs, so this path is only taken when grad mode is on and the logits require grad; double backward is not
    supported.
    """

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,  # [B, L, V]
        b_idx: torch.Tensor,  # [M]
        l_idx: torch.Tensor,  # [M]
        chunk_sum_and_grad: _ChunkSumAndGrad,
        chunk_size: int,
        scale: float,
    ) -> torch.Tensor:
        grad = torch.zeros_like(logits, memory_format=torch.contiguous_format)  # [B, L, V], input dtype
        total = logits.new_zeros((), dtype=torch.float32)
        for start in range(0, b_idx.numel(), chunk_size):
            b, l = b_idx[start : start + chunk_size], l_idx[start : start + chunk_size]
            part, rows_grad = chunk_sum_and_grad(logits[b, l], b, l)
            total += part
            # Scale in float32, then round once to the input dtype, as autograd through .float() would.
            grad[b, l] = rows_grad.mul_(scale).to(grad.dtype)
            del rows_grad
        ctx.save_for_backward(grad)
        return total * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        # In place: no second logit-sized buffer. A second backward through the same graph would see the
        # scaled buffer, so autograd's version check makes that an error instead of a silent wrong gradient.
        grad.mul_(grad_output)
        return grad, None, None, None, None, None


# ------------------------------------------------------------------------------------------ validation


def _check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    shapes = f"student_logits {tuple(student.shape)}, teacher_logits {tuple(teacher.shape)}"
    if student.dim() != 3 or teacher.dim() != 3:
        raise ValueError(f"logits must be [B, L, V]; got {shapes}")
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"vocabulary size mismatch: student V={student.shape[-1]} vs teacher V={teacher.shape[-1]} ({shapes}); "
            "teacher and student must share a tokenizer"
        )
    if student.shape != teacher.shape:
        raise ValueError(f"logit shapes differ: {shapes}")
    if not (student.is_floating_point() and teacher.is_floating_point()):
        raise ValueError(f"logits must be floating point, got student {student.dtype} and teacher {teacher.dtype}")


def _check_mask(mask: torch.Tensor, batch_shape: tuple[int, int]) -> torch.Tensor:
    """Validate a ``[B, L]`` bool or 0/1 mask and return it as bool."""
    if tuple(mask.shape) != batch_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the logits' [B, L] = {batch_shape}")
    if mask.dtype == torch.bool:
        return mask
    keep = mask != 0
    if bool((keep & (mask != 1)).any()):
        bad = mask[keep & (mask != 1)][0].item()
        raise ValueError(f"mask must be bool or 0/1, found value {bad!r}")
    return keep


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be None (unchunked) or an integer >= 1")
