"""Causal-LM logit losses from the final hidden states and the output head (scaledkd/losses/head.py): equal to the
full-logits path in value and gradient (hidden states, head weight and bias; tied and untied heads), for every
divergence, temperature, top-k, -inf teacher ids, padding and the hard-label loss; the engine skips the heads only
when every logit reader takes that form; no tensor with a vocabulary row per token exists; and a 2-rank ZeRO-3
student trains through it exactly as through full logits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from scaledkd import models
from scaledkd.engine.module import DistillModule, TeacherRunner
from scaledkd.losses import LossSetup, build_loss
from scaledkd.losses.divergence import (
    DIVERGENCES,
    chunked_cross_entropy,
    token_divergence,
)
from scaledkd.losses.head import OutputHead, head_cross_entropy, head_token_divergence
from tests.conftest import tiny_model
from tests.tiny import REPO, free_port

B, L, D_S, D_T, V, C = 3, 7, 12, 16, 50, 4


def _heads(bias: bool, seed: int = 0) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(seed)
    return nn.Linear(D_S, V, bias=bias), nn.Linear(D_T, V, bias=bias).requires_grad_(False)


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, L, D_S, generator=g)
    h_t = torch.randn(B, L, D_T, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 4:] = False  # padding
    mask[2, :2] = False  # a prompt
    return h_s, h_t, mask


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [t for t in tensors if t is not None]))


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize(("temperature", "top_k", "bias"), [(1.0, None, False), (2.5, 9, True)])
def test_head_divergence_equals_logits_path(kind, temperature, top_k, bias):
    s_head, t_head = _heads(bias)
    h_s, h_t, mask = _inputs()
    h_s.requires_grad_()
    params = dict(kind=kind, temperature=temperature, top_k=top_k, beta=0.3, alpha=0.2)
    want = token_divergence(s_head(h_s), t_head(h_t), mask, chunk_size=None, **params)
    got = head_token_divergence(h_s, OutputHead(s_head), mask, teacher_hidden=h_t, teacher_head=OutputHead(t_head),
                                chunk_size=C, **params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    _assert_same(_grads(got, h_s, s_head.weight, s_head.bias), _grads(want, h_s, s_head.weight, s_head.bias))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_head_divergence_with_teacher_logits_and_ruled_out_ids(kind):
    """A teacher given as logits (a cache) with -inf ids: the same renormalised comparison as token_divergence."""
    s_head, t_head = _heads(bias=False)
    h_s, h_t, mask = _inputs()
    h_s.requires_grad_()
    with torch.no_grad():
        t_logits = t_head(h_t)
    t_logits[..., :5] = float("-inf")
    t_logits[0, 3] = float("-inf")  # a token with every id ruled out contributes 0
    want = token_divergence(s_head(h_s), t_logits, mask, kind, temperature=1.5, chunk_size=None)
    got = head_token_divergence(h_s, OutputHead(s_head), mask, teacher_logits=t_logits, kind=kind, temperature=1.5,
                                chunk_size=C)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    _assert_same(_grads(got, h_s, s_head.weight), _grads(want, h_s, s_head.weight))


def test_head_cross_entropy_equals_logits_path():
    s_head, _ = _heads(bias=True)
    h_s, _, mask = _inputs()
    h_s.requires_grad_()
    labels = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(3)).masked_fill(~mask, -100)
    want = chunked_cross_entropy(s_head(h_s), labels, chunk_size=None)
    got = head_cross_entropy(h_s, OutputHead(s_head), labels, chunk_size=C)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    _assert_same(_grads(got, h_s, s_head.weight, s_head.bias), _grads(want, h_s, s_head.weight, s_head.bias))
    with torch.no_grad():  # the no-grad loop gives the same value
        torch.testing.assert_close(head_cross_entropy(h_s, OutputHead(s_head), labels, chunk_size=C), want,
                                   rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match=r"label 50 is out of range"):
        head_cross_entropy(h_s, OutputHead(s_head), labels.masked_fill(mask, V), chunk_size=C)


def test_no_scored_token_gives_zero_with_gradients_everywhere():
    """Every rank runs the head whatever it scores, so under ZeRO-3 each gets a (zero) head gradient."""
    s_head, t_head = _heads(bias=True)
    h_s, h_t, _ = _inputs()
    h_s.requires_grad_()
    none = torch.zeros(B, L, dtype=torch.bool)
    loss = head_token_divergence(h_s, OutputHead(s_head), none, teacher_hidden=h_t, teacher_head=OutputHead(t_head))
    assert loss.item() == 0.0
    loss.backward()
    assert s_head.weight.grad is not None and not s_head.weight.grad.any() and not h_s.grad.any()


def test_head_errors():
    s_head, t_head = _heads(bias=False)
    h_s, h_t, mask = _inputs()
    with pytest.raises(ValueError, match="either as teacher_logits or as teacher_hidden"):
        head_token_divergence(h_s, OutputHead(s_head), mask)
    with pytest.raises(ValueError, match="unknown divergence kind 'kl'"):
        head_token_divergence(h_s, OutputHead(s_head), mask, teacher_hidden=h_t, teacher_head=OutputHead(t_head),
                              kind="kl")
    with pytest.raises(ValueError, match=r"teacher_logits \(3, 7, 49\) do not match"):
        head_token_divergence(h_s, OutputHead(s_head), mask, teacher_logits=torch.zeros(B, L, V - 1))
    with pytest.raises(ValueError, match="top_k=0"):
        head_token_divergence(h_s, OutputHead(s_head), mask, teacher_hidden=h_t, teacher_head=OutputHead(t_head),
                              top_k=0)


# ------------------------------------------------------------------------------------------ engine


def _lm_losses(student, teacher, head_chunks: bool, task_head_chunks: bool | None = None) -> dict:
    kd = LossSetup(student.config, teacher.config, None, "causal_lm", "lm_kd", causal=True)
    task = LossSetup(student.config, None, None, "causal_lm", "lm_task", causal=True)
    task_hc = head_chunks if task_head_chunks is None else task_head_chunks
    return {"lm_kd": build_loss("lm_kd", kd, {"divergence": "skew_kl", "temperature": 2.0, "top_k": 20,
                                              "chunk_size": 3, "head_chunks": head_chunks}),
            "lm_task": build_loss("lm_task", task, {"chunk_size": 5, "head_chunks": task_hc})}


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.roll(-1, 1).masked_fill(mask == 0, -100)
    labels[:, -1] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _step(model_type: str, tied: bool, head_chunks: bool, task_head_chunks: bool | None = None):
    teacher = models.freeze(tiny_model(model_type, layers=2, seed=0))
    student = tiny_model(model_type, layers=1, width=32, heads=2, seed=1, tie_word_embeddings=tied).train()
    module = DistillModule(student, _lm_losses(student, teacher, head_chunks, task_head_chunks),
                           {"lm_kd": 1.0, "lm_task": 0.5})
    runner = TeacherRunner(teacher, module.teacher_taps(), head=module.teacher_head())
    batch = _batch()
    t_out = runner(batch)
    total, terms = module(batch, t_out)
    total.backward()
    grads = {n: p.grad for n, p in student.named_parameters()}
    return module, runner, t_out, terms, grads


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("tied", [True, False])
def test_distill_module_head_path_equals_logits_path(model_type, tied):
    module, runner, t_out, terms, grads = _step(model_type, tied, head_chunks=True)
    assert module.head is not None and runner.head is not None  # both heads were skipped ...
    assert t_out.logits is None and t_out.hidden_final.shape == (2, 8, 64)  # ... [B, L, D], the final norm's output
    ref_module, ref_runner, _, ref_terms, ref_grads = _step(model_type, tied, head_chunks=False)
    assert ref_module.head is None and ref_runner.head is None
    for name in terms:
        torch.testing.assert_close(terms[name], ref_terms[name], rtol=1e-5, atol=1e-7)
    out = module.student.get_output_embeddings().weight
    assert (out is module.student.get_input_embeddings().weight) == tied
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert grads[next(n for n, p in module.student.named_parameters() if p is out)].abs().sum() > 0


def test_a_loss_needing_full_logits_keeps_the_student_head():
    """lm_task with head_chunks: false needs the student's logits: the student runs its head, the teacher (read only
    by lm_kd) still does not, and lm_kd applies the teacher's head in full."""
    module, runner, _, terms, grads = _step("llama", False, head_chunks=True, task_head_chunks=False)
    assert module.head is None and runner.head is not None
    _, _, _, ref_terms, ref_grads = _step("llama", False, head_chunks=False)
    for name in terms:
        torch.testing.assert_close(terms[name], ref_terms[name], rtol=1e-5, atol=1e-7)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_head_chunks_must_be_a_bool():
    student = tiny_model("llama", layers=1)
    with pytest.raises(ValueError, match=r"head_chunks='yes' must be true or false"):
        build_loss("lm_task", LossSetup(student.config, None, None, "causal_lm", "lm_task", causal=True),
                   {"head_chunks": "yes"})


