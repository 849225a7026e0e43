"""Losses through the registry on captures of tiny real models, layer mappings, and the whole DistillModule."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaledkd import arch
from scaledkd.engine.module import DistillModule, TeacherRunner
from scaledkd.losses import LOSSES, LossBatch, LossSetup, ModelOutputs, build_loss, masked_mean
from scaledkd.mappings import MAPPINGS, last, resolve_mapping, uniform
from scaledkd.models import freeze
from scaledkd.taps import Captures, TapManager
from tests.conftest import make_batch, tiny_config, tiny_model


def setup_for(student, teacher, mapping=None, task="classification", name="loss") -> LossSetup:
    return LossSetup(student_config=student.config, teacher_config=None if teacher is None else teacher.config,
                     mapping=mapping, task=task, name=name, causal=arch.is_causal(student.config))


def run(model, taps, batch, detach) -> ModelOutputs:
    """A forward with real TapManager captures (detach=True: teacher, False: student)."""
    manager = TapManager(model, taps, detach=detach)
    ctx = torch.no_grad() if detach else torch.enable_grad()
    with ctx, manager.capture() as cap:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    manager.check_complete(cap)
    manager.remove()
    return ModelOutputs(logits=out.logits, captures=cap)


def outputs_for(loss, student, teacher, batch):
    s_taps, t_taps = loss.taps()
    return run(student, s_taps, batch, detach=False), run(teacher, t_taps, batch, detach=True)


def lb(batch, **kw) -> LossBatch:
    return LossBatch(attention_mask=batch["attention_mask"], labels=batch.get("labels"), **kw)


def replace(outputs: ModelOutputs, kind: str, layer: int, value: torch.Tensor) -> ModelOutputs:
    """A copy of ``outputs`` with one capture replaced (captures dicts are copied, tensors shared)."""
    cap = Captures(**{f.name: dict(getattr(outputs.captures, f.name)) for f in dataclasses.fields(Captures)})
    getattr(cap, kind)[layer] = value
    return ModelOutputs(logits=outputs.logits, captures=cap)


def perturb_positions(x: torch.Tensor, where: torch.Tensor, seed: int = 3) -> torch.Tensor:
    """``x [B, L, D]`` with large random values written at positions where ``where [B, L]`` is set."""
    g = torch.Generator().manual_seed(seed)
    noise = 10 * torch.randn(x.shape, generator=g)
    return torch.where(where.bool()[..., None], noise, x)


# ----------------------------------------------------------------------------------------------- registry


def test_unknown_loss_lists_registered_names(teacher_bert, student_bert):
    with pytest.raises(ValueError, match="unknown loss 'attn_kll'") as err:
        build_loss("attn_kll", setup_for(student_bert, teacher_bert), {})
    for name in ("attn_kl", "hidden_mse", "logit_kd", "qkv_relation", "task"):
        assert name in str(err.value)
    assert set(LOSSES.names()) >= {"task", "logit_kd", "hidden_mse", "hidden_cos", "pkd_cls", "attn_kl", "attn_mse",
                                   "qkv_relation", "minilm_value"}


def test_unknown_loss_param_lists_accepted(teacher_bert, student_bert):
    with pytest.raises(ValueError, match=r"no parameter 'temprature'.*\['temperature'\]"):
        build_loss("logit_kd", setup_for(student_bert, teacher_bert), {"temprature": 2.0})
    with pytest.raises(ValueError, match=r"no parameter 'heads'.*relations.*relation_heads"):
        build_loss("qkv_relation", setup_for(student_bert, teacher_bert), {"heads": 2})


def test_teacher_losses_need_a_teacher(student_bert):
    with pytest.raises(ValueError, match="needs a teacher"):
        build_loss("logit_kd", setup_for(student_bert, None), {})
    build_loss("task", setup_for(student_bert, None), {})  # the task loss alone trains without a teacher


def test_task_kind_restriction(teacher_bert, student_bert):
    with pytest.raises(ValueError, match=r"does not apply to task kind 'agnostic'.*classification"):
        build_loss("logit_kd", setup_for(student_bert, teacher_bert, task="agnostic"), {})


@pytest.mark.parametrize("name, mapping, valid", [
    ("hidden_mse", [[3, 4]], "student layer 3 is out of range; valid: 0..2"),
    ("hidden_mse", [[1, 5]], "teacher layer 5 is out of range; valid: 0..4"),
    ("attn_mse", [[0, 1]], "student layer 0 is out of range; valid: 1..2"),
    ("qkv_relation", [[2, 0]], "teacher layer 0 is out of range; valid: 1..4"),
])
def test_mapping_out_of_range(name, mapping, valid):
    teacher = tiny_config("bert", layers=4, width=64, heads=4)
    student = tiny_config("bert", layers=2, width=64, heads=4)
    setup = LossSetup(student_config=student, teacher_config=teacher, mapping=mapping, task="classification", name=name)
    with pytest.raises(ValueError, match=rf"losses\[{name}\]\.mapping: {valid}"):
        build_loss(name, setup, {})


# ----------------------------------------------------------------------------------------------- mappings


def test_uniform_mapping():
    assert uniform(3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert uniform(3, 6, True) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    pairs = uniform(4, 6)
    assert len(pairs) == 4 and pairs[-1] == (4, 6)
    assert [t for _, t in pairs] == sorted({t for _, t in pairs})  # strictly increasing teacher blocks
    assert uniform(2, 2) == [(1, 1), (2, 2)]


def test_last_and_explicit_mappings():
    assert last(3, 12) == [(3, 12)] and last(3, 12, True) == [(3, 12)]
    assert resolve_mapping("last", 2, 4, with_embeddings=False) == [(2, 4)]
    assert resolve_mapping(None, 2, 4, with_embeddings=True) == [(0, 0), (1, 2), (2, 4)]  # default uniform
    assert resolve_mapping([[1, 3], [2, 4]], 2, 4, with_embeddings=False) == [(1, 3), (2, 4)]
    assert resolve_mapping([[0, 0]], 2, 4, with_embeddings=True) == [(0, 0)]
    with pytest.raises(ValueError, match="valid: 1..2"):
        resolve_mapping([[0, 0]], 2, 4, with_embeddings=False)
    with pytest.raises(ValueError, match=r"unknown layer mapping 'skip'; registered: last, uniform"):
        resolve_mapping("skip", 2, 4, with_embeddings=False)
    assert MAPPINGS.names() == ["last", "uniform"]


# ----------------------------------------------------------------------------------------------- logit losses


def test_logit_kd_classification(teacher_bert, student_bert, batch):
    kd = build_loss("logit_kd", setup_for(student_bert, teacher_bert), {"temperature": 3.0})
    t = run(teacher_bert, set(), batch, detach=True)
    s = run(student_bert, set(), batch, detach=False)
    assert kd(t, t, lb(batch)).item() == pytest.approx(0.0, abs=1e-7)
    value = kd(s, t, lb(batch))
    assert value.item() > 0
    T = 3.0
    p_t = F.softmax(t.logits / T, -1)
    by_hand = T * T * (p_t * (p_t.log() - F.log_softmax(s.logits / T, -1))).sum(-1).mean()
    torch.testing.assert_close(value, by_hand)
    value.backward()
    assert student_bert.classifier.weight.grad.abs().sum() > 0


def test_logit_kd_temperature_must_be_positive(teacher_bert, student_bert):
    with pytest.raises(ValueError, match="temperature=0"):
        build_loss("logit_kd", setup_for(student_bert, teacher_bert), {"temperature": 0})


def test_logit_kd_regression_is_mse():
    s_logits = torch.tensor([[0.5], [2.0], [-1.0]])
    t_logits = torch.tensor([[1.5], [2.0], [0.0]])
    assert F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                    reduction="batchmean") == 0  # why regression must not use softmax-KL
    s_cfg, t_cfg = tiny_config("bert", layers=2, num_labels=1), tiny_config("bert", layers=4, num_labels=1)
    kd = build_loss("logit_kd", LossSetup(s_cfg, t_cfg, None, "regression", "logit_kd"), {})
    value = kd(ModelOutputs(s_logits), ModelOutputs(t_logits), LossBatch(torch.ones(3, 4)))
    assert value.item() == pytest.approx((1.0 + 0.0 + 1.0) / 3)


def test_logit_kd_shape_mismatch(teacher_bert, student_bert):
    kd = build_loss("logit_kd", setup_for(student_bert, teacher_bert), {})
    with pytest.raises(ValueError, match=r"\(2, 3\) vs teacher \(2, 2\)"):
        kd(ModelOutputs(torch.zeros(2, 3)), ModelOutputs(torch.zeros(2, 2)), LossBatch(torch.ones(2, 4)))


def test_task_loss_classification_and_regression(student_bert, batch):
    task = build_loss("task", setup_for(student_bert, None), {})
    s = run(student_bert, set(), batch, detach=False)
    by_hand = -F.log_softmax(s.logits, -1).gather(1, batch["labels"][:, None]).mean()
    torch.testing.assert_close(task(s, None, lb(batch)), by_hand)

    reg = build_loss("task", LossSetup(student_bert.config, None, None, "regression", "task"), {})
    logits = torch.tensor([[1.0], [3.0]])
    labels = torch.tensor([0.0, 1.0])
    assert reg(ModelOutputs(logits), None, LossBatch(torch.ones(2, 3), labels)).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="needs labels"):
        task(s, None, LossBatch(batch["attention_mask"]))


# ----------------------------------------------------------------------------------------------- hidden states


def test_hidden_mse_self_is_zero_with_identity_projection(teacher_bert, batch):
    loss = build_loss("hidden_mse", setup_for(teacher_bert, teacher_bert), {})
    assert loss.pairs == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]
    assert all(isinstance(p, nn.Identity) for p in loss.proj)
    s, t = outputs_for(loss, teacher_bert, teacher_bert, batch)
    assert loss(s, t, lb(batch)).item() == 0.0


def test_hidden_mse_projection_and_value(teacher_bert, student_bert, batch):
    loss = build_loss("hidden_mse", setup_for(student_bert, teacher_bert), {})
    assert loss.pairs == [(0, 0), (1, 2), (2, 4)]
    assert len(loss.proj) == 3
    for p in loss.proj:
        assert isinstance(p, nn.Linear) and (p.in_features, p.out_features) == (32, 64)
    s, t = outputs_for(loss, student_bert, teacher_bert, batch)
    value = loss(s, t, lb(batch))
    mask = batch["attention_mask"].float()[..., None]
    by_hand = sum(
        ((proj(s.captures.hidden[i]) - t.captures.hidden[j]).pow(2) * mask).sum() / (mask.sum() * 64)
        for proj, (i, j) in zip(loss.proj, loss.pairs)
    )
    torch.testing.assert_close(value, by_hand)
    value.backward()
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in loss.proj)
    assert arch.blocks(student_bert)[1].output.dense.weight.grad.abs().sum() > 0


def test_hidden_mse_ignores_padding_unless_unmasked(teacher_bert, student_bert, batch):
    masked = build_loss("hidden_mse", setup_for(student_bert, teacher_bert, mapping=[[2, 4]]), {})
    unmasked = build_loss("hidden_mse", setup_for(student_bert, teacher_bert, mapping=[[2, 4]]), {"masked": False})
    unmasked.load_state_dict(masked.state_dict())  # same projection
    s, t = outputs_for(masked, student_bert, teacher_bert, batch)
    pad = batch["attention_mask"] == 0
    assert pad.any()
    t_pad = replace(t, "hidden", 4, perturb_positions(t.captures.hidden[4], pad))
    s_pad = replace(s, "hidden", 2, perturb_positions(s.captures.hidden[2], pad, seed=4))
    base = masked(s, t, lb(batch))
    torch.testing.assert_close(masked(s_pad, t_pad, lb(batch)), base, rtol=0, atol=0)
    assert not torch.allclose(unmasked(s_pad, t_pad, lb(batch)), unmasked(s, t, lb(batch)))
    # Perturbing a real token does change the masked value (the mask is not simply hiding everything).
    real = torch.zeros_like(pad)
    real[0, 1] = True
    assert not torch.allclose(masked(replace(s, "hidden", 2, perturb_positions(s.captures.hidden[2], real)), t,
                                     lb(batch)), base)


def test_projection_options(teacher_bert, student_bert):
    same = tiny_model("bert", layers=2, width=64, heads=4)
    assert isinstance(build_loss("hidden_mse", setup_for(same, teacher_bert), {"projection": "linear"}).proj[0],
                      nn.Linear)
    with pytest.raises(ValueError, match="'identity' needs equal widths, got student 32 and teacher 64"):
        build_loss("hidden_mse", setup_for(student_bert, teacher_bert), {"projection": "identity"})
    with pytest.raises(ValueError, match=r"projection='lin' is not valid; choose one of \['auto', 'linear'"):
        build_loss("hidden_cos", setup_for(student_bert, teacher_bert), {"projection": "lin"})


def test_hidden_cos_bounds(teacher_bert, student_bert, batch):
    loss = build_loss("hidden_cos", setup_for(student_bert, teacher_bert, mapping=[[2, 4]]), {})
    s, t = outputs_for(loss, student_bert, teacher_bert, batch)
    value = loss(s, t, lb(batch)).item()
    assert 0.0 <= value <= 2.0
    same = build_loss("hidden_cos", setup_for(teacher_bert, teacher_bert, mapping=[[4, 4]]), {})
    t4 = t.captures.hidden[4]
    assert same(t, t, lb(batch)).item() == pytest.approx(0.0, abs=1e-6)
    assert same(replace(t, "hidden", 4, -t4), t, lb(batch)).item() == pytest.approx(2.0, abs=1e-6)
    assert same(replace(t, "hidden", 4, 5.0 * t4), t, lb(batch)).item() == pytest.approx(0.0, abs=1e-6)


def test_pkd_cls(teacher_bert, student_bert, batch):
    loss = build_loss("pkd_cls", setup_for(student_bert, teacher_bert), {})
    assert loss.pairs == [(1, 2), (2, 4)] and len(loss.proj) == 2  # no embedding pair
    s, t = outputs_for(loss, student_bert, teacher_bert, batch)
    value = loss(s, t, lb(batch))
    by_hand = sum(F.mse_loss(F.normalize(p(s.captures.hidden[i][:, 0]), dim=-1),
                             F.normalize(t.captures.hidden[j][:, 0], dim=-1)) for p, (i, j) in zip(loss.proj, loss.pairs))
    torch.testing.assert_close(value, by_hand)
    # Only [CLS] counts, and only its direction.
    not_cls = torch.ones_like(batch["attention_mask"], dtype=torch.bool)
    not_cls[:, 0] = False
    t2 = replace(t, "hidden", 4, 3.0 * perturb_positions(t.captures.hidden[4], not_cls))
    torch.testing.assert_close(loss(s, t2, lb(batch)), value)
    same = build_loss("pkd_cls", setup_for(teacher_bert, teacher_bert), {})
    tt = run(teacher_bert, same.taps()[1], batch, detach=True)
    assert same(tt, tt, lb(batch)).item() == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------------------------- attention


def test_attn_kl_self_zero_and_positive(teacher_bert, batch):
    student = tiny_model("bert", layers=2, width=32, heads=4, seed=3)  # same head count, other head dim
    loss = build_loss("attn_kl", setup_for(student, teacher_bert), {})
    assert loss.pairs == [(2, 4)]  # default: last <-> last
    s, t = outputs_for(loss, student, teacher_bert, batch)
    value = loss(s, t, lb(batch))
    assert value.item() > 0
    value.backward()
    assert arch.blocks(student)[1].attention.self.query.weight.grad.abs().sum() > 0
    self_loss = build_loss("attn_kl", setup_for(teacher_bert, teacher_bert, mapping=[[1, 1], [4, 4]]), {})
    tt = run(teacher_bert, self_loss.taps()[1], batch, detach=True)
    assert self_loss(tt, tt, lb(batch)).item() == pytest.approx(0.0, abs=1e-6)


def _eager_probs(model, batch, layer):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    return out.attentions[layer - 1]  # [B, H, L, L]


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "gpt2"])
def test_attn_kl_equals_kl_of_models_own_attention(model_type, batch):
    """Scores rebuilt from tapped Q/K reproduce the model's own (eager) attention probabilities, so attn_kl is the
    KL between the two models' real attention maps, averaged over heads and real query rows."""
    teacher = tiny_model(model_type, layers=2, width=64, heads=4, seed=0)
    student = tiny_model(model_type, layers=1, width=32, heads=4, seed=1)
    loss = build_loss("attn_kl", setup_for(student, teacher), {})
    s, t = outputs_for(loss, student, teacher, batch)
    p_t, p_s = _eager_probs(teacher, batch, 2), _eager_probs(student, batch, 1)
    rows = batch["attention_mask"].bool()[:, None, :, None]  # real query rows
    kl = (p_t * (p_t.clamp_min(1e-30).log() - p_s.clamp_min(1e-30).log())).sum(-1, keepdim=True)  # [B, H, L, 1]
    by_hand = (kl * rows).sum() / (rows.sum() * 4)
    torch.testing.assert_close(loss(s, t, lb(batch)), by_hand, rtol=1e-4, atol=1e-6)


