"""What a model and the losses read from a collated batch, and how batches reach the device.

Shared by the engine (training, evaluation inside a run) and by ``scaledkd eval`` (an exported model), so the two
feed models identically.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .losses.base import LossBatch

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
EXAMPLE_IDS = "example_ids"  # [B] long: a training batch's rows of the prepared train split (teacher-cache lookups)

Batch = dict[str, Any]


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's keyword arguments from a batch.

    A packed causal-LM batch (``position_ids`` restarting at each document, no ``attention_mask``;
    ``scaledkd/data/lm.py``) runs without a KV cache: only then does transformers turn the restarting position
    ids into a per-document causal mask.
    """
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "position_ids" in inputs and "attention_mask" not in inputs:
        inputs["use_cache"] = False
    return inputs


def loss_batch(batch: Mapping[str, torch.Tensor]) -> LossBatch:
    """The masks and labels the losses read: ``attention_mask [B, L]`` (all ones for packed rows), ``labels``,
    ``loss_mask [B, L]``."""
    mask = batch.get("attention_mask")
    if mask is None:  # packed causal-LM rows have no padding
        mask = torch.ones_like(batch["input_ids"])
    return LossBatch(attention_mask=mask, labels=batch.get("labels"), loss_mask=batch.get("loss_mask"))


def to_device(batch: Batch, device: torch.device | None) -> Batch:
    """Tensors of ``batch`` moved to ``device`` (None: left where they are)."""
    if device is None:
        return batch
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def eval_batches(dataset, batch_size: int, collate: Callable[[list[dict[str, Any]]], Batch],
                 device: torch.device | None = None) -> Iterator[Batch]:
    """The whole of ``dataset`` in order, ``batch_size`` rows at a time (the last batch may be smaller)."""
    for i in range(0, len(dataset), batch_size):
        yield to_device(collate([dataset[j] for j in range(i, min(len(dataset), i + batch_size))]), device)
