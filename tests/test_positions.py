"""Attention maps rebuilt from taps are the models' real ones: rotary decoders (Llama, Qwen2, Mistral, Qwen3, with
grouped-query attention) and MPNet's relative-position bias, checked against the models' own eager attention
probabilities on padded batches; MPNet students built from teacher blocks."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from scaledkd import arch, models
from scaledkd.losses import LossBatch, LossSetup, ModelOutputs, build_loss
from scaledkd.losses.attention import head_qk, key_mask, qk_taps, scores, split_heads
from scaledkd.positions import apply_rope
from scaledkd.taps import Tap, TapManager
from tests.conftest import make_batch, tiny_config, tiny_model

ROTARY = ("llama", "qwen2", "mistral", "qwen3")
MPNET_DIR = Path(os.environ.get("SCALEDKD_MPNET", "~/.cache/scaledkd/all-mpnet-base-v2")).expanduser()


def eager_model(model_type: str, layers: int = 2, width: int = 64, heads: int = 4, kv_heads: int | None = None,
                seed: int = 0):
    """A tiny model running eager attention (so ``output_attentions`` returns probabilities); GQA for decoders."""
    config = tiny_config(model_type, layers=layers, width=width, heads=heads, kv_heads=kv_heads)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    cls = AutoModel if model_type == "mpnet" else AutoModelForCausalLM
    return cls.from_config(config).eval()


def padded_batch(side: str, pad_id: int) -> dict[str, torch.Tensor]:
    """:func:`make_batch` (rows of 8, 5 and 3 real tokens), padded on the right or the left with ``pad_id``."""
    batch = make_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if side == "left":
        lengths = mask.sum(1)
        ids = torch.stack([row.roll(int(ids.shape[1] - n)) for row, n in zip(ids, lengths)])
        mask = torch.stack([row.roll(int(mask.shape[1] - n)) for row, n in zip(mask, lengths)])
    return {"input_ids": ids.masked_fill(mask == 0, pad_id), "attention_mask": mask}


def probabilities(q, k, bias, attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias + mask)``, ``[B, H, L, L]``."""
    allowed = key_mask(attention_mask, causal)
    return scores(q, k, bias).masked_fill(~allowed, torch.finfo(torch.float32).min).softmax(-1)


def real_rows(attention_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return attention_mask.bool()[:, None, :, None].expand_as(like)


def captured_forward(model, batch, layers, detach=True):
    taps = TapManager(model, qk_taps(layers, model.config), detach=detach)
    with torch.set_grad_enabled(not detach), taps.capture() as cap:
        out = model(**batch, output_attentions=True)
    taps.check_complete(cap)
    taps.remove()
    return out, cap


# --------------------------------------------------------------------------------- the models' real attention


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_type", [*ROTARY, "mpnet"])
def test_head_qk_reproduces_the_models_eager_attention(model_type, side):
    model = eager_model(model_type, layers=2)
    causal = arch.is_causal(model)
    batch = padded_batch(side, pad_id=model.config.pad_token_id)
    out, cap = captured_forward(model, batch, [1, 2])
    heads, kv_heads, _ = arch.attention_geometry(model.config)
    if model_type != "mpnet":
        assert kv_heads < heads  # grouped-query attention is part of what is checked
    for layer in (1, 2):
        want = out.attentions[layer - 1]  # [B, H, L, L]
        rows = real_rows(batch["attention_mask"], want)
        got = probabilities(*head_qk(cap, layer, model.config), batch["attention_mask"], causal)
        torch.testing.assert_close(got[rows], want[rows], rtol=0, atol=1e-5)
        # Without the positions (bare projections), the same comparison fails: the check has teeth.
        qh = split_heads(cap.q[layer].float(), heads)
        kh = split_heads(cap.k[layer].float(), kv_heads).repeat_interleave(heads // kv_heads, dim=1)
        bare = probabilities(qh, kh, None, batch["attention_mask"], causal)
        assert (bare[rows] - want[rows]).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", ROTARY)
def test_apply_rope_equals_the_familys_own_rotation(model_type):
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 6, 16, generator=g), torch.randn(2, 2, 6, 16, generator=g)
    angles = torch.randn(2, 6, 8, generator=g)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    want_q, want_k = modeling.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), want_q, rtol=0, atol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin), want_k, rtol=0, atol=0)


