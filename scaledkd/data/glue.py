"""GLUE: the nine task descriptions and a reader for the official TSV files with all their quirks.

Quirks handled (see docs/data.md#glue-tsv-folders):

* tab splitting with no quote processing (RTE and QNLI sentences contain unbalanced ``"``);
* CoLA train/dev have no header and no final newline (columns: source, label, original label, sentence);
  CoLA test has an ``index sentence`` header;
* MRPC headers start with a UTF-8 byte-order mark (``Quality  #1 ID  #2 ID  #1 String  #2 String``);
* STS-B has 10 columns (``sentence1``/``sentence2`` = columns 7/8, ``score`` last);
* SST-2 sentences end with a space; MNLI's label column is ``gold_label``; the rest is looked up by header name.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Literal

from scaledkd.data.base import DataError, TaskSpec, logger, not_utf8

_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

# Label order = the hub's ``glue`` ClassLabel order, so ``source: local`` and ``source: hub`` agree on indices.
GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", "CoLA", ("sentence",), _BINARY, 2, ("matthews_correlation",)),
    "sst2": TaskSpec("sst2", "SST-2", ("sentence",), _BINARY, 2, ("accuracy",)),
    "mrpc": TaskSpec(
        "mrpc", "MRPC", ("#1 String", "#2 String"), _BINARY, 2, ("f1", "accuracy"), label_field="Quality"
    ),
    "qqp": TaskSpec(
        "qqp", "QQP", ("question1", "question2"), _BINARY, 2, ("f1", "accuracy"), label_field="is_duplicate"
    ),
    "stsb": TaskSpec(
        "stsb", "STS-B", ("sentence1", "sentence2"), None, 1, ("pearson", "spearmanr"), label_field="score"
    ),
    "mnli": TaskSpec(
        "mnli",
        "MNLI",
        ("sentence1", "sentence2"),
        ("entailment", "neutral", "contradiction"),
        3,
        ("accuracy",),
        dev_file="dev_matched.tsv",
        label_field="gold_label",
    ),
    "qnli": TaskSpec("qnli", "QNLI", ("question", "sentence"), _NLI2, 2, ("accuracy",)),
    "rte": TaskSpec("rte", "RTE", ("sentence1", "sentence2"), _NLI2, 2, ("accuracy",)),
    "wnli": TaskSpec("wnli", "WNLI", ("sentence1", "sentence2"), _BINARY, 2, ("accuracy",)),
}

# Files without a header row get these column names (CoLA train/dev).
_HEADERLESS = {"cola": ("source", "label", "original_label", "sentence")}

# The hub dataset's column names for text_a/text_b, and its split names.
HUB_DATASET = "nyu-mll/glue"
_HUB_TEXT = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


def glue_spec(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of a GLUE task.

    Raises:
        DataError: ``task`` is not a GLUE task; the message lists the valid ones.
    """
    try:
        return GLUE_TASKS[task]
    except KeyError:
        raise DataError(f"unknown GLUE task {task!r}; choose one of {sorted(GLUE_TASKS)}") from None


