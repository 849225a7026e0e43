"""The resolved run plan: one function turns a :class:`~scaledkd.config.Config` into everything a run decides
before it loads a weight.

``resolve(cfg)`` works out the task kind, the student's source and layers, both model configs, the resolved
teacher and student DeepSpeed configs, the losses (built on the ``meta`` device: their declared taps, layer pairs
and trainable modules, with no memory and no random numbers spent) and the data, and runs every check that can be
run before training. ``scaledkd validate`` prints it, ``scaledkd plan`` sizes it, ``scaledkd distill`` /
``finetune``, each stage of a staged recipe and every study cell run it, so ``validate`` refuses exactly what
``distill`` would refuse before its first step, with the same message.

``baseline(cfg)`` is a recipe's no-teacher baseline (``scaledkd finetune RECIPE``): the same student, data and
training settings, with the teacher and the losses that read it dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import IterableDataset

from . import arch, data, models
from .config import (
    GLUE_TASK_NAMES,
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    StudentConfig,
    TrainConfig,
    merge_section,
    stage_refs,
)
from .ds_config import fill_bucket_sizes, read_ds_config, student_ds_config, teacher_ds_config, zero_stage
from .engine.budget import Budget, micro_batches_per_epoch, plan_budget
from .engine.early_stopping import check_early_stopping
from .files import FINISHED_MARKER, is_run_folder
from .losses import LOSSES, DistillLoss, LossSetup, build_loss
from .models import TaskKind
from .resume import check_resume
from .taps import Tap
from .trackers import check_available

log = logging.getLogger("scaledkd")


class RunDirError(ValueError):
    """The output folder cannot be used as asked (finished run, foreign files)."""


def task_kind(spec: data.TaskSpec) -> TaskKind:
    """The model head a task needs: ``causal_lm``, ``agnostic`` (no labels), ``regression`` or ``classification``."""
    if spec.name == "lm":
        return "causal_lm"
    if spec.num_labels == 0:
        return "agnostic"
    return "regression" if spec.is_regression else "classification"


@dataclass(frozen=True)
class LossPlan:
    """One loss term as the run will build it.

    Attributes:
        key: its name in the run (the registry key; ``<key>_<i>`` when a key repeats), used in logs.
        config: the recipe's entry (registry name, weight, mapping, parameters).
        needs: what it reads (``teacher``, ``labels``, ``logits``, ``hidden``, ``qkv``, ``clean``).
        student_taps, teacher_taps: the layer captures it reads from each model.
        pairs: its resolved ``(student, teacher)`` layer pairs, or None without a layer mapping.
        trainable_params: parameters of its own modules (projections, filters, heads), trained with the student.
        ema_decay: the EMA student it compares against (clean-input losses), or None.
        teacher_top_k: how many of the teacher's largest logits per token it compares (None: all of them).
    """

    key: str
    config: LossConfig
    needs: frozenset[str]
    student_taps: frozenset[Tap]
    teacher_taps: frozenset[Tap]
    pairs: tuple[tuple[int, int], ...] | None
    trainable_params: int
    ema_decay: float | None
    teacher_top_k: int | None = None


@dataclass
class RunPlan:
    """Everything decided about a run before any weight is loaded (see the module docstring).

    Attributes:
        cfg: the validated config the plan was resolved from.
        spec, task: the data task and the model head it needs.
        world_size: ranks the DeepSpeed configs were resolved for.
        teacher_path: the teacher's model path, None without a teacher.
        student_source: the model the student is built from (its layers or config), or loaded as it is.
        student_layers: 1-based source blocks the student copies (``init: teacher_layers``), else None.
        teacher_config, student_config: Hugging Face configs; the student's with its final depth/width.
        ds_teacher, ds_student: the resolved DeepSpeed configs (``auto`` filled).
        losses: the loss terms, in recipe order.
        examples: each split's raw examples (documents for ``lm``) as read by the checks, for the run to tokenise
            without reading the files again; empty when resolved without data (``load_data=False``).
        resume_from: the complete checkpoint ``(checkpoints root, tag)`` the run continues from, checked against
            the config (:mod:`scaledkd.resume`); None for a fresh start.
    """

    cfg: Config
    spec: data.TaskSpec
    task: TaskKind
    world_size: int
    teacher_path: str | None
    student_source: str
    student_layers: list[int] | None
    teacher_config: Any | None
    student_config: Any
    ds_teacher: dict[str, Any] | None
    ds_student: dict[str, Any]
    losses: list[LossPlan]
    examples: dict[str, Any]
    resume_from: tuple[Path, str] | None = None

    @property
    def train_examples(self) -> int | None:
        """Training examples (documents for ``lm``); None for a stream, whose length is unknown."""
        rows = self.examples.get("train", ())
        return None if isinstance(rows, IterableDataset) else len(rows)

    @property
    def dev_examples(self) -> int:
        return len(self.examples.get("dev", ()))

    @property
    def budget(self) -> Budget | None:
        """The run's optimiser steps (:func:`~scaledkd.engine.budget.plan_budget`); None while they depend on rows
        not made yet (a causal LM's packed documents without ``train.max_steps``, or data not read)."""
        if self.task == "causal_lm" or not self.examples:
            return plan_budget(self.cfg.train, None, self.world_size) if self.cfg.train.max_steps else None
        return plan_budget(self.cfg.train, self.train_examples, self.world_size)

    @property
    def tokenizer_source(self) -> str:
        """The run tokenises with the teacher's tokenizer (the student's, when it has its own, was checked equal)."""
        return self.teacher_path or self.student_source

    @property
    def teacher_zero3(self) -> bool:
        return self.ds_teacher is not None and zero_stage(self.ds_teacher) == 3

    @property
    def student_zero3(self) -> bool:
        return zero_stage(self.ds_student) == 3

    def build_losses(self, device: torch.device | str | None = None) -> tuple[dict[str, DistillLoss], dict[str, float]]:
        """The loss modules (``key -> module``) and their weights; on ``meta`` for sizing, else real (the
        trainable modules' initial weights then draw from torch's RNG, in recipe order)."""
        return _instantiate(self.cfg, self.student_config, self.teacher_config, self.task, device)

    def summary(self) -> dict[str, Any]:
        """What ``scaledkd validate`` prints."""
        return {
            "task": self.task, "train_examples": self.train_examples, "dev_examples": self.dev_examples,
            "losses": sorted(lp.key for lp in self.losses),
            "student": {"init": self.cfg.student.init, "source": self.student_source, "layers": self.student_layers,
                        "blocks": int(self.student_config.num_hidden_layers)},
            "student_blocks": int(self.student_config.num_hidden_layers),
            "teacher_blocks": int(self.teacher_config.num_hidden_layers) if self.teacher_config is not None else None,
            "zero_stage": {"student": zero_stage(self.ds_student),
                           "teacher": zero_stage(self.ds_teacher) if self.ds_teacher is not None else None},
            "world_size": self.world_size,
            "budget": budget.as_dict() if (budget := self.budget) is not None else None,
        }


# ------------------------------------------------------------------------------------------ resolve


def env_world_size() -> int:
    """Ranks of this job, from the process group when it exists, else the launcher's ``WORLD_SIZE``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def student_source(cfg: Config) -> str:
    """The model a student is built from: ``student.path`` (pretrained), else ``from_model`` or the teacher."""
    return str(cfg.student.source or cfg.teacher.source)  # Config guarantees one of them


def resolve(cfg: Config, *, world_size: int | None = None, check_output: bool = True,
            load_data: bool = True) -> RunPlan:
    """Resolve ``cfg`` into a :class:`RunPlan`, running every check that needs no weights.

    Args:
        world_size: ranks to resolve the DeepSpeed configs for (default: this job's).
        check_output: refuse an ``output_dir`` the run could not use (finished run, foreign files), as
            ``distill`` would. Off for the stages of a staged recipe (their runner decides per stage).
        load_data: read the data files to count the examples and check the batch fits (the memory planner
            skips it).

    Raises:
        ConfigError / ValueError / DataError / RunDirError: with the offending key, value and the valid choices.
    """
    world_size = world_size or env_world_size()
    for plugin in cfg.plugins:
        try:
            importlib.import_module(plugin)
        except ImportError as err:
            raise ConfigError(f"plugins: cannot import {plugin!r} ({err})") from None
    spec = data.task_spec(cfg.data)
    task = task_kind(spec)
    resume_from = None
    if check_output:
        check_run_dir(cfg)
        resume_from = check_resume(cfg)  # before any model: a bad resume target or a changed config fails fast

    # Losses and data first: they fail on the recipe alone, before any model config is read.
    source = student_source(cfg)
    teacher_path = cfg.teacher.source if cfg.teacher is not None else None
    for lc in cfg.losses:
        LOSSES.get(lc.name)  # an unknown loss names the registered ones
    check_available(cfg.train.report_to)
    if cfg.data.streaming and not cfg.train.max_steps:
        raise ConfigError("data.streaming=true reads a stream whose length is unknown, so train.epochs cannot be "
                          "counted; set train.max_steps")
    if cfg.data.streaming and cfg.teacher is not None and cfg.teacher.cache:
        raise ConfigError("teacher.cache stores the teacher's outputs per row of a fixed training set; "
                          "data.streaming has no fixed rows. Drop one of them")
    recipe = cfg.recipe_path
    ds_student = student_ds_config(read_ds_config(cfg.student.ds_config, recipe), cfg.train, world_size)
    ds_teacher = (teacher_ds_config(read_ds_config(cfg.teacher.ds_config, recipe), cfg.train, world_size)
                  if cfg.teacher is not None else None)

    # Model configs (no weights): the student's with its final depth and width.
    t_config = models.load_config(teacher_path, task, spec.num_labels) if teacher_path else None
    if t_config is not None:
        models.check_supported(t_config, teacher_path)
    s_config = models.load_config(source, task, spec.num_labels)
    models.check_supported(s_config, source)
    layers = None
    if cfg.student.init == "teacher_layers":
        layers = models.choose_layers(cfg.student.layers, cfg.student.num_layers, int(s_config.num_hidden_layers))
        s_config = models.layers_student_config(s_config, layers)
    elif cfg.student.init == "config":
        s_config = models.config_student_config(s_config, cfg.student)
    ds_student = fill_bucket_sizes(ds_student, int(s_config.hidden_size))
    if t_config is not None:
        models.check_vocab_sizes(t_config, s_config)
        models.check_student_tokenizer(models.load_tokenizer(teacher_path), teacher_path, source)
    _check_positions(cfg, (("teacher", t_config), ("student", s_config)))

    losses = loss_plans(cfg, s_config, t_config, task)
    check_losses(cfg, losses, ds_student)
    check_on_policy(cfg, losses, s_config)
    check_early_stopping(cfg, spec, task)

    examples = {}
    if load_data:
        examples = {split: data.load_examples(cfg.data, split, cfg.train.seed) for split in ("train", "dev")}
        n_train = None if task == "causal_lm" else len(examples["train"])  # LM documents become rows later
        if n_train is not None:  # before the holdout: its own check (plan.budget) would blame the holdout
            micro_batches_per_epoch(n_train, cfg.train.batch_size, world_size)
    plan = RunPlan(cfg=cfg, spec=spec, task=task, world_size=world_size, teacher_path=teacher_path,
                   student_source=source, student_layers=layers, teacher_config=t_config, student_config=s_config,
                   ds_teacher=ds_teacher, ds_student=ds_student, losses=losses, examples=examples,
                   resume_from=resume_from)
    _ = plan.budget  # too few rows left to train on after an early-stopping holdout fails here, not after loading
    if cfg.teacher is not None and cfg.teacher.cache and load_data:
        from .cache import check_cache

        check_cache(plan)  # the recipe can be cached, and the cache was built for this teacher, data and taps
    return plan


def _check_positions(cfg: Config, configs: tuple[tuple[str, Any], ...]) -> None:
    for who, config in configs:
        limit = arch.position_limit(config) if config is not None else None
        if limit and cfg.data.max_length > limit:
            raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the {who}'s position limit of {limit} "
                              f"tokens (max_position_embeddings); lower data.max_length to at most {limit}")


def _instantiate(cfg: Config, s_config: Any, t_config: Any | None, task: TaskKind,
                 device: torch.device | str | None) -> tuple[dict[str, DistillLoss], dict[str, float]]:
    losses, weights = {}, {}
    causal = arch.is_causal(s_config)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        for i, lc in enumerate(cfg.losses):
            key = lc.name if lc.name not in losses else f"{lc.name}_{i}"
            setup = LossSetup(student_config=s_config, teacher_config=t_config, mapping=lc.mapping, task=task,
                              name=lc.name, causal=causal)
            losses[key] = build_loss(lc.name, setup, lc.params)
            weights[key] = lc.weight
    return losses, weights


def loss_plans(cfg: Config, s_config: Any, t_config: Any | None, task: TaskKind) -> list[LossPlan]:
    built, _ = _instantiate(cfg, s_config, t_config, task, "meta")
    plans = []
    for (key, loss), lc in zip(built.items(), cfg.losses, strict=True):
        student_taps, teacher_taps = loss.taps()
        plans.append(LossPlan(
            key=key, config=lc, needs=frozenset(loss.needs), student_taps=frozenset(student_taps),
            teacher_taps=frozenset(teacher_taps), pairs=tuple(loss.pairs) if loss.pairs is not None else None,
            trainable_params=sum(p.numel() for p in loss.parameters() if p.requires_grad),
            ema_decay=loss.ema_decay, teacher_top_k=loss.teacher_top_k))
    return plans


def check_on_policy(cfg: Config, losses: list[LossPlan], s_config: Any) -> None:
    """``data.on_policy`` needs a student that generates and a teacher-scored loss to learn from its samples."""
    if cfg.data.on_policy is None:
        return
    if not arch.is_causal(s_config):
        raise ConfigError(f"data.on_policy needs a causal-LM student that can generate; the student is a "
                          f"{s_config.model_type!r} encoder")
    if cfg.train.mixup:
        raise ConfigError("data.on_policy and train.mixup both rewrite the training batches; use one of them")
    scored = [lp.key for lp in losses if "teacher" in lp.needs and lp.config.weight != 0]
    if not scored:
        raise ConfigError("data.on_policy: no loss with a non-zero weight reads the teacher, so nothing scores the "
                          "student's continuations; add lm_kd (its divergence: forward_kl, reverse_kl, jsd, ...) or "
                          "drop data.on_policy")


def check_losses(cfg: Config, losses: list[LossPlan], ds_student: dict[str, Any]) -> None:
    """What the losses ask of the rest of the config: labels, mixup, an EMA student, something to train, and
    whole student parameters for ``train.log_grad_norms``."""
    # A loss that needs a teacher without one has already failed to build (DistillLoss checks it).
    for lp in losses:
        name = lp.key
        if "clean" in lp.needs and not cfg.train.mixup:
            raise ConfigError(f"loss {name!r} compares mixed and clean inputs; set train.mixup: true")
        if "labels" in lp.needs and cfg.train.mixup:
            raise ConfigError(f"loss {name!r} reads labels, but train.mixup=true mixes inputs (their labels are not "
                              "mixed); use label-free losses in a mixup stage (attn_kl, hidden_mse, logit_kd, ...)")
        if "labels" in lp.needs and cfg.data.supplementary is not None:
            raise ConfigError(f"loss {name!r} reads labels, but data.supplementary makes the training inputs "
                              "unlabeled; use label-free (ILD) losses in that stage")
    decays = sorted({lp.ema_decay for lp in losses if lp.ema_decay is not None})
    if len(decays) > 1:
        raise ConfigError(f"losses ask for EMA students with different decays {decays}; use one")
    if decays and zero_stage(ds_student) == 3:
        raise ConfigError("an EMA student (ema_decay) is not supported with a ZeRO-3 student; drop ema_decay to use "
                          "the clean student forward, or use ZeRO 0/1/2")
    if cfg.train.log_grad_norms and zero_stage(ds_student) == 3:  # else it fails at the first logged step
        raise ConfigError("train.log_grad_norms=true needs whole student parameters on every rank; under ZeRO-3 "
                          "they are partitioned. Use a ZeRO 0-2 student.ds_config for the diagnostic run, or set "
                          "train.log_grad_norms=false")
    if cfg.student.freeze and not any(lp.trainable_params for lp in losses):
        raise ConfigError("nothing to train: student.freeze=true and no loss has trainable modules")


# ------------------------------------------------------------------------------------------ run folder


def check_run_dir(cfg: Config, what: str = "run") -> None:
    """Refuse an ``output_dir`` the run cannot use, without touching it (rank-independent, read-only)."""
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output_dir {str(run_dir)!r} is a file, not a folder; choose another output_dir")
    if (run_dir / FINISHED_MARKER).exists() and not cfg.overwrite:
        raise RunDirError(
            f"output_dir {str(run_dir)!r} already holds a finished {what} ({FINISHED_MARKER}); pass overwrite=true "
            "to replace it (the old run is moved aside first) or choose another output_dir"
        )
    if what == "run" and run_dir.is_dir() and any(run_dir.iterdir()) and not cfg.overwrite:
        if not cfg.train.resume:
            raise RunDirError(
                f"output_dir {str(run_dir)!r} is not empty; resume an interrupted run with train.resume=latest (or "
                "auto), pass overwrite=true (the old contents are moved aside), or choose another output_dir"
            )
        if cfg.train.resume == "auto" and not is_run_folder(run_dir):
            raise RunDirError(
                f"output_dir {str(run_dir)!r} is not empty and holds no scaledkd run to resume "
                "(train.resume=auto); choose another output_dir"
            )


# ------------------------------------------------------------------------------------------ baseline


def baseline(cfg: Config) -> Config:
    """A recipe's no-teacher baseline (``scaledkd finetune``): the same student, data and training settings,
    without the teacher and the losses that read it.

    - A student built from the teacher's layers or config keeps that source (``student.from_model``), so the
      baseline starts from the very weights/config the distilled student starts from.
    - When every loss reads the teacher, the task's own loss trains instead (``task`` for GLUE-style labels,
      ``lm_task`` for causal LMs); a task without labels has no baseline.
    - A staged recipe becomes one run with its last student stage's settings (data, train, student overrides)
      on the student the recipe starts from.
    """
    if cfg.stages:
        cfg = _last_student_stage(cfg)
    if cfg.teacher is None:
        return cfg
    kept = [lc for lc in cfg.losses if "teacher" not in LOSSES.get(lc.name).needs]
    dropped = [lc.name for lc in cfg.losses if lc not in kept]
    if not kept:
        kept = [_task_loss(cfg, dropped)]
    student = cfg.student
    if student.init != "pretrained" and not student.from_model:
        student = dataclasses.replace(student, from_model=cfg.teacher.path, gguf_file=cfg.teacher.gguf_file)
    log.info("finetune: the no-teacher baseline drops the teacher (%s)%s and trains with %s", cfg.teacher.path,
             f" and the losses that read it ({', '.join(dropped)})" if dropped else "",
             ", ".join(lc.name for lc in kept))
    data_cfg = dataclasses.replace(cfg.data, on_policy=None)  # on-policy samples need a teacher to score them
    return dataclasses.replace(cfg, teacher=None, losses=kept, student=student, data=data_cfg)


def _task_loss(cfg: Config, dropped: list[str]) -> LossConfig:
    if cfg.data.task == "lm":
        return LossConfig(name="lm_task")
    if cfg.data.task in GLUE_TASK_NAMES or (cfg.data.task in ("csv", "jsonl") and cfg.data.label_column):
        return LossConfig(name="task")
    raise ConfigError(
        f"finetune: every loss of this recipe reads the teacher ({', '.join(dropped)}) and data.task="
        f"{cfg.data.task!r} has no labels to train on without one, so this recipe has no no-teacher baseline"
    )


def _last_student_stage(cfg: Config) -> Config:
    """A staged recipe as one run: the recipe's own student, with its last student stage's settings."""
    stages = [s for s in cfg.stages if s.trains == "student"]
    if not stages:
        raise ConfigError("finetune: this staged recipe has no student stage (trains: student) to run alone")
    stage = stages[-1]
    where = f"stages[{stage.name}]"
    own = {k: v for k, v in stage.student.items() if not stage_refs(v) and k not in ("init", "path")}
    return Config(
        output_dir=cfg.output_dir,
        student=merge_section(StudentConfig, cfg.student, own, f"{where}.student"),
        data=merge_section(DataConfig, cfg.data, stage.data, f"{where}.data"),
        losses=list(stage.losses or cfg.losses),
        teacher=cfg.teacher if not stage_refs(stage.teacher) else None,
        train=merge_section(TrainConfig, cfg.train, stage.train, f"{where}.train"),
        overwrite=cfg.overwrite, plugins=list(cfg.plugins), recipe_path=cfg.recipe_path,
    )
