"""Shared pieces of the data layer: the error type, the task description, paths and seeded subsets."""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger("scaledkd")

DATA_DIR_ENV = "SCALEDKD_DATA_DIR"

Metric = Literal["accuracy", "f1", "matthews_correlation", "pearson", "spearmanr"]

# Held-out splits (QNLI's train/dev, a text corpus's dev share) are part of the *dataset*, not of a run: they use
# this fixed seed, never the training seed, so a teacher fine-tuned with one seed and a student distilled with
# another never see each other's dev examples in training.
SPLIT_SEED = 42


class DataError(ValueError):
    """A data file or data setting is unusable; the message names the file (and 1-based line) and the bad value."""


@dataclass(frozen=True)
class TaskSpec:
    """What a task's examples look like and how they are scored.

    Attributes:
        name: task key (``sst2``, ``stsb``, ``csv``, ``text``, ...).
        folder: the GLUE folder under the data directory (``SST-2``); ``""`` for non-GLUE tasks.
        text_fields: the source columns read as ``text_a`` (and ``text_b`` when there are two).
        labels: label strings in class-index order; ``None`` for regression and unlabeled tasks.
        num_labels: number of classes; 1 for regression, 0 for unlabeled text.
        metrics: the dev metrics (docs/methods.md#evaluation); empty for unlabeled text.
        train_file: training file name inside ``folder``.
        dev_file: dev file name inside ``folder`` (MNLI: ``dev_matched.tsv``).
        label_field: the source column holding the label (``None`` when unlabeled).
    """

    name: str
    folder: str
    text_fields: tuple[str, ...]
    labels: tuple[str, ...] | None
    num_labels: int
    metrics: tuple[Metric, ...]
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"
    label_field: str | None = "label"

    @property
    def is_regression(self) -> bool:
        """True for a single real-valued target (STS-B, ``num_labels: 1``)."""
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        """True when examples have a second text (``text_b``)."""
        return len(self.text_fields) == 2


def not_utf8(path: Path, what: str, err: UnicodeDecodeError) -> DataError:
    """A :class:`DataError` for a file that is not UTF-8 text, naming the file, the 1-based line and the byte."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        raw = b""
    for number, line in enumerate(raw.splitlines(keepends=True), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as bad:
            return DataError(f"{what} {str(path)!r} is not UTF-8 text: line {number}, byte {bad.start + 1} of the "
                             f"line ({bad.object[bad.start:bad.end]!r}: {bad.reason}); re-save it as UTF-8")
    return DataError(f"{what} {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as "
                     "UTF-8")


def data_dir(configured: str | None) -> Path | None:
    """The data directory: ``data.data_dir`` when set, else ``$SCALEDKD_DATA_DIR``, else ``None``."""
    value = configured or os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser() if value else None


def resolve_file(name: str, configured_dir: str | None, what: str) -> Path:
    """Resolve a data file relative to the data directory (absolute paths are kept) and check it exists.

    Args:
        name: the file as configured (``data.train_file`` / ``data.eval_file``).
        configured_dir: ``data.data_dir``.
        what: the config key that named the file, for the error message.

    Raises:
        DataError: the file does not exist; the message names the full path and the settings to change.
    """
    path = Path(name).expanduser()
    base = data_dir(configured_dir)
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        if Path(name).expanduser().is_absolute():
            where = "an absolute path"
        elif base is not None:
            where = f"relative to the data directory {str(base)!r} from data.data_dir or ${DATA_DIR_ENV}"
        else:
            where = f"relative to the working directory: data.data_dir and ${DATA_DIR_ENV} are unset"
        raise DataError(f"{what}={name!r}: file {str(path)!r} does not exist ({where}); fix {what} or data.data_dir")
    return path


def seeded_subset(n: int, k: int, seed: int) -> list[int]:
    """``k`` of ``range(n)`` drawn with ``seed``, returned in their original order (all of them when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def seeded_split(n: int, heldout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into disjoint (kept, held-out) index lists, both in original order.

    The held-out part has ``round(n * heldout_fraction)`` items, at least 1 and at most ``n - 1`` when ``n >= 2``.
    """
    k = round(n * heldout_fraction)
    if n >= 2:
        k = min(max(k, 1), n - 1)
    held = set(seeded_subset(n, k, seed))
    return [i for i in range(n) if i not in held], sorted(held)
