"""The data layer: GLUE TSVs, CSV/JSON-lines, text corpora -> ``datasets.Dataset`` -> token ids -> padded batches.

Flow (``prepare_split`` runs it for a run and for ``scaledkd eval``): ``load_examples(cfg.data, split, seed)``
(raw ``text_a``/``text_b``/``label``) -> ``tokenize_dataset`` (ids, truncated, unpadded) -> ``make_collator``
(dynamic padding per batch). ``task_spec`` says what the labels and metrics are. Causal language modelling (``data.task: lm``): ``pack_documents`` (documents -> packed rows) ->
``make_lm_collator``. With ``data.dataset`` (:mod:`~scaledkd.data.sources`), documents come from
``datasets.load_dataset``, are tokenised by a cached map (:mod:`~scaledkd.data.encode`, chat templates included)
and, streamed, packed on the fly (:mod:`~scaledkd.data.stream`).
"""
from __future__ import annotations

from scaledkd.data.base import DATA_DIR_ENV, SPLIT_SEED, DataError, TaskSpec
from scaledkd.data.collate import make_collator, tokenize_dataset
from scaledkd.data.glue import GLUE_TASKS, read_glue_tsv
from scaledkd.data.lm import make_lm_collator, pack_documents
from scaledkd.data.loading import apply_label_noise, load_examples, task_spec
from scaledkd.data.prepared import Prepared, prepare_split
from scaledkd.data.text import corpus_examples, python_docs_text

__all__ = [
    "DATA_DIR_ENV",
    "GLUE_TASKS",
    "SPLIT_SEED",
    "DataError",
    "Prepared",
    "TaskSpec",
    "apply_label_noise",
    "corpus_examples",
    "load_examples",
    "make_collator",
    "make_lm_collator",
    "pack_documents",
    "prepare_split",
    "python_docs_text",
    "read_glue_tsv",
    "task_spec",
    "tokenize_dataset",
]