def test_attn_kl_ignores_padded_keys_and_rows(teacher_bert, batch):
    student = tiny_model("bert", layers=2, width=32, heads=4, seed=3)
    loss = build_loss("attn_kl", setup_for(student, teacher_bert), {})
    s, t = outputs_for(loss, student, teacher_bert, batch)
    pad = batch["attention_mask"] == 0
    base = loss(s, t, lb(batch))
    s2 = replace(replace(s, "k", 2, perturb_positions(s.captures.k[2], pad)), "q", 2,
                 perturb_positions(s.captures.q[2], pad, seed=5))
    t2 = replace(t, "k", 4, perturb_positions(t.captures.k[4], pad, seed=6))
    torch.testing.assert_close(loss(s2, t2, lb(batch)), base, rtol=0, atol=0)
    real = torch.zeros_like(pad)
    real[1, 2] = True
    assert not torch.allclose(loss(replace(s, "k", 2, perturb_positions(s.captures.k[2], real)), t, lb(batch)), base)


def test_attn_kl_causal_ignores_future_keys():
    torch.manual_seed(0)
    teacher = tiny_model("llama", layers=2, width=64, heads=4, kv_heads=2, seed=0)
    student = tiny_model("llama", layers=1, width=32, heads=4, kv_heads=2, seed=1)
    batch = make_batch()
    loss = build_loss("attn_kl", setup_for(student, teacher), {})
    assert loss.setup.causal
    s, t = outputs_for(loss, student, teacher, batch)
    # Only query row L-1 may see key L-1; leave that row out of the mean (loss_mask) and perturb key L-1.
    loss_mask = batch["attention_mask"].clone()
    loss_mask[:, -1] = 0
    last = torch.zeros_like(loss_mask, dtype=torch.bool)
    last[:, -1] = True
    s_future = replace(s, "k", 1, perturb_positions(s.captures.k[1], last))
    b = lb(batch, loss_mask=loss_mask)
    torch.testing.assert_close(loss(s_future, t, b), loss(s, t, b), rtol=0, atol=0)
    # The same perturbation matters to an encoder-style (non-causal) loss: the check above can fail.
    bidir = build_loss("attn_kl", LossSetup(student.config, teacher.config, None, "causal_lm", "attn_kl",
                                            causal=False), {})
    assert not torch.allclose(bidir(s_future, t, b), bidir(s, t, b))


