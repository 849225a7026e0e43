"""Dev evaluation: GLUE metrics for task students, teacher agreement for task-agnostic ones.

Every rank runs the whole dev set (under ZeRO-3 each forward is a collective), rank 0's numbers are reported.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .engine.module import model_inputs
from .metrics import compute_metrics


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding: mean of real-token states. ``[B, L, D], [B, L] -> [B, D]``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def last_hidden(out) -> torch.Tensor:
    if getattr(out, "last_hidden_state", None) is not None:
        return out.last_hidden_state
    return out.hidden_states[-1]


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], task: str
            ) -> tuple[list[float | int], list[float | int]]:
    """Predictions and references of a classification/regression model over ``batches``."""
    was_training = model.training
    model.eval()
    preds: list = []
    refs: list = []
    for batch in batches:
        logits = model(**model_inputs(batch)).logits.float()
        if task == "regression":
            preds += logits.squeeze(-1).tolist()
            refs += batch["labels"].float().tolist()
        else:
            preds += logits.argmax(-1).tolist()
            refs += batch["labels"].long().tolist()
    model.train(was_training)
    return preds, refs


def evaluate_task(model: nn.Module, batches: Iterable, task: str, metric_name: str) -> dict[str, float]:
    preds, refs = predict(model, batches, task)
    return compute_metrics(metric_name, preds, refs)


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
              ) -> dict[str, float]:
    """Task-agnostic quality: mean cosine between student and teacher sentence embeddings (mean-pooled last
    hidden states) on held-out text, and the same for token states. Needs equal widths."""
    was_training = student.training
    student.eval()
    sent, tok, n_sent, n_tok = 0.0, 0.0, 0, 0
    for batch in batches:
        inputs = model_inputs(batch)
        h_s = last_hidden(student(**inputs)).float()
        h_t = last_hidden(teacher(**inputs)).float()
        if h_s.shape[-1] != h_t.shape[-1]:
            student.train(was_training)
            return {}
        mask = batch["attention_mask"]
        cos_sent = F.cosine_similarity(mean_pool(h_s, mask), mean_pool(h_t, mask), dim=-1)
        cos_tok = F.cosine_similarity(h_s, h_t, dim=-1)[mask.bool()]
        sent += cos_sent.sum().item()
        n_sent += cos_sent.numel()
        tok += cos_tok.sum().item()
        n_tok += cos_tok.numel()
    student.train(was_training)
    return {"embedding_cosine": sent / max(1, n_sent), "token_cosine": tok / max(1, n_tok),
            "score": sent / max(1, n_sent)}


@torch.no_grad()
def sts_spearman(encode: Callable[[list[str]], torch.Tensor], pairs: list[tuple[str, str]], gold: list[float]
                 ) -> float:
    """Zero-shot STS: Spearman correlation between cosine similarities of sentence embeddings and gold scores."""
    a = encode([p[0] for p in pairs])
    b = encode([p[1] for p in pairs])
    sims = F.cosine_similarity(a, b, dim=-1).tolist()
    return compute_metrics("stsb", sims, gold)["spearmanr"]
