"""``data.dataset``: causal-LM documents from any ``datasets.load_dataset`` source (a Hub dataset, or a local
Parquet/Arrow/JSON/CSV file or folder), map-style or streamed.

The source's columns become the documents' columns, always under the same names so that the tokeniser
(:mod:`scaledkd.data.encode`) needs no settings to read them:

* ``text``: one column (``data.text_columns: [text]``), a document per record, every token scored;
* ``prompt`` + ``text``: two columns (``[prompt, response]``), only the response scored;
* ``messages``: ``data.messages_column``, a conversation (a list of ``{role, content}``) per record, rendered with
  the tokenizer's chat template, only the assistant turns scored.

Held-out documents: ``data.dataset.eval_split`` when set; otherwise a seeded ``heldout_fraction`` of the training
split (``SPLIT_SEED``, as for files), or, streamed, the first ``max_eval_samples`` documents of the stream (a
stream has no length to draw a share from; training skips them). Map-style subsets (``max_*_samples``) are seeded
draws in source order; a streamed ``max_train_samples`` takes the first documents.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import datasets

from scaledkd.config import DataConfig, DatasetConfig
from scaledkd.data.base import (
    SPLIT_SEED,
    DataError,
    data_dir,
    logger,
    seeded_split,
    seeded_subset,
)

Split = Literal["train", "dev"]
Documents = datasets.Dataset | datasets.IterableDataset

# load_dataset's builder for each local file suffix.
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}
STREAM_HELDOUT_DOCS = 1000  # held-out documents of a stream without eval_split when max_eval_samples is unset


def local_path(source: DatasetConfig, configured_dir: str | None) -> Path | None:
    """The local file or folder ``source.path`` names (relative to the data directory, else the working
    directory), or None when it names none (then it is a Hub id).

    Raises:
        DataError: the path looks local (a known file suffix, or ``/``, ``./``, ``~`` at its start) but does not
            exist, or is a file of a kind ``load_dataset`` is not given here.
    """
    raw = Path(source.path).expanduser()
    base = data_dir(configured_dir)
    candidates = [raw] if raw.is_absolute() or base is None else [base / raw, raw]
    found = next((c for c in candidates if c.exists()), None)
    if found is not None and found.is_file() and found.suffix.lower() not in BUILDERS:
        raise DataError(f"data.dataset.path={source.path!r}: {found.suffix or 'a file without suffix'} is not a "
                        f"dataset file here; use one of {sorted(BUILDERS)} or a folder of them")
    looks_local = raw.suffix.lower() in BUILDERS or source.path.startswith(("/", "./", "../", "~"))
    if found is None and looks_local:
        raise DataError(f"data.dataset.path={source.path!r}: {str(candidates[0])!r} does not exist; fix "
                        "data.dataset.path or data.data_dir")
    return found


def open_split(cfg: DataConfig, split_name: str, streaming: bool) -> Documents:
    """One split of ``data.dataset`` as ``load_dataset`` returns it (``streaming``: an ``IterableDataset``).

    Raises:
        DataError: the source cannot be read (unreachable Hub, unknown config or split; the message names the
            setting and what ``datasets`` said, which lists the valid splits or configs).
    """
    source = cfg.dataset
    assert isinstance(source, DatasetConfig)  # DataConfig normalises it
    local = local_path(source, cfg.data_dir)
    if local is None:
        args: tuple[Any, ...] = (source.path, source.name)
        where = f"Hub dataset {source.path!r}" + (f" (config {source.name!r})" if source.name else "")
    elif local.is_dir():
        args = (str(local), source.name)
        where = f"folder {str(local)!r}"
    else:
        args = (BUILDERS[local.suffix.lower()],)
        where = f"file {str(local)!r}"
    kwargs: dict[str, Any] = {"split": split_name, "streaming": streaming, "cache_dir": source.cache_dir}
    if local is not None and local.is_file():
        kwargs["data_files"] = {split_name: str(local)}
        if split_name != source.split:  # a single file is one split
            raise DataError(f"data.dataset.eval_split={split_name!r}: {where} is a single split; hold out a share "
                            "of it (data.dataset.eval_split: null) or give a folder with a file per split")
    if local is not None and local.suffix.lower() == ".csv":
        kwargs["na_filter"] = False  # as for csv files: "NA" stays text
    try:
        return datasets.load_dataset(*args, **kwargs)
    except (ValueError, KeyError) as err:  # unknown split / config: datasets' message lists the valid ones
        key = "data.dataset.name" if "config" in str(err).lower() and "split" not in str(err).lower() else (
            "data.dataset.split" if split_name == source.split else "data.dataset.eval_split")
        raise DataError(f"{key}: could not read {where} (split {split_name!r}): {err}") from None
    except Exception as err:  # network, missing Hub dataset, unparsable file: many types
        hint = ""
        if local is None and isinstance(err, ConnectionError):
            hint = ("; the Hub is not reachable from here: download the dataset and give its local folder, or set "
                    "data.dataset.cache_dir to a populated cache")
        elif local is None:
            hint = "; a Hub id is owner/name, and a local path must exist (relative to data.data_dir)"
        raise DataError(f"could not load {where} (data.dataset): {type(err).__name__}: {err}{hint}") from err


def column_names(docs: Documents) -> list[str]:
    """The columns of a dataset or stream (a stream whose features are unknown is asked for its first record)."""
    if docs.column_names is not None:
        return list(docs.column_names)
    first = next(iter(docs), None)
    return list(first) if first is not None else []


def document_columns(cfg: DataConfig) -> dict[str, str]:
    """``{source column: document column}`` of the configured columns (see the module docstring)."""
    if cfg.messages_column is not None:
        return {cfg.messages_column: "messages"}
    if len(cfg.text_columns) == 1:
        return {cfg.text_columns[0]: "text"}
    prompt, response = cfg.text_columns
    return {prompt: "prompt", response: "text"}


def with_document_columns(docs: Documents, cfg: DataConfig, what: str) -> Documents:
    """``docs`` cut to the configured columns, renamed to the document columns.

    Raises:
        DataError: a configured column is missing; the message lists the source's columns.
    """
    mapping = document_columns(cfg)
    available = column_names(docs)
    missing = [c for c in mapping if c not in available]
    if missing:
        key = "data.messages_column" if cfg.messages_column is not None else "data.text_columns"
        hint = ""
        if cfg.messages_column is None and "messages" in available:
            hint = "; for chat conversations set data.messages_column: messages"
        elif cfg.messages_column is None and {"prompt", "response"} <= set(available) and len(mapping) == 1:
            hint = "; for prompt/response records set data.text_columns: [prompt, response]"
        raise DataError(f"{what} has no column(s) {missing} ({key}={cfg.messages_column or cfg.text_columns!r}); "
                        f"available columns: {available}{hint}")
    docs = docs.select_columns(list(mapping))
    renames = {src: dst for src, dst in mapping.items() if src != dst}
    return docs.rename_columns(renames) if renames else docs


def _has_text(texts: list[str | None]) -> list[bool]:
    return [bool(t and t.strip()) for t in texts]


def without_blank_texts(docs: Documents, what: str) -> Documents:
    """``docs`` without records whose ``text`` (the scored text or response) is empty or blank, dropped before the
    held-out split and the shuffle, as the file readers drop them (conversations are kept: their assistant turns
    decide)."""
    if "text" not in column_names(docs):
        return docs
    if isinstance(docs, datasets.IterableDataset):
        return docs.filter(_has_text, input_columns="text", batched=True)
    kept = docs.filter(_has_text, input_columns="text", batched=True, desc="skip blank documents")
    if len(kept) < len(docs):
        logger.warning("%s: %d records with an empty text or response are skipped", what, len(docs) - len(kept))
    return kept


def source_documents(cfg: DataConfig, split: Split, seed: int) -> Documents:
    """The documents of one split from ``data.dataset`` (``load_examples`` for ``data.task: lm`` with a dataset).

    Returns:
        A ``datasets.Dataset`` (map-style; backed by ``datasets``' cache files, so the tokenised map over it is
        cached too) or, with ``data.streaming`` and ``split == "train"``, an ``IterableDataset``. A streamed dev
        split is read into memory (it is ``max_eval_samples`` documents), so evaluation has fixed rows.

    Raises:
        DataError: an unreadable source, a missing column, or no documents.
    """
    source = cfg.dataset
    assert isinstance(source, DatasetConfig)
    wanted: Split = "train" if cfg.eval_split == "train" else split
    name = source.eval_split if wanted == "dev" and source.eval_split else source.split
    docs = with_document_columns(open_split(cfg, name, cfg.streaming), cfg, f"split {name!r} of {source.path!r}")
    docs = without_blank_texts(docs, f"split {name!r} of {source.path!r}")
    if cfg.streaming:
        docs = _stream_split(docs, cfg, split, held_out=wanted == "dev", own_split=name != source.split)
    else:
        docs = _map_split(docs, cfg, split, wanted == "dev" and not source.eval_split, seed)
    if isinstance(docs, datasets.Dataset) and len(docs) == 0:
        raise DataError(f"empty dataset: data.dataset={source.path!r} split {split!r} has no documents")
    return docs


def _map_split(docs: datasets.Dataset, cfg: DataConfig, split: Split, held_out: bool, seed: int) -> datasets.Dataset:
    if not cfg.dataset.eval_split:  # type: ignore[union-attr]
        train_idx, dev_idx = seeded_split(len(docs), cfg.heldout_fraction, SPLIT_SEED)
        docs = docs.select(dev_idx if held_out else train_idx)
    limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
    if limit is not None and limit < len(docs):
        docs = docs.select(seeded_subset(len(docs), limit, seed))
    return docs


def _stream_split(docs: datasets.IterableDataset, cfg: DataConfig, split: Split, held_out: bool,
                  own_split: bool) -> Documents:
    heldout_docs = cfg.max_eval_samples or STREAM_HELDOUT_DOCS
    if split == "dev":
        rows = list(docs.take(heldout_docs))  # the dev split is evaluated in full at every evaluation
        logger.info("data.streaming: %d held-out documents read from %s", len(rows),
                    "its eval_split" if own_split else "the start of the stream")
        return datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({})
    if not held_out and not cfg.dataset.eval_split:  # type: ignore[union-attr]
        docs = docs.skip(heldout_docs)  # those are the dev documents
    if cfg.max_train_samples is not None:
        docs = docs.take(cfg.max_train_samples)
    return docs
