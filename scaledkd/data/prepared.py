"""Tokenised splits and their collator: what a run (and ``scaledkd eval``) trains and evaluates on.

One function for both, so a model is evaluated on exactly the rows it was evaluated on during its run.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets

from scaledkd.config import DataConfig
from scaledkd.data.collate import make_collator, tokenize_dataset
from scaledkd.data.encode import pack_tokenized, tokenize_documents
from scaledkd.data.lm import make_lm_collator, pack_documents
from scaledkd.data.loading import Split, load_examples
from scaledkd.data.stream import StreamRows


@dataclass
class Prepared:
    """A tokenised split and the collator that turns its rows into padded ``[B, L]`` batches (``rows`` is a
    :class:`~scaledkd.data.stream.StreamRows` for streamed training data)."""

    rows: datasets.Dataset | StreamRows
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]


def prepare_split(cfg: DataConfig, tokenizer: Any, split: Split, seed: int, *, causal_lm: bool,
                  examples: datasets.Dataset | None = None) -> Prepared:
    """Rows of one split: classification/regression/text examples tokenised to ``data.max_length``, or, for a
    causal LM, documents packed into rows (training rows shuffled with ``seed``, the last partial row dropped;
    held-out rows in order, the partial row kept).

    With ``data.dataset``, documents are tokenised and packed by cached ``datasets`` maps
    (:func:`~scaledkd.data.encode.tokenize_documents`, :func:`~scaledkd.data.encode.pack_tokenized`): the same
    rows as :func:`~scaledkd.data.lm.pack_documents` makes, memory-mapped; streamed training documents become
    :class:`~scaledkd.data.stream.StreamRows`, packed as they are read.

    Args:
        examples: the split's raw examples (documents for ``lm``) when already read (the run plan counted them);
            else :func:`~scaledkd.data.loading.load_examples` reads them.
    """
    if examples is None:
        examples = load_examples(cfg, split, seed)  # documents for data.task: lm
    if causal_lm and cfg.dataset is not None:
        examples = tokenize_documents(examples, tokenizer, cfg.chat_template)
        if isinstance(examples, datasets.IterableDataset):
            return Prepared(StreamRows(examples, cfg.max_length, cfg.packing), make_lm_collator(tokenizer))
        train = split == "train"
        rows = pack_tokenized(examples, cfg.max_length, cfg.packing, shuffle_seed=seed if train else None,
                              drop_remainder=train)
        return Prepared(rows, make_lm_collator(tokenizer))
    if causal_lm:
        train = split == "train"
        rows = pack_documents(examples, tokenizer, cfg.max_length, cfg.packing,
                              shuffle_seed=seed if train else None, drop_remainder=train)
        return Prepared(rows, make_lm_collator(tokenizer))
    rows = tokenize_dataset(examples, tokenizer, cfg.max_length)
    return Prepared(rows, make_collator(tokenizer))
