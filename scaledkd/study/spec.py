"""The study spec's schema: dataclasses read by :func:`scaledkd.config.from_dict`, the machinery of the recipes.

Unknown and missing keys and wrong types fail with the key path (``unknown key methods.kd.recipy``); each section
then checks its own values in ``__post_init__``, and :class:`Spec` the names one section gives another (``inits``,
``after``, ``per_task``). A key left empty in the YAML (``overrides:``) takes its default. Every error is a
:class:`SpecError` naming the key, the value and the valid choices.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from ..config import ConfigError, from_dict

COMMANDS = ("distill", "finetune")
ROLES = ("student", "teacher")


class SpecError(ValueError):
    """A study spec is invalid; the message names the key, the value and the valid choices."""


def _choices(where: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise SpecError(f"{where}={value!r} is not valid; choose one of {list(valid)}")


def _overrides(where: str, data: Any) -> dict[str, Any]:
    """A set of dotted-key overrides (``{data.task: rte}``); empty (null) is none."""
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise SpecError(f"{where} must be a mapping of dotted keys to values (data.task: rte), got {data!r}")
    return dict(data)


def _seeds(where: str, seeds: list[int] | None) -> None:
    if seeds is not None and not seeds:  # the types (a list of integers) are from_dict's check
        raise SpecError(f"{where}={seeds!r} must be a non-empty list of integers")


def build(cls: type, data: Any, where: str, **given: Any) -> Any:
    """Dataclass ``cls`` from one section of a spec (plain YAML data) by :func:`scaledkd.config.from_dict`.

    ``given`` are fields the loader sets rather than the YAML (a section's name: its key; the spec's path); they
    are not keys of the section. A key left empty (null) takes its default; an empty section is ``{}``.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{where} must be a mapping, got {data!r}")
    valid = sorted(f.name for f in fields(cls) if f.name not in given)
    unknown = sorted(str(k) for k in set(data) - set(valid))
    if unknown:
        raise SpecError(f"unknown key {where}.{unknown[0]}; valid keys: {valid}")
    data = {k: v for k, v in data.items() if v is not None}
    try:
        return from_dict(cls, {**data, **given}, where)
    except ConfigError as err:  # the same message; a spec has keys, not config keys
        raise SpecError(str(err).replace("config key", "key")) from None


@dataclass
class Task:
    """One task of the grid (``tasks.<name>``).

    Attributes:
        name: the task's key in ``tasks`` (``{task}`` in placeholders).
        overrides: dotted-key overrides of the task's cells (``data.task: rte``).
        seeds: the task's seeds (None: the spec's).
    """

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] | None = None

    def __post_init__(self) -> None:
        self.overrides = _overrides(f"tasks.{self.name}.overrides", self.overrides)
        _seeds(f"tasks.{self.name}.seeds", self.seeds)


@dataclass
class Method:
    """One method of the grid (``methods.<name>``; see the package docstring).

    Attributes:
        name: the method's key in ``methods``.
        recipe: the recipe YAML (placeholders allowed, e.g. ``recipes/finetune_minilm_{task}.yaml``).
        command: ``distill``, or ``finetune`` (the recipe's teacher is dropped).
        overrides: dotted-key overrides of this method's cells.
        inits: init names to run (None: the spec's first init; ``[]``: no init axis).
        seeds: this method's seeds (None: the task's, else the spec's).
        after: methods whose cells of the same task must be finished first.
        output_dir: the cell folder (None: ``{runs_root}/{task}/{method}/{init}/s{seed}``).
        role: ``teacher`` marks the task's teacher fine-tune in the reports.
        task_overrides: apply the task's overrides (false for a teacher fine-tuned by its own recipe).
        per_task: overrides of this method's cells of one task (``{stsb: {...}}``), after ``overrides``.
    """

    name: str
    recipe: str
    command: Literal["distill", "finetune"] = "distill"
    overrides: dict[str, Any] = field(default_factory=dict)
    inits: list[str] | None = None
    seeds: list[int] | None = None
    after: list[str] = field(default_factory=list)
    output_dir: str | None = None
    role: Literal["student", "teacher"] = "student"
    task_overrides: bool = True
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"methods.{self.name}"
        _choices(f"{where}.command", self.command, COMMANDS)
        _choices(f"{where}.role", self.role, ROLES)
        self.overrides = _overrides(f"{where}.overrides", self.overrides)
        _seeds(f"{where}.seeds", self.seeds)
        self.per_task = {t: _overrides(f"{where}.per_task.{t}", v) for t, v in self.per_task.items()}


@dataclass
class Spec:
    """A study (see the package docstring); :func:`load_spec` reads one.

    Attributes:
        path: the spec file (set by the loader, not a key).
        results: the results folder (reports, ``cells.json``, ``logs/``).
        runs_root: the root of the cells' folders (``{runs_root}`` in placeholders).
        tasks, methods: the grid's tasks and methods, by name (:class:`Task`, :class:`Method`).
        inits: initialisations by name, each a set of overrides (``lower: {student.layers: lower}``).
        seeds: the default seeds.
        defaults: overrides of every cell.
        select: the dev score summarised: ``best`` (over training, as the papers) or ``final``.
        notes: lines printed at the top of summary.md (one string is one line).
    """

    path: Path
    results: Path
    runs_root: str
    tasks: dict[str, Task]
    methods: dict[str, Method]
    inits: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [42])
    defaults: dict[str, Any] = field(default_factory=dict)
    select: Literal["best", "final"] = "best"
    notes: list[str] | str = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.results, (str, Path)):
            raise SpecError(f"spec.results={self.results!r} must be a folder path")
        self.path, self.results = Path(self.path), Path(self.results)
        _choices("spec.select", self.select, ("best", "final"))
        _seeds("spec.seeds", self.seeds)
        self.defaults = _overrides("spec.defaults", self.defaults)
        self.inits = {name: _overrides(f"inits.{name}", v) for name, v in self.inits.items()}
        self.notes = [self.notes] if isinstance(self.notes, str) else list(self.notes)
        # from_dict leaves the values of a mapping as they are: each task and method is a section of its own.
        self.tasks = {name: t if isinstance(t, Task) else build(Task, t, f"tasks.{name}", name=name)
                      for name, t in self.tasks.items()}
        if not self.tasks:
            raise SpecError("tasks is empty; name at least one task")
        self.methods = {name: m if isinstance(m, Method) else build(Method, m, f"methods.{name}", name=name)
                        for name, m in self.methods.items()}
        if not self.methods:
            raise SpecError("methods is empty; name at least one method")
        for method in self.methods.values():
            self._check_names(method)

    def _check_names(self, method: Method) -> None:
        """The inits, tasks and methods ``method`` names exist."""
        where = f"methods.{method.name}"
        for task in method.per_task:
            if task not in self.tasks:
                raise SpecError(f"unknown key {where}.per_task.{task}; valid keys: {list(self.tasks)}")
        for init in method.inits or []:
            if init not in self.inits:
                raise SpecError(f"{where}.inits: unknown init {init!r}; valid: {sorted(self.inits)}")
        for dep in method.after:
            if dep not in self.methods or dep == method.name:
                raise SpecError(f"{where}.after: unknown method {dep!r}; valid: "
                                f"{sorted(set(self.methods) - {method.name})}")


def load_spec(path: str | Path) -> Spec:
    """Read and validate a study spec (see the package docstring)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"study spec {str(path)!r} does not exist")
    return build(Spec, yaml.safe_load(path.read_text()), "spec", path=path)