def test_qk_taps_ask_for_the_positions_the_architecture_has():
    assert qk_taps([2], tiny_config("bert")) == {Tap("q", 2), Tap("k", 2)}
    assert qk_taps([2], tiny_config("llama")) == {Tap("q", 2), Tap("k", 2), Tap("rope", 2)}
    assert qk_taps([1], tiny_config("mpnet")) == {Tap("q", 1), Tap("k", 1), Tap("bias", 1)}
    with pytest.raises(ValueError, match="bert passes no positions"):
        TapManager(tiny_model("bert", layers=2), {Tap("rope", 1)}, detach=True)
    with pytest.raises(ValueError, match="llama passes rope positions"):
        TapManager(tiny_model("llama", layers=2), {Tap("bias", 1)}, detach=True)


def test_qwen3_taps_the_normed_heads():
    """Qwen3 normalises each query/key head before rotating it; the q/k taps are those normed heads."""
    model = eager_model("qwen3", layers=1)
    with torch.no_grad():  # a non-trivial norm weight, so normed and raw heads differ
        model.model.layers[0].self_attn.q_norm.weight.uniform_(0.5, 1.5)
    taps = TapManager(model, {Tap("q", 1)}, detach=True)
    seen = {}
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: seen.setdefault("raw", out))
    batch = padded_batch("right", pad_id=0)
    with torch.no_grad(), taps.capture() as cap:
        model(**batch)
    att = model.model.layers[0].self_attn
    B, L, _ = seen["raw"].shape
    with torch.no_grad():
        want = att.q_norm(seen["raw"].view(B, L, -1, att.head_dim)).flatten(2)
    torch.testing.assert_close(cap.q[1], want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- attn_kl


def _attn_kl_run(student, teacher, batch):
    causal = arch.is_causal(student)
    setup = LossSetup(student.config, teacher.config, None, "causal_lm" if causal else "classification", "attn_kl",
                      causal=causal)
    loss = build_loss("attn_kl", setup, {})
    s_taps, t_taps = loss.taps()
    outputs = []
    for model, taps, detach in ((student, s_taps, False), (teacher, t_taps, True)):
        manager = TapManager(model, taps, detach=detach)
        with torch.set_grad_enabled(not detach), manager.capture() as cap:
            out = model(**batch, output_attentions=True)
        manager.check_complete(cap)
        manager.remove()
        outputs.append((out, cap))
    (s_out, s_cap), (t_out, t_cap) = outputs
    value = loss(ModelOutputs(None, s_cap), ModelOutputs(None, t_cap), LossBatch(batch["attention_mask"]))
    return value, loss.pairs, s_out.attentions, t_out.attentions, s_cap, t_cap


@pytest.mark.parametrize("model_type,side", [("llama", "left"), ("qwen3", "right"), ("mpnet", "right")])
def test_attn_kl_is_the_kl_of_the_models_attention_probabilities(model_type, side):
    teacher = eager_model(model_type, layers=3, width=64, heads=4, seed=0)
    student = eager_model(model_type, layers=2, width=32, heads=4, seed=1)
    batch = padded_batch(side, pad_id=teacher.config.pad_token_id)
    mask = batch["attention_mask"]
    value, pairs, s_att, t_att, s_cap, t_cap = _attn_kl_run(student, teacher, batch)
    assert pairs == [(2, 3)]
    p_t, p_s = t_att[2].double(), s_att[1].double()
    kl = (torch.special.xlogy(p_t, p_t) - torch.special.xlogy(p_t, p_s)).sum(-1)  # [B, H, L]
    rows = mask.bool()[:, None, :].expand_as(kl)
    torch.testing.assert_close(value.double(), kl[rows].mean(), rtol=1e-5, atol=1e-6)
    # Student captures keep their autograd path (positions included: MPNet's bias is a learned table), the
    # teacher's are detached.
    assert s_cap.q[2].requires_grad and not t_cap.q[3].requires_grad
    value.backward()
    base = student.base_model
    grad = (base.encoder.relative_attention_bias.weight.grad if model_type == "mpnet"
            else base.layers[1].self_attn.q_proj.weight.grad)
    assert grad is not None and grad.abs().sum() > 0
    if model_type == "mpnet":
        assert s_cap.bias[2].requires_grad and not t_cap.bias[3].requires_grad


@pytest.mark.parametrize("model_type", ["llama", "mpnet"])
def test_attn_kl_of_a_model_with_itself_is_zero(model_type):
    model = eager_model(model_type, layers=2)
    batch = padded_batch("left" if model_type == "llama" else "right", pad_id=model.config.pad_token_id)
    value = _attn_kl_run(model, model, batch)[0].detach()
    assert abs(value.item()) < 1e-6


# ------------------------------------------------------------------------------------------------ MPNet students


def test_mpnet_hidden_taps_equal_its_hidden_states():
    model = tiny_model("mpnet", layers=3)
    batch = padded_batch("right", pad_id=1)
    taps = TapManager(model, {Tap("hidden", i) for i in range(4)}, detach=True)
    with torch.no_grad(), taps.capture() as cap:
        out = model(**batch, output_hidden_states=True)
    for i in range(4):
        torch.testing.assert_close(cap.hidden[i], out.hidden_states[i], rtol=0, atol=0)


def test_mpnet_student_from_teacher_blocks(tmp_path):
    """Every block kept reproduces the teacher (the relative-position table is copied); a student read from the
    saved teacher's safetensors equals the copy of the loaded teacher; block 1 of a [1, 3] student is block 1."""
    teacher = tiny_model("mpnet", layers=3, num_labels=3)
    batch = padded_batch("right", pad_id=1)
    full = models.student_from_layers(teacher, [1, 2, 3]).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(**batch).logits, teacher(**batch).logits, rtol=0, atol=0)
    teacher.save_pretrained(tmp_path)
    copied = models.student_from_layers(teacher, [1, 3]).state_dict()
    read = models.load_student_blocks(str(tmp_path), teacher.config, [1, 3], "classification", 3)
    assert read.state_dict().keys() == copied.keys()
    for key, value in read.state_dict().items():
        torch.testing.assert_close(value, copied[key], rtol=0, atol=0, msg=key)
    taps_s, taps_t = (TapManager(m, {Tap("hidden", 1)}, detach=True) for m in (read.eval(), teacher))
    with torch.no_grad(), taps_s.capture() as cap_s, taps_t.capture() as cap_t:
        read(**batch)
        teacher(**batch)
    torch.testing.assert_close(cap_s.hidden[1], cap_t.hidden[1], rtol=0, atol=0)
    assert arch.position_limit(teacher.config) == teacher.config.max_position_embeddings - 2