class _VocabRows(TorchDispatchMode):
    """Records, for every tensor an op produces and every tensor autograd saves, how many rows of V it holds."""

    def __init__(self, vocab: int, weight_shapes: set[tuple[int, ...]]) -> None:
        super().__init__()
        self.vocab, self.weight_shapes, self.max_rows = vocab, weight_shapes, 0

    def _see(self, t) -> None:
        if isinstance(t, torch.Tensor) and self.vocab in t.shape and tuple(t.shape) not in self.weight_shapes:
            self.max_rows = max(self.max_rows, t.numel() // self.vocab)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            self._see(t)
        return out


@pytest.mark.parametrize("head_chunks", [True, False])
def test_no_tensor_holds_a_vocabulary_row_per_token(head_chunks):
    """Forward and backward of a distillation step: with head_chunks no tensor (produced by any op, or saved for the
    backward) holds more than one chunk (5 tokens) of vocabulary rows; the full-logits path holds B * L of them,
    which shows the check can fail. Head weights ``[V, D]`` (and transposes, gradients) are exempt."""
    teacher = models.freeze(tiny_model("llama", layers=2, seed=0))
    student = tiny_model("llama", layers=1, width=32, heads=2, seed=1, tie_word_embeddings=False).train()
    losses = _lm_losses(student, teacher, head_chunks)
    module = DistillModule(student, losses, {"lm_kd": 1.0, "lm_task": 0.5})
    runner = TeacherRunner(teacher, module.teacher_taps(), head=module.teacher_head())
    batch = _batch()
    vocab = student.config.vocab_size
    saved: list[int] = []
    weights = {(vocab, 32), (vocab, 64), (32, vocab), (64, vocab)}  # the heads' weights, their transposes and grads

    def pack(t: torch.Tensor) -> torch.Tensor:
        if vocab in t.shape and tuple(t.shape) not in weights:
            saved.append(t.numel() // vocab)
        return t

    mode = _VocabRows(vocab, weights)
    with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total, _ = module(batch, runner(batch))
        total.backward()
    if head_chunks:
        assert mode.max_rows <= 5 and max(saved, default=0) <= 5  # lm_task's chunks are 5 tokens, lm_kd's 3
    else:
        assert mode.max_rows >= 16 and max(saved) >= 16  # [B, L, V] logits, B * L = 16


@pytest.mark.multiproc
def test_zero3_student_and_teacher_head_path_train_like_the_logits_path(tmp_path):
    """2 gloo ranks, ZeRO-3 student (heads partitioned) and teacher, ranks scoring different numbers of tokens: three
    AdamW steps give the same losses through the heads as through full logits, with tied and untied heads."""
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__).parent / "workers" / "zero3_head.py"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["partitioned"], "the student's head was not partitioned: the test would prove nothing"
    assert report["head_form"]
    for tied, paths in report["losses"].items():
        assert paths["head"] == pytest.approx(paths["logits"], rel=1e-5), tied
        assert paths["head"][0] != pytest.approx(paths["head"][-1], rel=1e-3)  # the steps did train
