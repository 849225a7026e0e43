"""Attention-map losses computed in blocks of query rows, with a hand-derived gradient.

The plain implementation (:func:`scaledkd.losses.attention.row_kl` on :func:`~scaledkd.losses.attention.scores`)
builds float32 ``[B, H, L, L]`` scores for both models, masked copies, two log-softmaxes, an exponential and a
product, and autograd keeps most of them until the backward pass: memory grows with ``L^2`` per layer pair. Here
the ``L`` query rows are visited ``block_size`` at a time; per block the teacher's and the student's scores
``[B, H, b, L]`` are formed, reduced to the block's share of the loss, and turned straight into the block's share
of the gradient w.r.t. the student's ``q``, ``k`` (and bias, when it trains). Only those gradients (the size of
``q`` and ``k``: ``O(B H L d)``) outlive the forward pass; backward just scales them by the incoming gradient.
This is the pattern of :class:`scaledkd.losses.divergence._ChunkedRowLoss` (and of Liger's fused losses): the
loss is a scalar, so its input gradient is known once the forward has run, and storing it costs no more than
storing the inputs would, while a recomputing backward would pay for the scores twice.

Gradients (rows ``i``, keys ``j``, student scores ``a_s = q_s k_s^T / sqrt(d_s) + bias_s``):

- masked row KL, ``sum_i w_i KL(softmax(a_t[i]) || softmax(a_s[i]))`` over allowed keys:
  ``dL/da_s[i, j] = w_i (p_s[i, j] - p_t[i, j])`` (zero at disallowed keys, where both probabilities are 0);
- masked squared error, ``sum_ij m_ij (a_s - a_t)^2 / n``: ``dL/da_s = 2 m (a_s - a_t) / n``;

and with ``G = dL/da_s``: ``dq_s = G k_s / sqrt(d_s)``, ``dk_s = G^T q_s / sqrt(d_s)``, ``dbias_s = G`` summed over
the bias's broadcast dims. The target side (teacher, or CR-ILD's clean forward) is a constant.

Masks follow the reference exactly: disallowed entries (padded keys, future keys when causal) become
``finfo(float32).min`` before the softmax (added rather than filled in, which rounds to the same value for any
finite score), so a row whose keys are all disallowed gets the same uniform distribution on both sides, a KL of 0
and a gradient of 0; query rows outside ``query_mask`` add nothing. Scores must be finite, as the models' are.

Working set per block: about four float32 ``[B, H, b, L]`` buffers (``b = block_size``). On CUDA a fused
(Triton / flash-style) kernel would replace :func:`_block_loop` one for one: the same inputs, the same
``(loss, dq, dk, dbias)`` outputs, never writing a ``[b, L]`` tile to global memory. None is written yet; this
PyTorch loop is the reference such a kernel would be tested against, and what runs on every device today.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

Heads = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # q [B, H, L, d], k [B, H, L, d], bias or None
Kind = Literal["kl", "mse"]

NEG = torch.finfo(torch.float32).min  # as the reference: finite, so masked log-probability differences stay finite
DEFAULT_BLOCK_SIZE = 128  # query rows per block: on CPU at L = 128-512 as fast as larger blocks, far less memory
# At most this many elements (16 MiB float32) per [B, H, b, L] buffer, fewer rows if needed: past glibc's largest
# mmap threshold (32 MiB) every buffer is a fresh mmap whose pages fault in on first touch, which measured 1.6x
# slower per step (B = 32, H = 12, L = 256: 128 rows 432 ms, 32 rows 267 ms on one thread).
BLOCK_ELEMENTS = 2**22


def check_block_size(block_size: int | None, where: str) -> None:
    """``block_size`` must be None (the plain reference path) or a positive integer number of query rows."""
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"{where}: block_size={block_size!r} must be null (plain reference path) or an integer >= 1")


def rows_per_block(block_size: int, batch: int, heads: int, length: int) -> int:
    """Query rows per block: ``block_size``, or fewer so that a ``[B, H, rows, L]`` buffer holds at most
    ``BLOCK_ELEMENTS`` elements; at least 1."""
    return max(1, min(block_size, BLOCK_ELEMENTS // (batch * heads * length)))


def blocked_row_kl(target: Heads, pred: Heads, key_mask: torch.Tensor, query_mask: torch.Tensor, causal: bool,
                   block_size: int) -> torch.Tensor:
    """Mean over real query rows and heads of ``KL(softmax(a_t) || softmax(a_s))``, ``a = q k^T / sqrt(d) + bias``.

    Equal (values and gradients) to ``row_kl(scores(*target), scores(*pred), key_mask(...), query_mask)``.

    Args:
        target, pred: ``(q [B, H, L, d], k [B, H, L, d], bias broadcastable to [B, H, L, L] or None)`` as
            :func:`~scaledkd.losses.attention.head_qk` returns them; ``d`` may differ between the two, ``H`` not.
            The target is a constant (it must not require grad).
        key_mask: ``[B, L]`` keys that take part in the softmax (padding off).
        query_mask: ``[B, L]`` query rows that count in the mean.
        causal: also exclude future keys (key ``j > `` query ``i``).
        block_size: query rows per block at most; fewer when one ``[B, H, b, L]`` float32 buffer would exceed
            ``BLOCK_ELEMENTS`` (at least one row).
    """
    return _blocked(target, pred, key_mask, query_mask, causal, block_size, "kl", masked=True)


def blocked_score_mse(target: Heads, pred: Heads, key_mask: torch.Tensor, query_mask: torch.Tensor, causal: bool,
                      block_size: int, masked: bool = True) -> torch.Tensor:
    """``sum((a_s - a_t)^2 * m) / n`` on pre-softmax scores, ``m`` = allowed keys of real query rows, ``[B, H, L, L]``.

    ``n`` is the number of entries in ``m`` (``masked=True``) or all ``B H L L`` entries (``masked=False``, the
    TinyBERT reference code's mean over the zero-filled map). Arguments as :func:`blocked_row_kl`.
    """
    return _blocked(target, pred, key_mask, query_mask, causal, block_size, "mse", masked=masked)


# ------------------------------------------------------------------------------------------------ internals


def _as4d(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A float32 view of ``bias`` with four dims (leading broadcast dims made explicit), or None."""
    if bias is None:
        return None
    if bias.dim() > 4:
        raise ValueError(f"a score bias must broadcast to [B, H, L, L]; got shape {tuple(bias.shape)}")
    return bias.float().reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


def _blocked(target: Heads, pred: Heads, key_mask: torch.Tensor, query_mask: torch.Tensor, causal: bool,
             block_size: int, kind: Kind, masked: bool) -> torch.Tensor:
    q_t, k_t, b_t = target
    q_s, k_s, b_s = pred
    check_block_size(block_size, "blocked attention loss")
    if q_s.shape[:3] != q_t.shape[:3] or k_s.shape != q_s.shape or k_t.shape != q_t.shape:
        raise ValueError(
            f"student q {tuple(q_s.shape)}, k {tuple(k_s.shape)} and teacher q {tuple(q_t.shape)}, "
            f"k {tuple(k_t.shape)} must be [B, H, L, d] with equal B, H, L (d may differ between the models)"
        )
    target_grad = [x for x in (q_t, k_t, b_t) if x is not None and x.requires_grad]
    if torch.is_grad_enabled() and target_grad:
        raise ValueError("the blocked attention losses treat the target's q/k/bias as constants, but one requires "
                         "grad; detach it, or use block_size: null for the plain autograd path")
    B, H, L, _ = q_s.shape
    keys, rows = key_mask.bool(), query_mask.bool()  # [B, L]
    if kind == "kl":
        denom = rows.sum() * H
    elif masked:  # allowed (query, key) entries of real rows: keys per row, a running count when causal
        per_row = keys.cumsum(-1) if causal else keys.sum(-1, keepdim=True)  # [B, L] or [B, 1]
        denom = (per_row * rows).sum() * H
    else:
        denom = torch.tensor(B * H * L * L)
    weight = rows.float() / denom.clamp_min(1).to(rows.device, torch.float32)  # [B, L]: a row's share of the mean
    block_size = rows_per_block(block_size, B, H, L)
    target = (q_t.float(), k_t.float(), _as4d(b_t))
    pred = (q_s.float(), k_s.float(), _as4d(b_s))
    wants = [torch.is_grad_enabled() and x is not None and x.requires_grad for x in pred]
    if pred[0] is pred[1]:  # a relation (q = k = X): one gradient buffer for both uses, returned through q
        wants[1] = False
    if not any(wants):
        with torch.no_grad():
            return _block_loop(target, pred, keys, weight, causal, block_size, kind, (False, False, False))[0]
    return _BlockedScoreLoss.apply(*pred, target, keys, weight, causal, block_size, kind, tuple(wants))


class _BlockedScoreLoss(torch.autograd.Function):
    """Forward computes the loss and its gradient w.r.t. the student's ``q``, ``k`` (and bias) block by block;
    backward scales the stored gradients by ``grad_output``. Saves ``O(B H L d)`` (plus the bias's own size when it
    trains); double backward is not supported."""

    @staticmethod
    def forward(ctx, q_s: torch.Tensor, k_s: torch.Tensor, b_s: torch.Tensor | None, target: Heads,
                keys: torch.Tensor, weight: torch.Tensor, causal: bool, block_size: int,
                kind: Kind, wants: tuple[bool, bool, bool]) -> torch.Tensor:
        total, grads = _block_loop(target, (q_s, k_s, b_s), keys, weight, causal, block_size, kind, wants)
        ctx.save_for_backward(*grads)
        ctx.wants = wants
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        # In place: a second backward through the same graph would see scaled buffers, so autograd's version
        # counter makes that an error instead of a silently wrong gradient.
        grads = [next(saved).mul_(grad_output) if want else None for want in ctx.wants]
        return (*grads, None, None, None, None, None, None, None)


def _block_loop(target: Heads, pred: Heads, keys: torch.Tensor, weight: torch.Tensor, causal: bool, block_size: int,
                kind: Kind, wants: tuple[bool, bool, bool]):
    """``(loss, [dq_s, dk_s, dbias_s] for those wanted)`` over all query blocks. Shapes as :func:`blocked_row_kl`,
    biases already 4-d float32; ``weight [B, L]`` is each query row's factor (0 for rows that do not count)."""
    q_t, k_t, b_t = target
    q_s, k_s, b_s = pred
    B, H, L, d_s = q_s.shape
    BH = B * H
    want_q, want_k, want_b = wants
    grad = any(wants)
    shared = q_s is k_s and want_q  # dq collects dk's terms too (the Function returns it for q only)
    # Heads flattened to [B*H, L, d] for bmm. 1/sqrt(d) goes onto q once (O(B H L d)) instead of onto every score
    # block; the scaled student q is also what dk needs.
    qc_s = q_s.reshape(BH, L, d_s).div(math.sqrt(d_s))
    qc_t = q_t.reshape(BH, L, q_t.shape[-1]).div(math.sqrt(q_t.shape[-1]))
    k_s3, k_t3 = k_s.reshape(BH, L, d_s), k_t.reshape(BH, L, k_t.shape[-1])
    # Skip the mask pass when no key is masked (unpadded, bidirectional: packed batches). Padded query rows need
    # no mask: their weight is 0, in the loss and in the gradient.
    mask_keys = causal or not bool(keys.all())
    pad = ~keys[:, None, None, :]  # [B, 1, 1, L] padded keys
    fixed = _mask_values(pad, kind) if mask_keys and not causal else None  # the same for every block
    dq = (q_s.new_zeros if shared else q_s.new_empty)(BH, L, d_s) if want_q else None  # else each row written once
    dk = q_s.new_zeros(BH, L, d_s) if want_k else None
    db = q_s.new_zeros(b_s.shape) if want_b else None
    total = q_s.new_zeros(())
    positions = torch.arange(L, device=q_s.device)
    for r0 in range(0, L, block_size):
        r1 = min(r0 + block_size, L)
        b = r1 - r0
        # Causal: keys past the block's last row are masked for all its rows, so they are left out altogether (about
        # half the work); a softmax over only masked-out keys (all-padding rows) is uniform either way: KL 0, G 0.
        kr = r1 if causal else L  # [B, H, b, kr] blocks
        mask = fixed
        if causal:
            mask = _mask_values(pad[..., :kr] | (positions[None, :kr] > positions[r0:r1, None]), kind)  # [B,1,b,kr]
        a_s = _scores(qc_s[:, r0:r1], k_s3[:, :kr], b_s, mask if kind == "kl" else None, r0, r1, H)  # [BH, b, kr]
        a_t = _scores(qc_t[:, r0:r1], k_t3[:, :kr], b_t, mask if kind == "kl" else None, r0, r1, H)
        w = weight[:, None, r0:r1].expand(B, H, b)  # [B, H, b]
        if kind == "kl":
            p_t, p_s = torch.softmax(a_t, dim=-1), torch.softmax(a_s, dim=-1)
            kl = _row_kl(a_t, a_s, p_t, p_s)  # [BH, b]
            del a_s, a_t
            total += (kl.view(B, H, b) * w).sum()
            g = p_s.sub_(p_t) if grad else None  # dL/da_s = w (p_s - p_t), w applied below
            del p_t, p_s
        else:
            g = a_s.sub_(a_t)  # a_s - a_t
            del a_t
            if mask is not None:
                g.view(B, H, b, kr).mul_(mask)
            total += (g.square().sum(-1).view(B, H, b) * w).sum()
            w = w * 2.0  # dL/da_s = 2 w (a_s - a_t) on allowed entries
        if grad:
            # The row weights are folded into the small [BH, b, d] factors, not the [BH, b, L] block:
            # dq = diag(w) G k / sqrt(d), dk = G^T diag(w) q / sqrt(d).
            wr = w.reshape(BH, b, 1)
            if want_q:
                dq_rows = torch.bmm(g, k_s3[:, :kr]).mul_(wr.div(math.sqrt(d_s)))
                if shared:
                    dq[:, r0:r1].add_(dq_rows)
                else:
                    dq[:, r0:r1] = dq_rows
            if want_k or shared:
                (dq if shared else dk)[:, :kr].baddbmm_(g.transpose(1, 2), qc_s[:, r0:r1] * wr)
            if want_b:
                _accumulate_bias(db, g.mul_(wr).view(B, H, b, kr), r0, r1)
        del g
    return total, [x.view(B, H, L, d_s) if x is not db else x for x in (dq, dk, db) if x is not None]


def _mask_values(off: torch.Tensor, kind: Kind) -> torch.Tensor:
    """Float form of the excluded entries ``off [B, 1, b or 1, L]`` (bool): ``finfo.min`` where excluded, else 0, to
    add to scores before a softmax (``kl``); 0 where excluded, else 1, to multiply a difference by (``mse``).

    Adding instead of ``masked_fill_`` (~10x slower on CPU with a broadcast mask) gives the reference's values
    exactly: ``a + finfo.min`` rounds to ``finfo.min`` for any ``|a| < 1e31``, so a masked entry is ``finfo.min``
    on both sides and their difference is 0 (scores must be finite, as in the reference).
    """
    return off.float().mul_(NEG) if kind == "kl" else (~off).float()


def _row_kl(a_t: torch.Tensor, a_s: torch.Tensor, p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """``KL(p_t || p_s)`` per row from the masked scores ``a [N, b, L]`` and their softmaxes, ``[N, b]``; overwrites
    ``a_t``.

    ``KL = sum_j p_t (a_t - a_s) + lse_s - lse_t``, with each ``lse = max_j a - log max_j p`` read off the softmax
    (exact: ``log p_j = a_j - lse`` at the arg-max). Two softmaxes and read-only row reductions replace the
    reference's two log-softmaxes and two exponentials (about 3x fewer float32 passes over the block). The maxima
    are subtracted before the logs are added so that nearly equal distributions (KL ~ 1e-5) keep their digits:
    measured against float64 the per-row error stays ~2e-6, close to the reference's. Masked keys have
    ``p_t = 0`` and ``a_t - a_s = finfo.min - finfo.min = 0``; an all-masked row has equal maxima and uniform
    ``p`` on both sides, so its KL is 0 as in the reference.
    """
    shift = (a_s.amax(-1) - a_t.amax(-1)).add_(p_t.amax(-1).log_().sub_(p_s.amax(-1).log_()))  # lse_s - lse_t
    return a_t.sub_(a_s).mul_(p_t).sum(-1).add_(shift)


def _scores(qc: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor | None, r0: int,
            r1: int, heads: int) -> torch.Tensor:
    """Scores of query rows ``r0:r1`` against the first ``kr`` keys: ``qc [BH, b, d] @ k [BH, kr, d]^T + bias +
    mask``, ``[BH, b, kr]`` (``qc`` already divided by sqrt(d); ``mask`` additive, ``[B, 1, b or 1, kr]``)."""
    a = torch.bmm(qc, k.transpose(1, 2))
    if bias is not None or mask is not None:
        kr = a.shape[-1]
        a4 = a.view(-1, heads, r1 - r0, kr)  # [B, H, b, kr]
        if bias is not None:
            a4.add_(bias[_window(bias, r0, r1, kr)])
        if mask is not None:
            a4.add_(mask)
    return a


def _accumulate_bias(db: torch.Tensor, g: torch.Tensor, r0: int, r1: int) -> None:
    """Add the block's score gradient ``g [B, H, b, kr]`` (rows ``r0:r1``, the first ``kr`` keys) into ``db`` (the
    4-d bias's shape), summing the dims the bias broadcasts over."""
    dims = [i for i in (0, 1, 2, 3) if db.shape[i] == 1 and g.shape[i] != 1]
    db[_window(db, r0, r1, g.shape[3])].add_(g.sum(dims, keepdim=True) if dims else g)


def _window(bias: torch.Tensor, r0: int, r1: int, kr: int) -> tuple[slice, ...]:
    """Index of query rows ``r0:r1`` and keys ``:kr`` in a 4-d bias, leaving its broadcast (size-1) dims whole."""
    rows = slice(r0, r1) if bias.shape[2] != 1 else slice(None)
    keys = slice(0, kr) if bias.shape[3] != 1 else slice(None)
    return slice(None), slice(None), rows, keys