def test_attn_kl_needs_equal_heads(teacher_bert, student_bert):
    with pytest.raises(ValueError, match=r"student has 2 heads and the teacher 4.*qkv_relation"):
        build_loss("attn_kl", setup_for(student_bert, teacher_bert), {})
    with pytest.raises(ValueError, match="qkv_relation"):
        build_loss("attn_mse", setup_for(student_bert, teacher_bert), {})
    with pytest.raises(ValueError, match="qkv_relation"):
        build_loss("minilm_value", setup_for(student_bert, teacher_bert), {})


def test_attn_mse(teacher_bert, batch):
    student = tiny_model("bert", layers=2, width=32, heads=4, seed=3)
    loss = build_loss("attn_mse", setup_for(student, teacher_bert), {})
    unmasked = build_loss("attn_mse", setup_for(student, teacher_bert), {"masked": False})
    assert loss.pairs == [(1, 2), (2, 4)]  # default uniform, no embeddings
    s, t = outputs_for(loss, student, teacher_bert, batch)
    value = loss(s, t, lb(batch))
    m = batch["attention_mask"].bool()
    entries = (m[:, None, :, None] & m[:, None, None, :]).expand(-1, 4, -1, -1)  # real rows x real keys
    total_masked, total_all = 0.0, 0.0
    for i, j in loss.pairs:
        a_s = split(s.captures.q[i], 4) @ split(s.captures.k[i], 4).transpose(-1, -2) / math.sqrt(8)
        a_t = split(t.captures.q[j], 4) @ split(t.captures.k[j], 4).transpose(-1, -2) / math.sqrt(16)
        sq = (a_s - a_t).pow(2) * entries
        total_masked = total_masked + sq.sum() / entries.sum()
        total_all = total_all + sq.sum() / sq.numel()
    torch.testing.assert_close(value, total_masked)
    torch.testing.assert_close(unmasked(s, t, lb(batch)), total_all)
    pad = ~m
    s2 = replace(s, "k", 1, perturb_positions(s.captures.k[1], pad))
    torch.testing.assert_close(loss(s2, t, lb(batch)), value, rtol=0, atol=0)
    self_loss = build_loss("attn_mse", setup_for(teacher_bert, teacher_bert), {})
    tt = run(teacher_bert, self_loss.taps()[1], batch, detach=True)
    assert self_loss(tt, tt, lb(batch)).item() == 0.0


