"""``load_examples``: one entry point from a :class:`DataConfig` to a ``datasets.Dataset`` of raw examples."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any, Literal

import datasets

from scaledkd.config import DataConfig
from scaledkd.data.base import (
    DATA_DIR_ENV,
    SPLIT_SEED,
    DataError,
    TaskSpec,
    data_dir,
    logger,
    resolve_file,
    seeded_split,
    seeded_subset,
)
from scaledkd.data.glue import GLUE_TASKS, load_glue_hub, read_glue_tsv
from scaledkd.data.lm import load_documents
from scaledkd.data.tabular import table_rows
from scaledkd.data.text import BUILTIN_PREFIX, read_corpus

Split = Literal["train", "dev"]

QNLI_TRAIN_FRACTION = 0.8  # the shared data has no QNLI train.tsv: 80 % of dev.tsv trains, 20 % evaluates


def task_spec(cfg: DataConfig) -> TaskSpec:
    """The :class:`TaskSpec` of the configured task.

    GLUE tasks get their fixed spec. ``csv``/``jsonl`` get a synthesised one (regression with pearson/spearmanr when
    ``num_labels == 1``, else accuracy; labels ``"0".."n-1"``; unlabeled when ``label_column`` is unset). ``text``
    is unlabeled (``num_labels == 0``, no metrics).
    """
    if cfg.task in GLUE_TASKS:
        return GLUE_TASKS[cfg.task]
    fields = tuple(cfg.text_columns) if cfg.task in ("csv", "jsonl") else ("text",)
    if cfg.task == "text" or not cfg.label_column:
        return TaskSpec(
            cfg.task, "", fields, None, 0, (), train_file=cfg.train_file or "", dev_file=cfg.eval_file or "",
            label_field=None,
        )
    n = cfg.num_labels or 0
    regression = n == 1
    return TaskSpec(
        name=cfg.task,
        folder="",
        text_fields=fields,
        labels=None if regression else tuple(str(i) for i in range(n)),
        num_labels=n,
        metrics=("pearson", "spearmanr") if regression else ("accuracy",),
        train_file=cfg.train_file or "",
        dev_file=cfg.eval_file or "",
        label_field=cfg.label_column,
    )


def load_examples(cfg: DataConfig, split: Split, seed: int) -> datasets.Dataset:
    """Load the raw examples of one split.

    Args:
        cfg: the ``data`` section of the config.
        split: ``train`` or ``dev``. With ``data.eval_split: train``, ``dev`` returns the training examples
            (debugging only).
        seed: seeds the ``max_train_samples``/``max_eval_samples`` subsets. Held-out splits (QNLI without a
            ``train.tsv``; ``text``/``csv``/``jsonl`` without an ``eval_file``) use the fixed ``SPLIT_SEED`` so
            that every run sees the same train/dev partition.

    Returns:
        A dataset with ``text_a``, ``text_b`` (pair tasks only) and ``label`` (labeled data only; a ``ClassLabel``
        for classification, ``float32`` for regression).

    Raises:
        DataError: a missing file or setting (the message names the path and the setting to change), a malformed
            file, or no examples.
    """
    if split not in ("train", "dev"):
        raise DataError(f"split={split!r} is not valid; choose one of ['train', 'dev']")
    if cfg.task == "lm":
        return load_documents(cfg, split, seed)  # documents (``prompt``, ``text``), not labelled examples
    spec = task_spec(cfg)
    source_split: Split = "train" if cfg.eval_split == "train" else split
    rows, label_names = _rows(cfg, spec, source_split)
    limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
    if limit is not None:
        rows = [rows[i] for i in seeded_subset(len(rows), limit, seed)]
    if not rows:
        raise DataError(f"empty dataset: data.task={cfg.task!r} split {split!r} has no examples")
    ds = _to_dataset(rows, spec, label_names)
    if split == "train" and cfg.label_noise:
        ds = apply_label_noise(ds, cfg.label_noise, derived_seed(seed, "label_noise"))
    if split == "train" and cfg.supplementary is not None:
        ds = with_supplementary(ds, cfg, seed)
    return ds


def derived_seed(seed: int, purpose: str) -> int:
    """An independent seed for one purpose, so that (say) the subset and the label noise of one run do not
    share a random stream."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:4], "big")


