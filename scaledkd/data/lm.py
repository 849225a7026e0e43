"""Causal language modelling data (``data.task: lm``): documents -> token ids -> packed rows -> batches.

Documents come from plain text (cut by ``data.documents``: paragraphs, lines, the whole file or a literal
separator), from the built-in ``builtin:python-docs`` corpus, or from JSON lines (``.jsonl``/``.json``) with one
text column (a document per record) or two, ``[prompt, response]``, where only the response is scored. The
held-out split is a seeded share of the *documents* (``SPLIT_SEED``, as for ``text``), so no document is split
between training and evaluation.

Each document becomes ``[bos] + prompt + text + [eos]``: the text is tokenised without the tokenizer's own
special tokens, EOS always ends a document, and BOS starts it when the tokenizer has a BOS token distinct from
EOS (GPT-2-style tokenizers, whose BOS is EOS, get none).

Rows. ``labels[i]`` is the token the model must predict at position ``i`` (already shifted, aligned with the
logits), or -100 where nothing is scored. ``loss_mask = labels != -100``.

* Packed (``data.packing: true``, the default): the training documents are shuffled with the run's seed and
  concatenated; the stream is cut into rows of exactly ``max_length`` tokens (the training remainder is dropped;
  the held-out remainder becomes a shorter last row so every held-out token is scored). Boundaries:

  - attention never crosses a document boundary: ``position_ids`` restart at 0 at every document start and at
    every row start, and batches carry no ``attention_mask``; transformers 5 then builds a per-document
    block-causal mask from the position ids (``masking_utils.find_packed_sequence_indices``, for every model
    that uses ``create_causal_mask``: GPT-2, Llama, Qwen2/3, Mistral), which ``engine.module.model_inputs``
    enables by running such batches without a KV cache. Tested: a packed row's logits equal each document's
    logits computed alone.
  - the loss never predicts across a boundary: the prediction at a document's EOS (whose next token starts
    another document) is not scored, nor are prompt tokens or padding.
  - a document that does not fit in the rest of a row continues at the start of the next row with positions
    restarting at 0 (it sees only the part inside its row); the prediction at a row's last position is scored
    when the next token (the next row's first) belongs to the same document.

* Unpacked (``data.packing: false``): one document per row, truncated to ``max_length`` (the dropped tokens
  are counted in the log), right-padded per batch with an ``attention_mask``; positions are 0..L-1.
"""
from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import torch

from scaledkd.config import DataConfig
from scaledkd.data.base import (
    SPLIT_SEED,
    DataError,
    logger,
    not_utf8,
    resolve_file,
    seeded_split,
    seeded_subset,
)
from scaledkd.data.sources import source_documents
from scaledkd.data.tabular import read_table
from scaledkd.data.text import BUILTIN_PREFIX, python_docs_text

IGNORE_INDEX = -100
JSONL_SUFFIXES = (".jsonl", ".json")
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")

Split = Literal["train", "dev"]


# ------------------------------------------------------------------------------------------- documents


def split_documents(text: str, documents: str) -> list[str]:
    """Cut a plain-text file into documents (``data.documents``); empty documents are dropped.

    Args:
        text: the whole file.
        documents: ``blank_line`` (blocks separated by blank or whitespace-only lines), ``line``, ``whole`` or
            ``sep:<separator>`` (a literal string, e.g. ``sep:<|endoftext|>``).

    Returns:
        The documents in file order, each stripped of surrounding whitespace (inner newlines are kept).
    """
    if documents == "blank_line":
        parts = _BLANK_LINE.split(text)
    elif documents == "line":
        parts = text.splitlines()
    elif documents == "whole":
        parts = [text]
    elif documents.startswith("sep:") and len(documents) > 4:
        parts = text.split(documents[4:])
    else:
        raise DataError(f"data.documents={documents!r} is not valid; choose one of "
                        "['blank_line', 'line', 'whole', 'sep:<separator>']")
    return [p.strip() for p in parts if p.strip()]


