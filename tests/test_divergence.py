"""Invariants of the decoder-LM logit divergences (scaledkd/losses/divergence.py).

The chunked path computes gradients by hand inside a custom autograd.Function; the unchunked path
(chunk_size=None) is plain autograd. Matching the two (values and gradients) is the main check; the
direct-formula tests pin down which distribution sits where in each definition.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scaledkd.losses.divergence import DIVERGENCES, chunked_cross_entropy, token_divergence

B, L, V = 2, 7, 50


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (2.0 * torch.randn(B, L, V, generator=g)).to(dtype)  # [B, L, V]
    teacher = (3.0 * torch.randn(B, L, V, generator=g)).to(dtype)  # [B, L, V]
    mask = torch.rand(B, L, generator=g) > 0.3  # [B, L]
    mask[0, 0] = mask[1, -1] = False  # masked-out tokens at both ends
    mask[0, 1] = True
    return student, teacher, mask


def _loss_and_grad(student, teacher, mask, **kw):
    s = student.detach().clone().requires_grad_()
    loss = token_divergence(s, teacher, mask, **kw)
    loss.backward()
    return loss.detach(), s.grad


def _log_probs64(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1)


def _kl64(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Direct ``sum_v p (log p - log q)`` in float64, per token."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return per_token[mask].sum() / mask.sum()


# ------------------------------------------------------------------------------------------ chunking


@pytest.mark.parametrize("chunk_size", [1, 3, 256])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_chunked_equals_unchunked(kind, chunk_size):
    s, t, m = _inputs()
    ref, ref_grad = _loss_and_grad(s, t, m, kind=kind, chunk_size=None)
    out, grad = _loss_and_grad(s, t, m, kind=kind, chunk_size=chunk_size)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_chunked_equals_unchunked_with_temperature_top_k_and_masked_vocab(kind):
    s, t, m = _inputs(seed=1)
    t[0, :, 3:8] = float("-inf")  # banned ids for every token of sequence 0
    t[1, 2, :45] = float("-inf")  # only 5 allowed ids: fewer than top_k
    for kw in (dict(temperature=2.0), dict(top_k=10), dict(temperature=0.5, top_k=7, beta=0.2, alpha=0.3)):
        ref, ref_grad = _loss_and_grad(s, t, m, kind=kind, chunk_size=None, **kw)
        out, grad = _loss_and_grad(s, t, m, kind=kind, chunk_size=3, **kw)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("kind", ["jsd", "skew_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("weight", [0.0, 0.25, 1.0])
def test_chunked_equals_unchunked_at_mixing_end_points(kind, weight):
    s, t, m = _inputs(seed=2)
    kw = dict(kind=kind, beta=weight, alpha=weight)
    ref, ref_grad = _loss_and_grad(s, t, m, chunk_size=None, **kw)
    out, grad = _loss_and_grad(s, t, m, chunk_size=2, **kw)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_no_grad_path_matches(kind):
    s, t, m = _inputs(seed=3)
    ref = token_divergence(s, t, m, kind=kind, chunk_size=None)
    with torch.no_grad():
        torch.testing.assert_close(token_divergence(s.requires_grad_(), t, m, kind=kind, chunk_size=3), ref)


def test_upstream_weight_scales_gradient():
    s, t, m = _inputs()
    _, grad = _loss_and_grad(s, t, m, chunk_size=3)
    s2 = s.clone().requires_grad_()
    (0.3 * token_divergence(s2, t, m, chunk_size=3)).backward()
    torch.testing.assert_close(s2.grad, 0.3 * grad)


def test_second_backward_fails_loudly():
    # The stored gradient is rescaled in place, so a second pass must error rather than be silently wrong.
    s, t, m = _inputs()
    s.requires_grad_()
    loss = token_divergence(s, t, m, chunk_size=3)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_non_contiguous_logits():
    s, t, m = _inputs()
    full = s.detach().clone().requires_grad_()
    shifted = full[:, :-1]  # the usual causal shift: a strided view, not a copy
    loss = token_divergence(shifted, t[:, :-1], m[:, :-1], chunk_size=2)
    loss.backward()
    ref, ref_grad = _loss_and_grad(s[:, :-1].contiguous(), t[:, :-1], m[:, :-1], chunk_size=None)
    torch.testing.assert_close(loss.detach(), ref)
    torch.testing.assert_close(full.grad[:, :-1], ref_grad)
    assert torch.all(full.grad[:, -1] == 0)


def test_teacher_gets_no_gradient():
    s, t, m = _inputs()
    t.requires_grad_()
    s.requires_grad_()
    for chunk_size in (None, 3):
        token_divergence(s, t, m, kind="jsd", chunk_size=chunk_size).backward()
        assert t.grad is None


# ------------------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_zero_at_equal_distributions_and_nonnegative(kind, chunk_size):
    s, t, m = _inputs()
    same = token_divergence(t, t, m, kind=kind, chunk_size=chunk_size)
    torch.testing.assert_close(same, torch.tensor(0.0), atol=1e-6, rtol=0)
    shifted = token_divergence(t + 5.0, t, m, kind=kind, chunk_size=chunk_size)  # softmax is shift invariant
    torch.testing.assert_close(shifted, torch.tensor(0.0), atol=1e-5, rtol=0)
    for seed in range(3):
        s, t, m = _inputs(seed)
        assert token_divergence(s, t, m, kind=kind, chunk_size=chunk_size) > 0


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_against_direct_formulas(chunk_size):
    s, t, m = _inputs()
    log_ps, log_pt = _log_probs64(s), _log_probs64(t)
    p_s, p_t = log_ps.exp(), log_pt.exp()
    a, beta = 0.3, 0.2
    m_jsd = (beta * p_t + (1 - beta) * p_s).log()
    direct = {
        "forward_kl": (p_t * (log_pt - log_ps)).sum(-1),
        "reverse_kl": (p_s * (log_ps - log_pt)).sum(-1),
        "jsd": beta * _kl64(log_pt, m_jsd) + (1 - beta) * _kl64(log_ps, m_jsd),
        "skew_kl": _kl64(log_pt, (a * p_t + (1 - a) * p_s).log()),
        "skew_reverse_kl": _kl64(log_ps, (a * p_s + (1 - a) * p_t).log()),
        "tvd": 0.5 * (p_t - p_s).abs().sum(-1),
    }
    assert set(direct) == set(DIVERGENCES)
    for kind, per_token in direct.items():
        got = token_divergence(s, t, m, kind=kind, beta=beta, alpha=a, chunk_size=chunk_size)
        torch.testing.assert_close(got.double(), _masked_mean(per_token, m), rtol=1e-5, atol=1e-6, msg=kind)


def test_forward_kl_gradient_is_p_s_minus_p_t():
    s, t, m = _inputs()
    T = 2.0
    _, grad = _loss_and_grad(s, t, m, temperature=T, chunk_size=3)
    expected = (torch.softmax(s / T, -1) - torch.softmax(t / T, -1)) * T / m.sum()  # T^2 * (1/T) / n
    torch.testing.assert_close(grad, expected * m.unsqueeze(-1))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_jsd_end_points_and_limits(chunk_size):
    s, t, m = _inputs()
    s, t = s / 2, t / 3  # unit-scale logits: the limits converge once beta (or 1 - beta) << min p_t / p_s
    fkl = token_divergence(s, t, m, kind="forward_kl", chunk_size=chunk_size)
    rkl = token_divergence(s, t, m, kind="reverse_kl", chunk_size=chunk_size)
    # TRL's convention: exactly forward / reverse KL at the end points ...
    torch.testing.assert_close(token_divergence(s, t, m, kind="jsd", beta=0.0, chunk_size=chunk_size), fkl)
    torch.testing.assert_close(token_divergence(s, t, m, kind="jsd", beta=1.0, chunk_size=chunk_size), rkl)
    # ... which the formula approaches after dividing by the vanishing weight: JSD/beta -> forward KL,
    # JSD/(1 - beta) -> reverse KL, with an error shrinking with the weight.
    errors = []
    for eps in (1e-2, 1e-3):
        near0 = token_divergence(s, t, m, kind="jsd", beta=eps, chunk_size=chunk_size) / eps
        beta1 = 1.0 - eps
        near1 = token_divergence(s, t, m, kind="jsd", beta=beta1, chunk_size=chunk_size) / (1.0 - beta1)
        errors.append((abs(near0 / fkl - 1).item(), abs(near1 / rkl - 1).item()))
    assert errors[1][0] < errors[0][0] and errors[1][1] < errors[0][1]
    assert max(errors[1]) < 0.01
    # So a tiny beta gives a tiny loss, not forward KL: the end points are a jump (as in TRL).
    assert token_divergence(s, t, m, kind="jsd", beta=1e-3, chunk_size=chunk_size) < 0.01 * fkl


def test_skew_end_points():
    s, t, m = _inputs()
    fkl = token_divergence(s, t, m, kind="forward_kl")
    rkl = token_divergence(s, t, m, kind="reverse_kl")
    torch.testing.assert_close(token_divergence(s, t, m, kind="skew_kl", alpha=0.0), fkl)
    torch.testing.assert_close(token_divergence(s, t, m, kind="skew_reverse_kl", alpha=0.0), rkl)
    for kind in ("skew_kl", "skew_reverse_kl"):
        s1 = s.clone().requires_grad_()
        zero = token_divergence(s1, t, m, kind=kind, alpha=1.0)
        zero.backward()  # identically 0, but still differentiable
        assert zero.item() == 0.0 and torch.all(s1.grad == 0)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_jsd_symmetric_at_half(chunk_size):
    s, t, m = _inputs()
    a = token_divergence(s, t, m, kind="jsd", beta=0.5, chunk_size=chunk_size)
    b = token_divergence(t, s, m, kind="jsd", beta=0.5, chunk_size=chunk_size)
    torch.testing.assert_close(a, b)
    assert a <= math.log(2)  # JSD is bounded by log 2
    tvd_ab = token_divergence(s, t, m, kind="tvd", chunk_size=chunk_size)
    torch.testing.assert_close(tvd_ab, token_divergence(t, s, m, kind="tvd", chunk_size=chunk_size))


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_masked_out_tokens_do_not_matter(kind, chunk_size):
    s, t, m = _inputs()
    loss, grad = _loss_and_grad(s, t, m, kind=kind, chunk_size=chunk_size)
    s2, t2 = s.clone(), t.clone()
    s2[~m] = 100.0 * torch.randn_like(s2[~m])
    t2[~m] = float("nan")  # never read
    loss2, grad2 = _loss_and_grad(s2, t2, m, kind=kind, chunk_size=chunk_size)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(grad2, grad)
    assert torch.all(grad[~m] == 0)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_mask_dtypes_agree(kind):
    s, t, m = _inputs()
    ref = token_divergence(s, t, m, kind=kind)
    torch.testing.assert_close(token_divergence(s, t, m.long(), kind=kind), ref)
    torch.testing.assert_close(token_divergence(s, t, m.float(), kind=kind), ref)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_temperature_scaling(kind):
    s, t, m = _inputs()
    T = 3.0
    tempered = token_divergence(s, t, m, kind=kind, temperature=T, chunk_size=3)
    torch.testing.assert_close(tempered, T**2 * token_divergence(s / T, t / T, m, kind=kind, chunk_size=3))
    _, grad = _loss_and_grad(s, t, m, kind=kind, temperature=T, chunk_size=3)
    _, grad_pre = _loss_and_grad(s / T, t / T, m, kind=kind, chunk_size=3)
    torch.testing.assert_close(grad, T * grad_pre)  # T^2 scale, 1/T from d(z/T)/dz


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_top_k(kind, chunk_size):
    s, t, m = _inputs()
    full, full_grad = _loss_and_grad(s, t, m, kind=kind, chunk_size=chunk_size)
    all_k, all_k_grad = _loss_and_grad(s, t, m, kind=kind, top_k=V, chunk_size=chunk_size)
    torch.testing.assert_close(all_k, full)
    torch.testing.assert_close(all_k_grad, full_grad)
    # k < V: the same divergence over the teacher's top-k ids, both renormalised; no gradient elsewhere.
    k = 5
    ids = t.topk(k, dim=-1).indices  # [B, L, k]
    ref = token_divergence(s.gather(-1, ids), t.gather(-1, ids), m, kind=kind, chunk_size=None)
    got, grad = _loss_and_grad(s, t, m, kind=kind, top_k=k, chunk_size=chunk_size)
    torch.testing.assert_close(got, ref)
    assert torch.count_nonzero(grad) <= m.sum() * k


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_neg_inf_teacher_logits_are_excluded_ids(kind, chunk_size):
    s, t, m = _inputs()
    banned = torch.zeros(V, dtype=torch.bool)
    banned[[0, 7, 8, 49]] = True
    t_masked = t.masked_fill(banned, float("-inf"))
    loss, grad = _loss_and_grad(s, t_masked, m, kind=kind, chunk_size=chunk_size)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.all(grad[..., banned] == 0)
    # Same as comparing over the allowed ids only.
    ref, ref_grad = _loss_and_grad(s[..., ~banned], t[..., ~banned], m, kind=kind, chunk_size=chunk_size)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad[..., ~banned], ref_grad)
    # A token whose teacher allows nothing compares uniform with uniform: finite, zero.
    t_all = t.clone()
    t_all[0, 1] = float("-inf")
    loss_all, grad_all = _loss_and_grad(s, t_all, m, kind=kind, chunk_size=chunk_size)
    assert torch.isfinite(loss_all) and torch.isfinite(grad_all).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_bf16_inputs(kind):
    s, t, m = _inputs(dtype=torch.bfloat16)
    ref, ref_grad = _loss_and_grad(s, t, m, kind=kind, chunk_size=None)
    out, grad = _loss_and_grad(s, t, m, kind=kind, chunk_size=3)
    assert out.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)
    # Arithmetic is float32: the same as float32 inputs holding the bf16 values.
    out32, grad32 = _loss_and_grad(s.float(), t.float(), m, kind=kind, chunk_size=3)
    torch.testing.assert_close(out, out32)
    torch.testing.assert_close(grad, grad32.bfloat16())


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_empty_mask_gives_differentiable_zero(chunk_size):
    s, t, m = _inputs()
    loss, grad = _loss_and_grad(s, t, torch.zeros_like(m), chunk_size=chunk_size)
    assert loss.item() == 0.0 and torch.all(grad == 0)


# ------------------------------------------------------------------------------------------ errors


def test_errors():
    s, t, m = _inputs()
    with pytest.raises(ValueError, match="unknown divergence kind 'kl'.*forward_kl, reverse_kl, jsd"):
        token_divergence(s, t, m, kind="kl")
    with pytest.raises(ValueError, match=r"vocabulary size mismatch: student V=50 vs teacher V=49"):
        token_divergence(s, t[..., :-1], m)
    with pytest.raises(ValueError, match=r"student_logits \(2, 7, 50\), teacher_logits \(2, 6, 50\)"):
        token_divergence(s, t[:, :-1], m)
    with pytest.raises(ValueError, match=r"\[B, L, V\]"):
        token_divergence(s[0], t[0], m)
    with pytest.raises(ValueError, match=r"mask shape \(2, 6\)"):
        token_divergence(s, t, m[:, :-1])
    with pytest.raises(ValueError, match="0/1, found value 2"):
        token_divergence(s, t, m.long() * 2)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            token_divergence(s, t, m, temperature=bad)
    for name in ("beta", "alpha"):
        for bad in (-0.1, 1.5):
            with pytest.raises(ValueError, match=rf"{name}={bad}.*\[0, 1\]"):
                token_divergence(s, t, m, **{name: bad})
    for bad in (0, V + 1):
        with pytest.raises(ValueError, match=rf"top_k={bad}.*V=50"):
            token_divergence(s, t, m, top_k=bad)
    with pytest.raises(ValueError, match="chunk_size=0"):
        token_divergence(s, t, m, chunk_size=0)


# ------------------------------------------------------------------------------------------ cross-entropy


def _labels(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, -2:] = -100  # padding
    return labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 256])
def test_chunked_cross_entropy(chunk_size, dtype):
    s, _, _ = _inputs(dtype=dtype)
    labels = _labels()
    ref_in = s.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_in.float().reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    ref.backward()
    x = s.detach().clone().requires_grad_()
    out = chunked_cross_entropy(x, labels, chunk_size=chunk_size)
    out.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, ref_in.grad)


def test_chunked_cross_entropy_shifted_and_edge_cases():
    s, _, _ = _inputs()
    labels = _labels()
    x = s.clone().requires_grad_()
    out = chunked_cross_entropy(x[:, :-1], labels[:, 1:], chunk_size=2)  # the causal shift, as callers pass it
    ref = F.cross_entropy(s[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out, ref)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(x[:, :-1], labels[:, 1:], chunk_size=2), ref)
    x = s.clone().requires_grad_()
    zero = chunked_cross_entropy(x, torch.full((B, L), -100), chunk_size=2)
    zero.backward()
    assert zero.item() == 0.0 and torch.all(x.grad == 0)
    bad = labels.clone()
    bad[1, 0] = V
    with pytest.raises(ValueError, match=r"label 50 is out of range.*\[0, V=50\)"):
        chunked_cross_entropy(s, bad)
    with pytest.raises(ValueError, match="integer"):
        chunked_cross_entropy(s, labels.float())
    with pytest.raises(ValueError, match=r"\(2, 6\)"):
        chunked_cross_entropy(s, labels[:, 1:])