def with_supplementary(target: datasets.Dataset, cfg: DataConfig, seed: int) -> datasets.Dataset:
    """The training inputs of a label-free stage: ``target`` mixed with (or replaced by) the supplementary inputs
    of ``cfg.supplementary`` (CR-ILD, docs/methods.md#supplementary-ild-data). Labels are dropped; single-text
    rows of a pair task get ``text_b = None``.

    Raises:
        DataError: the supplementary source is missing or empty (the message names its setting).
    """
    sup = cfg.supplementary
    assert sup is not None
    # eval_file = train_file: every input of the file is supplementary data (no held-out share).
    source = DataConfig(task=sup.task, data_dir=sup.data_dir or cfg.data_dir, source=sup.source,
                        train_file=sup.train_file, eval_file=sup.train_file, text_columns=list(sup.text_columns),
                        max_train_samples=sup.max_samples)
    extra = load_examples(source, "train", derived_seed(seed, "supplementary"))
    parts = [extra] if sup.mode == "replace" else [target, extra]
    parts = [p.remove_columns([c for c in p.column_names if c not in ("text_a", "text_b")]) for p in parts]
    if any("text_b" in p.column_names for p in parts):
        parts = [p if "text_b" in p.column_names else
                 p.add_column("text_b", [None] * len(p), feature=datasets.Value("string")) for p in parts]
    mixed = datasets.concatenate_datasets(parts)
    logger.info("supplementary ILD data (%s): %d %s inputs %s %d target inputs -> %d unlabeled training inputs",
                sup.mode, len(extra), sup.task, "replace" if sup.mode == "replace" else "added to",
                len(target), len(mixed))
    return mixed


def _rows(cfg: DataConfig, spec: TaskSpec, split: Split) -> tuple[list[dict[str, Any]], list[str] | None]:
    if cfg.task in GLUE_TASKS:
        if cfg.source == "hub":
            return load_glue_hub(cfg.task, split), None
        return _glue_local(cfg, spec, split), None
    if cfg.task == "text":
        return _text(cfg, split), None
    return _table(cfg, split)


# ------------------------------------------------------------------------------------------------------ GLUE


def _glue_folder(cfg: DataConfig, spec: TaskSpec) -> Path:
    base = data_dir(cfg.data_dir)
    if base is None:
        raise DataError(
            f"data.task={cfg.task!r} with data.source='local' needs the GLUE folder: set data.data_dir or "
            f"${DATA_DIR_ENV} to the folder holding {spec.folder}/ (or use data.source: hub)"
        )
    candidates = [base / spec.folder, base / "glue" / spec.folder]  # accept the data root as well as data/glue
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise DataError(
        f"GLUE folder {str(candidates[0])!r} does not exist (nor {str(candidates[1])!r}); set data.data_dir or "
        f"${DATA_DIR_ENV} to the folder that holds {spec.folder}/{spec.train_file}"
    )


def _glue_local(cfg: DataConfig, spec: TaskSpec, split: Split) -> list[dict[str, Any]]:
    folder = _glue_folder(cfg, spec)
    train_path, dev_path = folder / spec.train_file, folder / spec.dev_file
    if spec.name == "qnli" and not train_path.is_file() and dev_path.is_file():
        rows = read_glue_tsv(spec.name, dev_path, "dev")
        train_idx, dev_idx = seeded_split(len(rows), 1.0 - QNLI_TRAIN_FRACTION, SPLIT_SEED)
        logger.warning(
            "QNLI: %s is missing, so %s is split (seed %d) into %d train / %d dev examples (80/20); "
            "dev scores are not comparable to the official QNLI dev set",
            train_path,
            dev_path,
            SPLIT_SEED,
            len(train_idx),
            len(dev_idx),
        )
        return [rows[i] for i in (train_idx if split == "train" else dev_idx)]
    path = train_path if split == "train" else dev_path
    if not path.is_file():
        raise DataError(
            f"GLUE file {str(path)!r} does not exist; check data.data_dir / ${DATA_DIR_ENV} "
            f"(it must hold {spec.folder}/{spec.train_file} and {spec.folder}/{spec.dev_file})"
        )
    return read_glue_tsv(spec.name, path, split)


# --------------------------------------------------------------------------------------- text, csv, jsonl