@pytest.mark.slow
@pytest.mark.skipif(not (MPNET_DIR / "config.json").is_file(),
                    reason=f"all-mpnet-base-v2 is not assembled in {MPNET_DIR} (benchmarks/quality/get_mpnet.py)")
def test_real_mpnet_student_attention_is_the_models():
    """A 6-block student of the real all-mpnet-base-v2: head_qk reproduces its eager attention on a sentence."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MPNET_DIR)
    config = models.load_config(str(MPNET_DIR), "classification", 2)
    student = models.load_student_blocks(str(MPNET_DIR), config, models.choose_layers("uniform", 6, 12),
                                         "classification", 2).eval()
    assert student.config.num_hidden_layers == 6
    batch = dict(tokenizer(["The quick brown fox jumps over the lazy dog.", "A short one."], padding=True,
                           return_tensors="pt"))
    out, cap = captured_forward(student, batch, range(1, 7))
    for layer in range(1, 7):
        want = out.attentions[layer - 1]
        rows = real_rows(batch["attention_mask"], want)
        got = probabilities(*head_qk(cap, layer, student.config), batch["attention_mask"], causal=False)
        torch.testing.assert_close(got[rows], want[rows], rtol=0, atol=1e-5)


@pytest.mark.multiproc
@pytest.mark.parametrize("model_type", ["llama", "mpnet"])
def test_zero3_position_taps_equal_unsharded(model_type, tmp_path):
    """Two gloo ranks: a teacher partitioned at load time gives the same positions and rebuilt scores as an
    unsharded copy (the hooks read call arguments only, never the empty parameter shards)."""
    import json
    import subprocess
    import sys

    from tests.test_multiproc import TIMEOUT, _env
    from tests.tiny import REPO, free_port

    task = "causal_lm" if model_type == "llama" else "classification"
    tiny_model(model_type, layers=2, task=task).save_pretrained(tmp_path / "model")
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "workers" / "zero3_positions.py"), str(tmp_path / "model"), task, str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["partitioned"], "the teacher was not partitioned: the test would prove nothing"
    assert report["captures"] == 2 * 3  # q, k and the positions of both blocks
    assert report["max_abs_diff"] < 1e-5
