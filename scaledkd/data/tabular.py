"""CSV and JSON-lines files with named columns (``data.task: csv`` / ``jsonl``)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from scaledkd.data.base import DataError

_BUILDER = {"csv": "csv", "jsonl": "json"}


def read_table(kind: Literal["csv", "jsonl"], path: Path) -> dict[str, list[Any]]:
    """Read a CSV (with a header row) or JSON-lines file into columns with ``datasets.load_dataset``.

    CSV cells are read as written: ``NA``, ``null`` and empty cells stay strings (no pandas NA guessing), so a
    sentence that reads "NA" is not lost.

    Raises:
        DataError: the file does not parse.
    """
    import datasets

    kwargs = {"na_filter": False} if kind == "csv" else {}
    try:
        ds = datasets.load_dataset(_BUILDER[kind], data_files=str(path), split="train", **kwargs)
    except Exception as err:  # pyarrow/pandas parse errors come in many types
        raise DataError(f"could not read {kind} file {str(path)!r}: {type(err).__name__}: {err}") from err
    return ds.to_dict()


def _record(kind: str, i: int) -> str:
    # Line numbers are exact for JSON lines; a CSV has its header on line 1 (multi-line quoted cells shift it).
    return f"line {i + 2}" if kind == "csv" else f"line {i + 1}"


def table_rows(
    kind: Literal["csv", "jsonl"],
    path: Path,
    text_columns: list[str],
    label_column: str | None,
    num_labels: int | None,
    label_names: list[str] | None = None,
) -> tuple[list[dict[str, Any]], list[str] | None]:
    """Rows ``{"text_a", "text_b", "label"}`` of a CSV/JSON-lines file.

    Labels: integers must lie in ``0..num_labels-1``; strings are mapped to indices in sorted order of the label
    names (``label_names``, taken from the training file so train and dev agree); floats when ``num_labels == 1``.

    Args:
        kind: ``csv`` or ``jsonl``.
        path: the file.
        text_columns: one or two column names (``text_a`` and optionally ``text_b``).
        label_column: the label column, or ``None`` for unlabeled data.
        num_labels: number of classes (1 = regression).
        label_names: the sorted string labels to map to, when already known (the training file's).

    Returns:
        The rows, and the sorted string label names when the labels are strings (else ``None``).

    Raises:
        DataError: a missing column (the message lists the available ones), a missing text or label, an integer label
            out of range, a string label not in ``label_names``, more distinct labels than ``num_labels``, or a
            regression target that is not a number.
    """
    if not 1 <= len(text_columns) <= 2:
        raise DataError(f"data.text_columns={text_columns!r} must name 1 or 2 columns (text_a, text_b)")
    table = read_table(kind, path)
    wanted = list(text_columns) + ([label_column] if label_column else [])
    missing = [c for c in wanted if c not in table]
    if missing:
        setting = "data.label_column" if missing == [label_column] else "data.text_columns"
        raise DataError(
            f"{kind} file {str(path)!r} has no column(s) {missing} (check {setting}); available columns: {list(table)}"
        )
    texts = [table[c] for c in text_columns]
    n = len(texts[0])
    for col, values in zip(text_columns, texts, strict=True):
        for i, v in enumerate(values):
            if v is None:
                raise DataError(f"{path}:{_record(kind, i)}: column {col!r} is empty")
    labels: list[int | float | None] = [None] * n
    if label_column:
        labels, label_names = _labels(kind, path, table[label_column], label_column, num_labels, label_names)
    rows = [
        {
            "text_a": str(texts[0][i]).strip(),
            "text_b": str(texts[1][i]).strip() if len(texts) > 1 else None,
            "label": labels[i],
        }
        for i in range(n)
    ]
    return rows, label_names


def _labels(
    kind: str,
    path: Path,
    values: list[Any],
    column: str,
    num_labels: int | None,
    label_names: list[str] | None,
) -> tuple[list[int | float], list[str] | None]:
    if num_labels is None:
        raise DataError(f"data.label_column={column!r} needs data.num_labels")
    for i, v in enumerate(values):
        if v is None or v == "":
            raise DataError(f"{path}:{_record(kind, i)}: label column {column!r} is empty")
    if num_labels == 1:
        out = []
        for i, v in enumerate(values):
            try:
                y = float(v)
            except (TypeError, ValueError):
                y = math.nan
            if isinstance(v, bool) or not math.isfinite(y):
                raise DataError(
                    f"{path}:{_record(kind, i)}: target {v!r} in {column!r} is not a finite number (num_labels=1)"
                )
            out.append(y)
        return out, None
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        for i, v in enumerate(values):
            if not 0 <= v < num_labels:
                raise DataError(
                    f"{path}:{_record(kind, i)}: label {v!r} in {column!r} is outside 0..{num_labels - 1} "
                    f"(data.num_labels={num_labels})"
                )
        return list(values), None
    if not all(isinstance(v, str) for v in values):
        bad = next((i, v) for i, v in enumerate(values) if not isinstance(v, str))
        raise DataError(
            f"{path}:{_record(kind, bad[0])}: label {bad[1]!r} in {column!r}: labels must be all integers "
            f"0..{num_labels - 1} or all strings"
        )
    if label_names is None:
        label_names = sorted(set(values))
        if len(label_names) > num_labels:
            raise DataError(
                f"{kind} file {str(path)!r} has {len(label_names)} distinct labels {label_names[:20]} in {column!r} "
                f"but data.num_labels={num_labels}"
            )
    index = {name: j for j, name in enumerate(label_names)}
    out = []
    for i, v in enumerate(values):
        if v not in index:
            raise DataError(
                f"{path}:{_record(kind, i)}: label {v!r} in {column!r} does not occur in the training file; "
                f"valid labels: {label_names}"
            )
        out.append(index[v])
    return out, label_names