def _read_documents(cfg: DataConfig, name: str, key: str) -> tuple[list[str], list[str]]:
    """(prompts, texts) of one file; prompts are ``""`` for plain text and one-column JSON lines."""
    if name.startswith(BUILTIN_PREFIX):
        if name != f"{BUILTIN_PREFIX}python-docs":
            raise DataError(f"{key}={name!r}: unknown built-in corpus; choose {BUILTIN_PREFIX}python-docs")
        docs = split_documents(python_docs_text(), "blank_line")
        return [""] * len(docs), docs
    path = resolve_file(name, cfg.data_dir, key)
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _jsonl_documents(path, cfg.text_columns)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(path, f"{key}: text file", err) from None
    docs = split_documents(text, cfg.documents)
    return [""] * len(docs), docs


def _jsonl_documents(path: Path, columns: list[str]) -> tuple[list[str], list[str]]:
    if len(columns) not in (1, 2):
        raise DataError(f"data.text_columns={columns!r}: data.task='lm' reads one column (text) or two "
                        "([prompt, response], loss on the response only)")
    table = read_table("jsonl", path)
    missing = [c for c in columns if c not in table]
    if missing:
        hint = ("; for prompt/response records set data.text_columns: [prompt, response]"
                if {"prompt", "response"} <= set(table) and len(columns) == 1 else "")
        raise DataError(f"JSON-lines file {str(path)!r} has no column(s) {missing} (data.text_columns); "
                        f"available columns: {list(table)}{hint}")
    values = [table[c] for c in columns]
    for col, vals in zip(columns, values, strict=True):
        for i, v in enumerate(vals):
            if not isinstance(v, str):
                raise DataError(f"{path}:line {i + 1}: column {col!r} must be a string, got {v!r}")
    if len(columns) == 1:
        texts = [v for v in values[0] if v.strip()]
        return [""] * len(texts), texts
    keep = [i for i, r in enumerate(values[1]) if r.strip()]
    if len(keep) < len(values[1]):
        logger.warning("%s: %d records with an empty %r are skipped", path, len(values[1]) - len(keep), columns[1])
    return [values[0][i] for i in keep], [values[1][i] for i in keep]


def load_documents(cfg: DataConfig, split: Split, seed: int) -> datasets.Dataset:
    """The documents of one split (``load_examples`` for ``data.task: lm``).

    Without ``data.eval_file``, ``heldout_fraction`` of the training file's documents (drawn with
    ``SPLIT_SEED``) are the dev split. ``max_train_samples``/``max_eval_samples`` draw seeded subsets of
    documents.

    With ``data.dataset``, the documents of a ``load_dataset`` source instead
    (:func:`scaledkd.data.sources.source_documents`; streamed training documents are an ``IterableDataset``).

    Returns:
        A dataset with ``prompt`` (conditioning text, not scored; ``""`` for plain text) and ``text`` (scored).

    Raises:
        DataError: a missing or unreadable file, a missing JSON column, or no documents.
    """
    if cfg.dataset is not None:
        return source_documents(cfg, split, seed)
    assert cfg.train_file is not None  # DataConfig guarantees it for task=lm
    source: Split = "train" if cfg.eval_split == "train" else split
    if source == "dev" and cfg.eval_file:
        prompts, texts = _read_documents(cfg, cfg.eval_file, "data.eval_file")
    else:
        prompts, texts = _read_documents(cfg, cfg.train_file, "data.train_file")
        if not cfg.eval_file:
            train_idx, dev_idx = seeded_split(len(texts), cfg.heldout_fraction, SPLIT_SEED)
            keep = dev_idx if source == "dev" else train_idx
            prompts, texts = [prompts[i] for i in keep], [texts[i] for i in keep]
    limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
    if limit is not None:
        keep = seeded_subset(len(texts), limit, seed)
        prompts, texts = [prompts[i] for i in keep], [texts[i] for i in keep]
    if not texts:
        raise DataError(f"empty dataset: data.task='lm' split {split!r} has no documents")
    return datasets.Dataset.from_dict({"prompt": prompts, "text": texts})


# ------------------------------------------------------------------------------------------- tokens