def split(x, heads):
    B, L, D = x.shape
    return x.view(B, L, heads, D // heads).transpose(1, 2)


# ----------------------------------------------------------------------------------------------- relations


@pytest.mark.parametrize("relation_heads", [None, 4, 2])
def test_qkv_relation_across_widths_and_heads(teacher_bert, student_bert, batch, relation_heads):
    params = {} if relation_heads is None else {"relation_heads": relation_heads}
    loss = build_loss("qkv_relation", setup_for(student_bert, teacher_bert), params)
    assert loss.relation_heads == (relation_heads or 4)  # default: the teacher's head count
    s, t = outputs_for(loss, student_bert, teacher_bert, batch)
    value = loss(s, t, lb(batch))
    assert torch.isfinite(value) and value.item() > 0
    value.backward()
    assert arch.blocks(student_bert)[1].attention.self.value.weight.grad.abs().sum() > 0

    # Relation of one X by hand: per relation head, KL over real keys, mean over real rows.
    H = loss.relation_heads
    m = batch["attention_mask"].bool()

    def rel(x):
        xh = split(x, H)
        return xh @ xh.transpose(-1, -2) / math.sqrt(xh.shape[-1])

    by_hand = 0.0
    for kind in "qkv":
        r_s, r_t = rel(getattr(s.captures, kind)[2].detach()), rel(getattr(t.captures, kind)[4])
        keys = m[:, None, None, :]
        lt = F.log_softmax(r_t.masked_fill(~keys, -1e9), -1)
        ls = F.log_softmax(r_s.masked_fill(~keys, -1e9), -1)
        kl = (lt.exp() * (lt - ls)).masked_fill(~keys, 0).sum(-1)  # [B, H, L]
        by_hand = by_hand + (kl * m[:, None, :]).sum() / (m.sum() * H)
    torch.testing.assert_close(value.detach(), by_hand, rtol=1e-4, atol=1e-6)

    self_loss = build_loss("qkv_relation", setup_for(teacher_bert, teacher_bert), params)
    tt = run(teacher_bert, self_loss.taps()[1], batch, detach=True)
    assert self_loss(tt, tt, lb(batch)).item() == pytest.approx(0.0, abs=1e-6)


def test_qkv_relation_ignores_padding(teacher_bert, student_bert, batch):
    loss = build_loss("qkv_relation", setup_for(student_bert, teacher_bert), {"relation_heads": 2})
    s, t = outputs_for(loss, student_bert, teacher_bert, batch)
    pad = batch["attention_mask"] == 0
    s2 = s
    for kind in "qkv":
        s2 = replace(s2, kind, 2, perturb_positions(getattr(s.captures, kind)[2], pad, seed=ord(kind)))
    torch.testing.assert_close(loss(s2, t, lb(batch)), loss(s, t, lb(batch)), rtol=0, atol=0)


def test_relation_heads_must_divide_widths(teacher_bert, student_bert):
    with pytest.raises(ValueError, match=r"student Q width 32 is not divisible into relation_heads=3"):
        build_loss("qkv_relation", setup_for(student_bert, teacher_bert), {"relation_heads": 3})
    with pytest.raises(ValueError, match=r"student Q width 32 is not divisible into relation_heads=64"):
        build_loss("qkv_relation", setup_for(student_bert, teacher_bert), {"relation_heads": 64})
    wide_student = tiny_model("bert", layers=2, width=96, heads=3)
    with pytest.raises(ValueError, match=r"teacher Q width 64 is not divisible into relation_heads=3"):
        build_loss("qkv_relation", setup_for(wide_student, teacher_bert), {"relation_heads": 3})
    with pytest.raises(ValueError, match=r"relations=\['q', 'x'\]"):
        build_loss("qkv_relation", setup_for(student_bert, teacher_bert), {"relations": ["q", "x"]})


def test_qkv_relation_gqa_llama():
    teacher = tiny_model("llama", layers=2, width=64, heads=4, kv_heads=2, seed=0)
    student = tiny_model("llama", layers=1, width=32, heads=2, kv_heads=1, seed=1)
    batch = make_batch()
    loss = build_loss("qkv_relation", setup_for(student, teacher, task="causal_lm"), {"relation_heads": 2})
    s, t = outputs_for(loss, student, teacher, batch)
    assert t.captures.q[2].shape[-1] == 64 and t.captures.k[2].shape[-1] == 32  # GQA: narrower K/V
    assert s.captures.k[1].shape[-1] == 16
    value = loss(s, t, lb(batch))
    assert torch.isfinite(value) and value.item() > 0
    self_loss = build_loss("qkv_relation", setup_for(teacher, teacher, task="causal_lm"), {})
    tt = run(teacher, self_loss.taps()[1], batch, detach=True)
    assert self_loss(tt, tt, lb(batch)).item() == pytest.approx(0.0, abs=1e-6)
    # K width 16 of the student cannot be split into 32 relation heads... but 8 (< 16) still works
    with pytest.raises(ValueError, match="student K width 16"):
        build_loss("qkv_relation", setup_for(student, teacher, task="causal_lm"),
                   {"relation_heads": 32, "relations": ["k"]})


def test_minilm_value(teacher_bert, batch):
    student = tiny_model("bert", layers=2, width=32, heads=4, seed=3)
    loss = build_loss("minilm_value", setup_for(student, teacher_bert), {})
    assert loss.relations == ["v"] and loss.relation_heads == 4
    s_taps, t_taps = loss.taps()
    assert {tap.kind for tap in s_taps | t_taps} == {"v"}
    s, t = outputs_for(loss, student, teacher_bert, batch)
    value = loss(s, t, lb(batch))
    assert value.item() > 0
    qkv = build_loss("qkv_relation", setup_for(student, teacher_bert), {"relations": ["v"]})
    torch.testing.assert_close(value, qkv(s, t, lb(batch)))
    self_loss = build_loss("minilm_value", setup_for(teacher_bert, teacher_bert), {})
    tt = run(teacher_bert, self_loss.taps()[1], batch, detach=True)
    assert self_loss(tt, tt, lb(batch)).item() == pytest.approx(0.0, abs=1e-6)


def test_masked_mean():
    values = torch.arange(12.0).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx((0 + 1 + 2 + 3 + 6 + 7) / 6)
    assert masked_mean(values, torch.zeros(2, 3)).item() == 0.0


# ----------------------------------------------------------------------------------------------- DistillModule


def test_distill_module_step(teacher_bert, student_bert, batch):
    teacher = freeze(teacher_bert)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    specs = {"task": ({}, None, 0.5), "logit_kd": ({"temperature": 2.0}, None, 0.5),
             "hidden_mse": ({}, "uniform", 2.0), "qkv_relation": ({"relation_heads": 2}, "last", 3.0)}
    losses = {name: build_loss(name, setup_for(student_bert, teacher, mapping=m, name=name), p)
              for name, (p, m, _) in specs.items()}
    module = DistillModule(student_bert, losses, {n: w for n, (_, _, w) in specs.items()})
    module.train()
    runner = TeacherRunner(teacher, module.teacher_taps())
    t_out = runner(batch)
    assert t_out.logits is not None and not t_out.logits.requires_grad
    total, terms = module(batch, t_out)
    assert set(terms) == set(specs)
    assert all(v.item() > 0 for v in terms.values())
    torch.testing.assert_close(total, sum(specs[n][2] * terms[n] for n in specs))

    projections = list(module.losses["hidden_mse"].proj.parameters())
    assert projections and all(any(p is q for q in module.parameters()) for p in projections)
    total.backward()
    for name, p in module.student.named_parameters():
        if "token_type" in name:
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projections)
    assert all(p.grad is None for p in teacher.parameters())

    student_before = {k: v.clone() for k, v in student_bert.state_dict().items()}
    torch.optim.AdamW(module.parameters(), lr=1e-2).step()
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k], rtol=0, atol=0)
    changed = [k for k, v in student_bert.state_dict().items() if not torch.equal(v, student_before[k])]
    assert "bert.encoder.layer.1.attention.self.query.weight" in changed