def read_glue_tsv(task: str, path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """Read one official GLUE TSV file into plain rows.

    Args:
        task: GLUE task key (``sst2``, ``rte``, ...).
        path: the ``.tsv`` file.
        split: ``train``/``dev`` (labeled) or ``test`` (unlabeled: every ``label`` is ``None``).

    Returns:
        One dict per example: ``{"text_a": str, "text_b": str | None, "label": int | float | None}``; ``label`` is
        the class index in ``spec.labels`` order (a float score for STS-B).

    Raises:
        DataError: the file is missing or empty, a row has the wrong number of columns, a needed column is absent,
            a label is not in the task's label set, or a score does not parse. The message names the file and the
            1-based line.
    """
    spec = glue_spec(task)
    path = Path(path)
    labeled = split != "test"
    if not path.is_file():
        raise DataError(f"GLUE file {str(path)!r} does not exist")
    try:
        return _read_rows(task, spec, path, labeled)
    except UnicodeDecodeError as err:
        raise not_utf8(path, "GLUE file", err) from None


def _read_rows(task: str, spec: TaskSpec, path: Path, labeled: bool) -> list[dict[str, Any]]:
    # utf-8-sig drops MRPC's byte-order mark; newline="" lets csv see "\r\n" itself.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header: tuple[str, ...] | None = None
        rows: list[dict[str, Any]] = []
        text_idx: list[int] = []
        label_idx = -1
        for fields in reader:
            if not fields or fields == [""]:
                continue  # blank line (e.g. a trailing one)
            line = reader.line_num
            if header is None:
                header, is_header_row = _header(task, fields)
                text_idx, label_idx = _columns(spec, header, labeled, path)
                if is_header_row:
                    continue
            if len(fields) != len(header):
                raise DataError(
                    f"{path}:{line}: expected {len(header)} tab-separated columns {list(header)}, got {len(fields)}: "
                    f"{_preview(fields)}"
                )
            texts = [fields[i].strip() for i in text_idx]
            label = _label(spec, fields[label_idx].strip(), path, line) if labeled else None
            rows.append({"text_a": texts[0], "text_b": texts[1] if len(texts) > 1 else None, "label": label})
    if not rows:
        raise DataError(f"GLUE file {str(path)!r} has no examples (empty dataset)")
    return rows


def _header(task: str, first: list[str]) -> tuple[tuple[str, ...], bool]:
    """The column names and whether ``first`` is a header row (CoLA train/dev have none)."""
    names = _HEADERLESS.get(task)
    if names is not None and first[0].strip() != "index":
        return names, False  # a wrong column count is reported by the row check
    return tuple(name.strip() for name in first), True


def _columns(spec: TaskSpec, header: tuple[str, ...], labeled: bool, path: Path) -> tuple[list[int], int]:
    missing = [c for c in spec.text_fields if c not in header]
    if labeled and spec.label_field not in header:
        missing.append(spec.label_field)
    if missing:
        raise DataError(
            f"{path}:1: {spec.name} needs columns {missing} but the header has {list(header)}"
            + ("" if labeled else " (test split, no label expected)")
        )
    label_idx = header.index(spec.label_field) if labeled else -1
    # MNLI's gold_label and STS-B's score are the last column; header lookup finds them there.
    return [header.index(c) for c in spec.text_fields], label_idx


def _label(spec: TaskSpec, value: str, path: Path, line: int) -> int | float:
    if spec.labels is None:
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise DataError(f"{path}:{line}: score {value!r} of {spec.name} is not a finite number")
        return score
    try:
        return spec.labels.index(value)
    except ValueError:
        raise DataError(
            f"{path}:{line}: label {value!r} is not a {spec.name} label; valid labels: {list(spec.labels)}"
        ) from None


def _preview(fields: list[str], width: int = 120) -> str:
    text = repr("\t".join(fields))
    return text if len(text) <= width else text[: width - 3] + "..."


def load_glue_hub(task: str, split: Literal["train", "dev"]) -> list[dict[str, Any]]:
    """Read a GLUE split from the Hugging Face hub (``datasets.load_dataset("nyu-mll/glue", task)``).

    Raises:
        DataError: the download or the cache lookup failed; the message suggests ``data.source: local``.
    """
    import datasets

    spec = glue_spec(task)
    hub_split = "train" if split == "train" else ("validation_matched" if task == "mnli" else "validation")
    try:
        ds = datasets.load_dataset(HUB_DATASET, task, split=hub_split)
    except Exception as err:  # network, auth, offline cache miss: all end the same way for the user
        raise DataError(
            f"could not load {HUB_DATASET!r} config {task!r} split {hub_split!r} from the hub ({type(err).__name__}: "
            f"{err}); set data.source: local and data.data_dir (or $SCALEDKD_DATA_DIR) to read the TSV files"
        ) from err
    cols = _HUB_TEXT[task]
    text_a = ds[cols[0]]
    text_b = ds[cols[1]] if len(cols) > 1 else [None] * len(text_a)
    labels = ds["label"]
    out = []
    for a, b, y in zip(text_a, text_b, labels, strict=True):
        out.append(
            {
                "text_a": a.strip(),
                "text_b": b.strip() if b is not None else None,
                "label": float(y) if spec.is_regression else int(y),
            }
        )
    if not out:
        raise DataError(f"hub dataset {HUB_DATASET!r} {task}/{hub_split} is empty")
    logger.debug("read %d %s/%s examples from the hub", len(out), task, hub_split)
    return out
