"""The blocked attention-map kernels (scaledkd/losses/attention_blocks.py) against the plain autograd reference:
values and gradients, every mask case, and the memory they keep for backward."""
from __future__ import annotations

import pytest
import torch

from scaledkd.losses import LossBatch, LossSetup, ModelOutputs, build_loss
from scaledkd.losses.attention import attention_kl, key_mask, score_mse, scores, split_heads
from scaledkd.losses.attention_blocks import BLOCK_ELEMENTS, blocked_row_kl, check_block_size, rows_per_block
from scaledkd.mixup import EmbeddingMixup
from scaledkd.taps import Captures
from tests.conftest import make_batch, tiny_config, tiny_model
from tests.test_crild import consistency_module, mixed_batch
from tests.test_losses import lb, outputs_for, setup_for

B, H, L = 4, 4, 19  # L prime: no block size below divides it


def masks() -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L]`` key mask (row 0 full, row 1 padded after 11, row 2 all padding, row 3 after 4) and a query mask
    that differs from it: it leaves out the last real token of row 0 and counts one query of the all-padding row,
    which has no key at all (a KL of 0 that still counts in the mean, as in the reference)."""
    keys = torch.ones(B, L, dtype=torch.long)
    keys[1, 11:] = 0
    keys[2] = 0
    keys[3, 4:] = 0
    rows = keys.clone()
    rows[0, -1] = 0
    rows[2, 5] = 1
    return keys, rows


def loss_of(kind: str, target, pred, keys, rows, causal, block_size):
    if kind == "kl":
        return attention_kl(target, pred, keys, rows, causal, block_size)
    return score_mse(target, pred, keys, rows, causal, kind == "mse", block_size)


def assert_same(blocked: torch.Tensor, reference: torch.Tensor, leaves: list[torch.Tensor],
                blocked_grads: list[torch.Tensor]) -> None:
    """Values within 1e-5 relative; each gradient within 1e-5 relative in norm, and zero wherever the
    reference's is exactly zero (padded rows and keys)."""
    torch.testing.assert_close(blocked, reference, rtol=1e-5, atol=0)
    ref_grads = torch.autograd.grad(reference, leaves)
    for got, want in zip(blocked_grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        assert (got - want).norm() <= 1e-5 * want.norm(), ((got - want).norm(), want.norm())
        assert (got[want == 0] == 0).all()


@pytest.mark.parametrize("kind", ["kl", "mse", "mse_unmasked"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [1, 5, 64])
def test_kernel_matches_reference(kind, causal, block_size):
    """Padding, an all-padding row, a loss mask, causal masks, GQA key heads, a trainable per-head bias and a
    constant per-row teacher bias; student and teacher head dims differ."""
    g = torch.Generator().manual_seed(block_size + 7 * causal)
    keys, rows = masks()
    q_s = torch.randn(B, H, L, 8, generator=g, requires_grad=True)
    k_kv = torch.randn(B, H // 2, L, 8, generator=g, requires_grad=True)  # GQA: 2 key heads shared by 4
    bias_s = (0.5 * torch.randn(1, H, L, L, generator=g)).requires_grad_()
    student = (q_s, k_kv.repeat_interleave(2, dim=1), bias_s)
    teacher = (torch.randn(B, H, L, 16, generator=g), torch.randn(B, H, L, 16, generator=g),
               torch.randn(B, H, L, L, generator=g))
    leaves = [q_s, k_kv, bias_s]
    reference = loss_of(kind, teacher, student, keys, rows, causal, None)
    blocked = loss_of(kind, teacher, student, keys, rows, causal, block_size)
    assert reference.item() > 0
    assert_same(blocked, reference, leaves, torch.autograd.grad(blocked, leaves))


BIAS_CASES = [(kind, shape) for kind in ("kl", "mse") for shape in ((B, 1, 1, L), (1, H, 1, L), (L, L))]
BIAS_CASES.append(("mse", (1, H, L, 1)))  # constant along a row: a softmax ignores it, so only the MSE sees it


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,shape", BIAS_CASES)
def test_broadcast_biases_match_reference(kind, shape, causal):
    """Trainable biases that broadcast over rows (per-key biases), over keys, or over batch and heads: their
    gradients are summed over the broadcast dims block by block, as autograd sums them."""
    g = torch.Generator().manual_seed(len(shape))
    keys, rows = masks()
    q_s = torch.randn(B, H, L, 8, generator=g, requires_grad=True)
    bias_s = torch.randn(shape, generator=g).requires_grad_()
    teacher = tuple(torch.randn(B, H, L, 8, generator=g) for _ in range(2)) + (None,)
    student = (q_s, teacher[1], bias_s)
    reference = loss_of(kind, teacher, student, keys, rows, causal, None)
    blocked = loss_of(kind, teacher, student, keys, rows, causal, 5)
    assert_same(blocked, reference, [q_s, bias_s], torch.autograd.grad(blocked, [q_s, bias_s]))


@pytest.mark.parametrize("causal", [False, True])
def test_relation_heads_match_reference(causal):
    """qkv_relation's shape: q = k = X split into relation heads (3 here) unlike any model head count; the
    gradient reaches X through both uses."""
    g = torch.Generator().manual_seed(3)
    keys, rows = masks()
    x_s = torch.randn(B, L, 12, generator=g, requires_grad=True)
    x_t = torch.randn(B, L, 24, generator=g)

    def heads(x):
        xh = split_heads(x, 3)
        return xh, xh, None

    reference = attention_kl(heads(x_t), heads(x_s), keys, rows, causal, None)
    blocked = attention_kl(heads(x_t), heads(x_s), keys, rows, causal, 4)
    assert_same(blocked, reference, [x_s], torch.autograd.grad(blocked, [x_s]))


def test_kl_of_identical_maps_is_zero_and_no_grad_path_agrees():
    g = torch.Generator().manual_seed(0)
    keys, rows = masks()
    q, k = torch.randn(B, H, L, 8, generator=g), torch.randn(B, H, L, 8, generator=g)
    assert blocked_row_kl((q, k, None), (q, k, None), keys, rows, True, 4).abs().item() < 1e-6
    q_s = (q + 0.3 * torch.randn(B, H, L, 8, generator=g)).requires_grad_()
    with_grad = blocked_row_kl((q, k, None), (q_s, k, None), keys, rows, False, 4)
    with torch.no_grad():
        without = blocked_row_kl((q, k, None), (q_s, k, None), keys, rows, False, 4)
    assert with_grad.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_nearly_equal_maps_keep_their_digits(causal):
    """KL ~ 5e-6 per row (a student close to its teacher, or CR-ILD's mixed vs clean maps) with scores ~ 10: both
    float32 paths sit at the same rounding floor against float64 (a few 1e-4 relative: the scores themselves are
    float32), where a cancelling formula (entropy minus cross-entropy) would be off by percents."""
    g = torch.Generator().manual_seed(0)
    keys, rows = masks()
    q_t, k = 2 * torch.randn(B, H, L, 16, generator=g), 2 * torch.randn(B, H, L, 16, generator=g)
    q_s = q_t + 3e-3 * torch.randn(B, H, L, 16, generator=g)
    allowed = key_mask(keys, causal)
    log_t, log_s = (torch.log_softmax(scores(q.double(), k.double()).masked_fill(~allowed, -1e300), -1)
                    for q in (q_t, q_s))
    kl = (log_t.exp() * (log_t - log_s)).masked_fill(~allowed, 0).sum(-1)  # [B, H, L]
    truth = (kl * rows[:, None]).sum() / (rows.sum() * H)
    assert 1e-6 < truth < 1e-5
    for block_size in (None, 5):
        value = attention_kl((q_t, k, None), (q_s, k, None), keys, rows, causal, block_size)
        assert abs(value.double() - truth) <= 2e-3 * truth, block_size


def test_block_size_is_validated_and_capped(monkeypatch, teacher_bert):
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match=rf"block_size={bad!r} must be null"):
            check_block_size(bad, "loss 'attn_kl'")
    student = tiny_model("bert", layers=2, width=32, heads=4, seed=3)
    with pytest.raises(ValueError, match=r"loss 'attn_kl': block_size=0 must be null"):
        build_loss("attn_kl", setup_for(student, teacher_bert, name="attn_kl"), {"block_size": 0})
    # The target is a constant: a target that requires grad is refused rather than silently not trained.
    q = torch.randn(1, 1, 4, 2, requires_grad=True)
    with pytest.raises(ValueError, match="block_size: null"):
        blocked_row_kl((q, q, None), (q, q, None), torch.ones(1, 4), torch.ones(1, 4), False, 2)
    # Rows per block shrink so one [B, H, b, L] buffer stays within BLOCK_ELEMENTS: the answer does not change.
    keys, rows = masks()
    g = torch.Generator().manual_seed(1)
    heads = [(torch.randn(B, H, L, 8, generator=g), torch.randn(B, H, L, 8, generator=g), None) for _ in range(2)]
    want = blocked_row_kl(*heads, keys, rows, False, 64)
    monkeypatch.setattr("scaledkd.losses.attention_blocks.BLOCK_ELEMENTS", B * H * L * 2)  # 2 rows per block
    torch.testing.assert_close(blocked_row_kl(*heads, keys, rows, False, 64), want, rtol=1e-6, atol=0)
    monkeypatch.undo()
    assert rows_per_block(128, 8, 12, 256) == 128  # 12.6 MiB buffers: as asked
    assert rows_per_block(128, 32, 12, 256) == BLOCK_ELEMENTS // (32 * 12 * 256) < 128
    assert rows_per_block(128, 8, 32, 2**17) == 1


# ------------------------------------------------------------------------------------ the losses end to end

CASES = [
    ("attn_kl", "bert", {}),
    ("attn_kl", "llama", {}),  # causal, GQA key heads, rotary positions
    ("attn_mse", "bert", {}),
    ("attn_mse", "bert", {"masked": False}),
    ("attn_mse", "llama", {}),
    ("qkv_relation", "bert", {"relation_heads": 2}),  # 2 relation heads, 4 model heads
    ("qkv_relation", "llama", {"relation_heads": 2}),
    ("minilm_value", "bert", {}),
]


@pytest.mark.parametrize("name,model_type,params", CASES, ids=[f"{n}-{m}-{p}" for n, m, p in CASES])
def test_losses_blocked_equal_reference(name, model_type, params):
    """Each attention-family loss on tiny real models: value and student gradients with blocks of 3 rows (SEQ = 8)
    equal the reference path's; the batch has padding and a loss mask that drops more rows. Weights are drawn
    wider than the default 0.02 so the maps are far from uniform: at KL ~ 1e-4 even the float32 reference is only
    good to ~5e-5 relative (against float64), and 1e-5 could not be asked of either."""
    teacher = tiny_model(model_type, layers=2, width=64, heads=4, seed=0, initializer_range=0.3)
    student = tiny_model(model_type, layers=1, width=32, heads=4, seed=1, initializer_range=0.3)
    batch = make_batch()
    loss_mask = batch["attention_mask"].clone()
    loss_mask[0, :2] = 0
    losses = {bs: build_loss(name, setup_for(student, teacher, task="causal_lm" if model_type == "llama"
                                             else "classification"), {**params, "block_size": bs})
              for bs in (None, 3)}
    s, t = outputs_for(losses[3], student, teacher, batch)
    weights = [p for p in student.parameters() if p.requires_grad]
    values, grads = {}, {}
    for bs, loss in losses.items():
        values[bs] = loss(s, t, lb(batch, loss_mask=loss_mask))
        grads[bs] = torch.autograd.grad(values[bs], weights, retain_graph=True, allow_unused=True)
    assert values[None].item() > 0
    torch.testing.assert_close(values[3], values[None], rtol=1e-5, atol=0)
    assert [g is None for g in grads[3]] == [g is None for g in grads[None]]
    assert sum(g is not None and g.abs().sum().item() > 0 for g in grads[None]) >= 2  # reached the projections
    assert_close_in_norm(grads[3], grads[None])


def assert_close_in_norm(got: tuple, want: tuple) -> None:
    """All parameters' gradients as one vector within 1e-5 relative (a parameter whose true gradient is 0, such as
    a key bias under a softmax, carries only rounding noise, so it is not compared on its own scale)."""
    def flat(grads):
        return torch.cat([g.flatten() for g in grads if g is not None])

    assert (flat(got) - flat(want)).norm() <= 1e-5 * flat(want).norm()


@pytest.mark.parametrize("divergence", ["attn_kl", "both"])
def test_crild_consistency_blocked_equals_reference(divergence):
    """The consistency term's attention KL (own rows and mixing partners' rows) through both paths; weights drawn
    wide as above so the KL is not at the float32 reference's noise floor."""
    student_bert = tiny_model("bert", layers=2, width=32, heads=2, seed=1, initializer_range=0.3)
    values, grads = {}, {}
    for bs in (None, 3):
        mixup = EmbeddingMixup(seed=0)
        module = consistency_module(student_bert, None, mixup, divergence=divergence, block_size=bs)
        _, terms = module(mixed_batch(mixup, index=1))
        values[bs] = terms["crild_consistency"]
        grads[bs] = torch.autograd.grad(values[bs], [p for p in student_bert.parameters()], allow_unused=True)
    assert values[None].item() > 0
    torch.testing.assert_close(values[3], values[None], rtol=1e-5, atol=0)
    assert_close_in_norm(grads[3], grads[None])


# ------------------------------------------------------------------------------------ memory kept for backward


def saved_bytes(fn) -> tuple[torch.Tensor, list[int]]:
    """Run ``fn()`` and list the element counts of every tensor autograd saves for backward meanwhile."""
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("name,params", [("attn_kl", {}), ("attn_mse", {}), ("qkv_relation", {"relation_heads": 2})])
def test_blocked_path_saves_no_score_map(name, params):
    """Through the real loss on [B, L, D] captures at L = 96 (d = 8): the blocked path saves O(B H L d) for
    backward, no tensor with L x L elements per head; the reference path (checked the same way) does."""
    batch, seq = 2, 96
    teacher_cfg, student_cfg = tiny_config("bert", layers=1, width=64, heads=4), tiny_config("bert", layers=1,
                                                                                           width=32, heads=4)
    g = torch.Generator().manual_seed(0)

    def captures(width, grad):
        x = {kind: {1: torch.randn(batch, seq, width, generator=g, requires_grad=grad)} for kind in "qkv"}
        return Captures(**x)

    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 70:] = 0
    s, t = ModelOutputs(None, captures(32, True)), ModelOutputs(None, captures(64, False))
    per_map = seq * seq  # one head's [L, L]
    heads = 4 if name != "qkv_relation" else 2
    student_heads = batch * heads * seq * (32 // heads)  # the student's q or k as [B, H, L, d]
    results = {}
    for bs in (None, 16):
        setup = LossSetup(student_cfg, teacher_cfg, None, "classification", name)
        loss = build_loss(name, setup, {**params, "block_size": bs})
        value, saved = saved_bytes(lambda loss=loss: loss(s, t, LossBatch(attention_mask=mask)))
        value.backward()
        results[bs] = saved
    assert max(results[None]) >= batch * heads * per_map  # the hook sees the reference's score maps
    assert results[16], "the blocked path saves its gradients for backward"
    assert max(results[16]) < per_map  # not even one head's map
    # Exactly the student's gradients: dq and dk for a map, one dX for each relation (q = k = X).
    buffers = 3 if name == "qkv_relation" else 2
    assert sum(results[16]) == buffers * student_heads
