"""Dev evaluation: GLUE metrics for task students, perplexity for causal LMs, teacher agreement for task-agnostic
ones.

Every rank runs the whole dev set (under ZeRO-3 each forward is a collective), rank 0's numbers are reported.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .inputs import eval_batches, model_inputs
from .losses.divergence import IGNORE_INDEX, chunked_cross_entropy
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
            ) -> tuple[list[float | int], list[float | int], float]:
    """Predictions and references of a classification/regression model over ``batches``, and the mean task loss
    per row against the references: cross-entropy of the ``[B, C]`` logits, or MSE of the ``[B, 1]`` regression
    output (early stopping's ``loss`` metric)."""
    was_training = model.training
    model.eval()
    preds: list = []
    refs: list = []
    loss_sum = 0.0
    for batch in batches:
        logits = model(**model_inputs(batch)).logits.float()
        if task == "regression":
            out, labels = logits.squeeze(-1), batch["labels"].float()
            loss_sum += F.mse_loss(out, labels, reduction="sum").item()
        else:
            out, labels = logits.argmax(-1), batch["labels"].long()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        preds += out.tolist()
        refs += labels.tolist()
    model.train(was_training)
    return preds, refs, loss_sum / max(1, len(refs))


def evaluate_task(model: nn.Module, batches: Iterable, task: str, metric_name: str) -> dict[str, float]:
    preds, refs, _ = predict(model, batches, task)
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


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Held-out perplexity of a causal LM: ``exp`` of the mean next-token NLL over every scored token.

    Batches are causal-LM batches (``scaledkd/data/lm.py``): ``labels`` ``[B, L]`` already aligned with the
    logits, -100 where nothing is scored. The NLL is computed in float32 chunks.

    Returns:
        ``{"perplexity", "nll" (nats per token), "tokens" (scored), "score" (= -nll, higher is better)}``.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        logits = model(**model_inputs(batch)).logits
        labels = batch["labels"]
        n = int((labels != IGNORE_INDEX).sum())
        if n:
            total += chunked_cross_entropy(logits, labels).item() * n
            count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: the held-out batches have no scored token")
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "score": -nll}


@torch.no_grad()
def generate_sample(model_dir: str | Path, prompt: str, max_new_tokens: int = 40) -> dict[str, str]:
    """Greedy continuation of ``prompt`` by the causal LM saved in ``model_dir`` (reloaded from disk, so it
    shows what the exported folder does). The prompt gets the BOS that ``data.task: lm`` puts before documents."""
    from . import models
    from .data.lm import special_ids

    # Through models: any model path works (an exported folder, a package, a GGUF file).
    tokenizer = models.load_tokenizer(str(model_dir))
    model = models.load_pretrained(str(model_dir), "causal_lm").eval()
    bos, eos = special_ids(tokenizer)
    ids = ([] if bos is None else [bos]) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids])
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=max_new_tokens, pad_token_id=eos, eos_token_id=eos)
    completion = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    return {"prompt": prompt, "completion": completion, "model": str(model_dir)}


# ------------------------------------------------------------------------------------------ exported models


def _exported_config(model_dir: str | Path) -> dict:
    """The recipe an exported student was trained with (``scaledkd_config.yaml``), or {} for other models."""
    import yaml

    from .export import CONFIG_FILE

    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def evaluate_model_dir(model_dir: str, *, task: str | None = None, data_dir: str | None = None,
                       file: str | None = None, documents: str = "blank_line", packing: bool = True,
                       batch_size: int = 64, max_length: int | None = None, max_samples: int | None = None,
                       seed: int = 42) -> dict:
    """``scaledkd eval``: dev scores of a saved model (GLUE metrics, or perplexity of a text file for ``lm``).

    The task and ``max_length`` default to what an exported scaledkd student was trained with (its
    ``scaledkd_config.yaml``); a model from elsewhere needs ``task`` (``max_length`` then defaults to 128).
    """
    from . import data, models
    from .build import task_kind
    from .config import ConfigError, DataConfig

    trained = (_exported_config(model_dir).get("data") or {})
    task = task or trained.get("task")
    if task is None:
        raise ConfigError(f"--task is needed: {model_dir!r} has no scaledkd_config.yaml saying what it was trained "
                          "on; give a GLUE task (sst2, rte, stsb, ...) or lm")
    max_length = max_length or (trained.get("max_length") if trained.get("task") == task else None) or 128
    if task == "lm" and not file:
        raise ConfigError("--task lm needs --file (the text or JSON-lines file to score)")
    lm_kw = ({"train_file": file, "eval_file": file, "documents": documents, "packing": packing}
             if task == "lm" else {})
    data_cfg = DataConfig(task=task, data_dir=data_dir, max_length=max_length, max_eval_samples=max_samples,
                          **lm_kw)
    spec = data.task_spec(data_cfg)
    kind = task_kind(spec)
    if kind == "agnostic":
        raise ConfigError(f"--task {task} has no labels to evaluate; give a GLUE task or lm")
    model = models.load_pretrained(model_dir, kind, spec.num_labels)
    tokenizer = models.load_tokenizer(model_dir)
    dev = data.prepare_split(data_cfg, tokenizer, "dev", seed, causal_lm=kind == "causal_lm")
    batches = eval_batches(dev.rows, batch_size, dev.collate)
    if kind == "causal_lm":
        return {"model": model_dir, "task": "lm", "file": file, "rows": len(dev.rows), "max_length": max_length,
                **perplexity(model, batches)}
    return {"model": model_dir, "task": task, "examples": len(dev.rows), "max_length": max_length,
            **evaluate_task(model, batches, kind, spec.name)}