def _file(cfg: DataConfig, name: str, key: str) -> Path | None:
    if name.startswith(BUILTIN_PREFIX):
        return None
    return resolve_file(name, cfg.data_dir, key)


def _heldout(n: int, cfg: DataConfig, split: Split, what: str) -> list[int]:
    train_idx, dev_idx = seeded_split(n, cfg.heldout_fraction, SPLIT_SEED)
    if split == "dev":
        logger.info(
            "%s: no data.eval_file, holding out %d of %d examples (heldout_fraction=%g, seed %d) for dev",
            what,
            len(dev_idx),
            n,
            cfg.heldout_fraction,
            SPLIT_SEED,
        )
    return train_idx if split == "train" else dev_idx


def _text(cfg: DataConfig, split: Split) -> list[dict[str, Any]]:
    assert cfg.train_file is not None  # DataConfig guarantees it for task=text
    if split == "dev" and cfg.eval_file:
        examples = read_corpus(cfg.eval_file, _file(cfg, cfg.eval_file, "data.eval_file"))
    else:
        examples = read_corpus(cfg.train_file, _file(cfg, cfg.train_file, "data.train_file"))
        if not cfg.eval_file:
            examples = [examples[i] for i in _heldout(len(examples), cfg, split, cfg.train_file)]
    return [{"text_a": t, "text_b": None, "label": None} for t in examples]


def _table(cfg: DataConfig, split: Split) -> tuple[list[dict[str, Any]], list[str] | None]:
    assert cfg.train_file is not None  # DataConfig guarantees it for csv/jsonl
    kind: Literal["csv", "jsonl"] = "csv" if cfg.task == "csv" else "jsonl"
    train_path = _file(cfg, cfg.train_file, "data.train_file")
    assert train_path is not None, "built-in corpora are text only"

    def read(path: Path, names: list[str] | None = None) -> tuple[list[dict[str, Any]], list[str] | None]:
        return table_rows(kind, path, cfg.text_columns, cfg.label_column, cfg.num_labels, names)

    if split == "dev" and cfg.eval_file:
        dev_path = _file(cfg, cfg.eval_file, "data.eval_file")
        assert dev_path is not None
        rows, names = read(dev_path)
        if names is not None:  # string labels: index them the way the training file does
            _, names = read(train_path)
            rows, _ = read(dev_path, names)
        return rows, names
    rows, names = read(train_path)
    if not cfg.eval_file:
        rows = [rows[i] for i in _heldout(len(rows), cfg, split, cfg.train_file)]
    return rows, names


# ----------------------------------------------------------------------------------------------- dataset


def apply_label_noise(ds: datasets.Dataset, probability: float, seed: int) -> datasets.Dataset:
    """Flip each label, with ``probability``, to a different class drawn uniformly (CR-ILD's noisy-label setting).

    Args:
        ds: a classification dataset from :func:`load_examples` (``label`` is a ``ClassLabel``).
        probability: chance that an example's label is replaced, in [0, 1].
        seed: seeds which labels flip and to what.

    Raises:
        DataError: ``probability`` out of range, or ``ds`` has no class labels (unlabeled or regression data).
    """
    if not 0.0 <= probability <= 1.0:
        raise DataError(f"label noise probability={probability!r} must be in [0, 1]")
    feature = ds.features.get("label")
    if not isinstance(feature, datasets.ClassLabel) or feature.num_classes < 2:
        raise DataError(f"label noise needs class labels (2 or more classes); this dataset's label is {feature!r}")
    rng = random.Random(seed)
    labels = []
    for y in ds["label"]:
        if rng.random() < probability:
            y = rng.choice([c for c in range(feature.num_classes) if c != y])
        labels.append(y)
    return ds.remove_columns("label").add_column("label", labels, feature=feature)



def _to_dataset(rows: list[dict[str, Any]], spec: TaskSpec, label_names: list[str] | None) -> datasets.Dataset:
    features: dict[str, Any] = {"text_a": datasets.Value("string")}
    if spec.is_pair:
        features["text_b"] = datasets.Value("string")
    labeled = rows[0]["label"] is not None
    if labeled:
        if spec.is_regression:
            features["label"] = datasets.Value("float32")
        else:
            names = label_names or list(spec.labels or [str(i) for i in range(spec.num_labels)])
            features["label"] = datasets.ClassLabel(names=names)
    columns = {name: [r[name] for r in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))