def special_ids(tokenizer: Any) -> tuple[int | None, int]:
    """(BOS id or None, EOS id) used around every document.

    Raises:
        DataError: the tokenizer has no EOS token.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no EOS "
                        "token; data.task='lm' separates documents with EOS (set tokenizer.eos_token)")
    bos = tokenizer.bos_token_id
    return (bos if bos is not None and bos != eos else None), eos


def encode_documents(docs: datasets.Dataset, tokenizer: Any) -> tuple[list[list[int]], list[int]]:
    """Token ids of every document, ``[bos] + prompt + text + [eos]``, and the number of leading unscored ids
    (BOS and prompt) of each."""
    bos, eos = special_ids(tokenizer)
    texts = tokenizer(list(docs["text"]), add_special_tokens=False)["input_ids"]
    prompt_texts = list(docs["prompt"])
    prompts: list[list[int]] = [[] for _ in texts]
    with_prompt = [i for i, p in enumerate(prompt_texts) if p]
    if with_prompt:
        encoded = tokenizer([prompt_texts[i] for i in with_prompt], add_special_tokens=False)["input_ids"]
        for i, ids in zip(with_prompt, encoded, strict=True):
            prompts[i] = ids
    head = [] if bos is None else [bos]
    ids = [head + p + t + [eos] for p, t in zip(prompts, texts, strict=True)]
    unscored = [len(head) + len(p) for p in prompts]
    return ids, unscored


def _targets(ids: list[int], unscored: int) -> np.ndarray:
    """Next-token targets of one document: ``out[i] = ids[i + 1]`` when token ``i + 1`` is scored, else -100;
    the last position (EOS, whose successor is another document) is never scored."""
    out = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    start = max(unscored, 1)  # the first token has no prediction; prompt tokens are not targets
    out[start - 1: len(ids) - 1] = ids[start:]
    return out


def scored_targets(ids: list[int], scored: list[int]) -> np.ndarray:
    """Next-token targets of one document from its scored-token mask (:mod:`scaledkd.data.encode`):
    ``out[i] = ids[i + 1]`` when ``scored[i + 1]``, else -100; the last position is never scored."""
    ids_arr, mask = np.asarray(ids, dtype=np.int64), np.asarray(scored, dtype=bool)
    out = np.full(len(ids_arr), IGNORE_INDEX, dtype=np.int64)
    out[:-1] = np.where(mask[1:], ids_arr[1:], IGNORE_INDEX)
    return out


def pack_documents(docs: datasets.Dataset, tokenizer: Any, max_length: int, packing: bool = True,
                   shuffle_seed: int | None = None, drop_remainder: bool = True) -> datasets.Dataset:
    """Tokenise documents into causal-LM rows (see the module docstring for the boundary rules).

    Args:
        docs: from :func:`load_documents` (``prompt``, ``text``), or documents tokenised already
            (``input_ids``, ``scored``: :func:`scaledkd.data.encode.tokenize_documents`).
        tokenizer: a Hugging Face tokenizer with an EOS token.
        max_length: tokens per row.
        packing: pack into rows of exactly ``max_length``; otherwise one truncated document per row.
        shuffle_seed: shuffle the document order before packing (training); None keeps file order.
        drop_remainder: packed: drop the last, shorter row (training) or keep it (evaluation).

    Returns:
        A dataset with ``input_ids`` ``[L]``, ``labels`` ``[L]`` and, packed, ``position_ids`` ``[L]`` per row.

    Raises:
        DataError: no row could be formed (fewer than ``max_length`` tokens with ``drop_remainder``) or no
            scored token.
    """
    if "scored" in docs.column_names:
        columns = docs.select_columns(["input_ids", "scored"]).to_dict()  # lists: random access below
        ids, scored = columns["input_ids"], columns["scored"]
        targets_of = [scored_targets(i, s) for i, s in zip(ids, scored, strict=True)]
    else:
        ids, unscored = encode_documents(docs, tokenizer)
        targets_of = [_targets(i, u) for i, u in zip(ids, unscored, strict=True)]
    order = list(range(len(ids)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    if not packing:
        rows = {"input_ids": [], "labels": []}
        dropped = 0
        for i in order:
            doc, tgt = ids[i], targets_of[i]
            dropped += max(0, len(doc) - max_length)
            rows["input_ids"].append(doc[:max_length])
            rows["labels"].append(tgt[:max_length].tolist())
        if dropped:
            logger.info("data.packing=false: %d tokens beyond data.max_length=%d were truncated", dropped, max_length)
    else:
        stream = np.fromiter((t for i in order for t in ids[i]), dtype=np.int64)
        targets = np.concatenate([targets_of[i] for i in order])
        lengths = np.array([len(ids[i]) for i in order])
        starts = np.zeros(len(stream), dtype=bool)
        starts[np.cumsum(lengths)[:-1]] = True
        starts[0] = True
        n_rows = len(stream) // max_length if drop_remainder else -(-len(stream) // max_length)
        if drop_remainder and len(stream) % max_length:
            logger.info("packing: the last %d of %d tokens do not fill a row of %d and are dropped",
                        len(stream) % max_length, len(stream), max_length)
        rows = {"input_ids": [], "labels": [], "position_ids": []}
        for r in range(n_rows):
            sl = slice(r * max_length, (r + 1) * max_length)
            row_starts = starts[sl].copy()
            row_starts[0] = True  # every row starts a fresh context
            rows["input_ids"].append(stream[sl].tolist())
            rows["labels"].append(targets[sl].tolist())
            rows["position_ids"].append(_positions(row_starts).tolist())
    if not rows["input_ids"]:
        raise DataError(f"data.task='lm': {sum(map(len, ids))} tokens are fewer than one row of data.max_length="
                        f"{max_length}; lower data.max_length or add text")
    if not any(t != IGNORE_INDEX for row in rows["labels"] for t in row):
        raise DataError("data.task='lm': no token is scored (every response is empty?)")
    return datasets.Dataset.from_dict(rows)


def _positions(starts: np.ndarray) -> np.ndarray:
    """Positions that restart at 0 wherever ``starts`` is set: ``[T T F F T F] -> [0 0 1 2 0 1]``."""
    index = np.arange(len(starts))
    last_start = np.maximum.accumulate(np.where(starts, index, 0))
    return index - last_start


# ------------------------------------------------------------------------------------------- batches


def make_lm_collator(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """A collator for :func:`pack_documents` rows.

    Packed rows -> ``input_ids``, ``position_ids``, ``labels``, ``loss_mask`` (no ``attention_mask``: the
    position ids carry the document structure). A shorter last row is padded with a padding "document" whose
    positions restart at 0, so it attends only to itself and is never scored. Unpacked rows -> ``input_ids``,
    ``attention_mask``, ``labels``, ``loss_mask``, right-padded. All ``[B, L]`` long (``loss_mask`` bool).

    The pad id is the tokenizer's pad token, else its EOS.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else special_ids(tokenizer)[1]

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        packed = "position_ids" in features[0]

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([list(f[key]) + [value] * (width - len(f[key])) for f in features], dtype=torch.long)

        batch = {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", IGNORE_INDEX)}
        if packed:
            batch["position_ids"] = torch.tensor(
                [list(f["position_ids"]) + list(range(width - len(f["position_ids"]))) for f in features],
                dtype=torch.long)
        else:
            batch["attention_mask"] = torch.tensor(
                [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features], dtype=torch.long)
        batch["loss_mask"] = batch["labels"] != IGNORE_INDEX
        return batch

    return collate


def sample_prompt(rows: datasets.Dataset, tokenizer: Any, max_words: int = 6) -> str:
    """The opening words (at most ``max_words``, and at most half the document) of the first held-out document:
    the prompt of the sample generation printed at the end of a run."""
    bos, eos = special_ids(tokenizer)
    row = rows[0]
    ids = row["input_ids"]
    positions = row.get("position_ids") or list(range(len(ids)))
    end = next((i for i in range(1, len(ids)) if positions[i] == 0 or ids[i - 1] == eos), len(ids))
    words = tokenizer.decode([t for t in ids[:end] if t not in (bos, eos)]).split()
    return " ".join(words[: max(1, min(max_words, len(words) // 2))])