def test_teacher_runner_unfrozen_teacher_gets_no_grad(teacher_bert, student_bert, batch):
    """Even a teacher whose parameters still require grad is run under no_grad with detached captures."""
    loss = build_loss("hidden_mse", setup_for(student_bert, teacher_bert), {})
    module = DistillModule(student_bert, {"hidden_mse": loss}, {"hidden_mse": 1.0})
    t_out = TeacherRunner(teacher_bert, module.teacher_taps())(batch)
    total, _ = module(batch, t_out)
    total.backward()
    assert all(p.requires_grad and p.grad is None for p in teacher_bert.parameters())


def test_gqa_scores_repeat_key_heads_like_the_model():
    """GQA keys are shared by consecutive query heads exactly as the model's own ``repeat_kv`` does."""
    from transformers.models.llama.modeling_llama import repeat_kv

    from scaledkd.losses.attention import head_qk, scores
    from scaledkd.taps import Captures

    gqa = tiny_config("llama", width=64, heads=4, kv_heads=2)
    mha = tiny_config("llama", width=64, heads=4, kv_heads=4)
    B, L = 2, 5
    q, k = torch.randn(B, L, 64), torch.randn(B, L, 32)
    k_heads = k.view(B, L, 2, 16).transpose(1, 2)  # [B, 2, L, 16]
    k_full = repeat_kv(k_heads, 2).transpose(1, 2).reshape(B, L, 64)
    angles = torch.randn(B, L, 8).repeat(1, 1, 2)  # rotary (cos, sin) [B, L, d], rotating keys before sharing
    rope = {1: (angles.cos(), angles.sin())}
    torch.testing.assert_close(scores(*head_qk(Captures(q={1: q}, k={1: k}, rope=rope), 1, gqa)),
                               scores(*head_qk(Captures(q={1: q}, k={1: k_full}, rope=rope), 1, mha)))
    loss = build_loss("attn_kl", LossSetup(gqa, gqa, None, "causal_lm", "attn_kl", causal=True), {})
    assert loss.pairs == [(4, 4)]
