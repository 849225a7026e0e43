"""Tokenisation (truncate, never pad) and dynamic padding per batch."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import torch

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def tokenize_dataset(ds: datasets.Dataset, tokenizer: Any, max_length: int) -> datasets.Dataset:
    """Tokenise ``text_a`` (and ``text_b``) into model inputs, truncated to ``max_length`` and unpadded.

    Args:
        ds: a dataset from :func:`load_examples` (``text_a``, optional ``text_b``, optional ``label``).
        tokenizer: a Hugging Face tokenizer.
        max_length: tokens per example, special tokens included (pairs are truncated longest-first).

    Returns:
        A dataset with ``input_ids``, ``attention_mask``, ``token_type_ids`` (when the tokenizer makes them) and
        ``labels`` (when ``ds`` has ``label``); the text columns are removed. Padding is left to the collator.
    """
    pair = "text_b" in ds.column_names
    labeled = "label" in ds.column_names

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if pair and any(b is None for b in batch["text_b"]):
            # Single texts mixed into a pair task (supplementary ILD data): each row on its own.
            rows = [tokenizer(a, b, truncation=True, max_length=max_length, padding=False)
                    for a, b in zip(batch["text_a"], batch["text_b"], strict=True)]
            enc = {k: [r[k] for r in rows] for k in rows[0]}
        else:
            enc = tokenizer(
                batch["text_a"],
                batch["text_b"] if pair else None,
                truncation=True,
                max_length=max_length,
                padding=False,
            )
        out = {k: enc[k] for k in TOKEN_KEYS if k in enc}
        if labeled:
            out["labels"] = batch["label"]
        return out

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenize")


def make_collator(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """A collator that pads a list of tokenised examples to the longest one in the batch.

    Padding follows ``tokenizer.padding_side``; ``input_ids`` are padded with ``tokenizer.pad_token_id``, the mask
    and token types with 0.

    Returns:
        ``collate(features) -> {"input_ids": [B, L] long, "attention_mask": [B, L] long, "token_type_ids": [B, L]
        long (when present), "labels": [B] long (classification) or float32 (regression)}``.

    Raises:
        ValueError: the tokenizer has no pad token (set ``tokenizer.pad_token`` first, e.g. to the EOS token).
    """
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no pad token; set tokenizer.pad_token (e.g. to eos) first"
        )
    left = getattr(tokenizer, "padding_side", "right") == "left"
    type_pad = getattr(tokenizer, "pad_token_type_id", 0)
    pad_values = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": type_pad}

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for key, value in pad_values.items():
            if key not in features[0]:
                continue
            padded = []
            for f in features:
                seq = f[key].tolist() if torch.is_tensor(f[key]) else list(f[key])
                fill = [value] * (width - len(seq))
                padded.append(fill + seq if left else seq + fill)
            batch[key] = torch.tensor(padded, dtype=torch.long)
        if "labels" in features[0]:
            labels = torch.stack([torch.as_tensor(f["labels"]) for f in features])
            batch["labels"] = labels.float() if labels.is_floating_point() else labels.long()
        return batch

    return collate
