"""``scaledkd study SPEC.yaml``: a grid of runs (methods x initialisations x tasks x seeds), one subprocess each.

Every cell is ``python -m scaledkd.cli distill|finetune RECIPE overrides...`` in its own ``output_dir``, with
its output captured to a log, so a crashing cell is recorded and the study goes on. A cell whose output folder
holds ``metrics.json`` is finished and skipped; a failed cell is retried on the next invocation. After each cell
the results folder is rewritten:

    results.csv   one row per cell (best/final dev score, teacher score, % of teacher, steps, wall and CPU time,
                  status, error, the exact command)
    summary.csv   mean and std over seeds per task x method x initialisation
    summary.md    the same, readable at a glance (dev scores x100)
    summary.png   bars per method per task with std error bars, the teacher as a dashed line
    commands.md   every cell's command, in run order
    cells.json    the study's own record (status, return code, wall/CPU time, error, attempts) per cell
    logs/         one log per cell (also copied to ``<output_dir>/study.log`` when the run made its folder)

A spec (see benchmarks/quality/study.yaml)::

    results: benchmarks/quality/results/study   # the results folder
    runs_root: runs/quality               # cells run in {runs_root}/{task}/{method}/{init}/s{seed}
    notes: ["SST-2: 1,000 training sentences"]    # printed at the top of summary.md
    select: best                          # the dev score summarised: best (over training, as the papers) or final
    seeds: [1, 2, 3]                      # default seeds; a task or a method may name its own
    defaults: {data.data_dir: ../shared/data/glue}      # overrides of every cell
    tasks:
      rte: {overrides: {data.task: rte, teacher.path: runs/teacher_rte/student}}
    inits:
      lower: {student.layers: lower}
      upper: {student.layers: upper}
    methods:
      teacher: {command: finetune, recipe: "recipes/finetune_minilm_{task}.yaml", output_dir: "runs/teacher_{task}",
                role: teacher, seeds: [42], inits: [], task_overrides: false}
      kd: {recipe: recipes/distill_sst2_kd.yaml, inits: [lower, upper], after: [teacher]}

Overrides are merged defaults < task < method < the method's ``per_task: {task: {...}}`` < init (later wins), then
``output_dir`` and ``train.seed``; values may be lists and mappings (``losses: [{name: task}]`` replaces the
recipe's losses). String values (and ``recipe``, ``output_dir``) may use ``{task}``, ``{method}``, ``{init}``, ``{seed}``, ``{runs_root}``. A method runs the inits
it lists (default: the first init; ``[]``: no init axis), its own ``seeds`` (else the task's, else the spec's),
``command: finetune`` for runs without a teacher, ``task_overrides: false`` to ignore the task's overrides (a
teacher fine-tune by its own recipe), ``role: teacher`` to be the task's teacher in the reports. ``after: [m]``
makes every cell of the method wait for all cells of method ``m`` of the same task; a cell whose dependency is not
finished is recorded as blocked. Relative paths are relative to the current directory (the repository root, like
the recipes).
"""
from __future__ import annotations

import csv
import fnmatch
import json
import os
import shlex
import shutil
import statistics
import string
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

RENDEZVOUS_VARS = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                              "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"})

RECORDS = "cells.json"  # the study's record of its cells, in the results folder
FINISHED_MARKER = "metrics.json"  # engine.run.FINISHED_MARKER, not imported: that module pulls in torch


class SpecError(ValueError):
    """A study spec is invalid; the message names the key, the value and the valid choices."""


PLACEHOLDERS = ("task", "method", "init", "seed", "runs_root")
COMMANDS = ("distill", "finetune")


@dataclass
class Method:
    """One method of the grid (the keys of ``methods.<name>`` in a spec; see the module docstring).

    Attributes:
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


@dataclass
class Task:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] | None = None


@dataclass
class Spec:
    path: Path
    results: Path
    runs_root: str
    methods: dict[str, Method]
    tasks: dict[str, Task]
    inits: dict[str, dict[str, Any]]
    seeds: list[int]
    defaults: dict[str, Any] = field(default_factory=dict)
    select: Literal["best", "final"] = "best"
    notes: list[str] = field(default_factory=list)


@dataclass
class Cell:
    """One run of the grid."""

    id: str
    task: str
    method: str
    init: str | None
    seed: int
    command: str
    recipe: str
    output_dir: str
    overrides: list[str]
    after: list[str]
    role: str
    wave: int = 0  # the seed's position in its cell group's seed list: the run goes seed by seed

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "scaledkd.cli", self.command, self.recipe, *self.overrides]

    def command_line(self) -> str:
        return shlex.join(self.argv())

    def finished(self) -> bool:
        return (Path(self.output_dir) / FINISHED_MARKER).is_file()


# ------------------------------------------------------------------------------------------------ the spec


def _keys(where: str, data: Any, valid: Iterable[str], required: Iterable[str] = ()) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SpecError(f"{where} must be a mapping, got {data!r}")
    valid = list(valid)
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise SpecError(f"unknown key {where}.{unknown[0]}; valid keys: {valid}")
    for key in required:
        if key not in data:
            raise SpecError(f"{where} needs the key {key!r}")
    return data


def _overrides(where: str, data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise SpecError(f"{where} must be a mapping of dotted keys to values (data.task: rte), got {data!r}")
    return dict(data)


def _seeds(where: str, data: Any) -> list[int] | None:
    if data is None:
        return None
    if not isinstance(data, list) or not data or not all(isinstance(s, int) and not isinstance(s, bool) for s in data):
        raise SpecError(f"{where}={data!r} must be a non-empty list of integers")
    return data


def load_spec(path: str | Path) -> Spec:
    """Read and validate a study spec (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"study spec {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    top = _keys("spec", data, ["results", "runs_root", "select", "seeds", "defaults", "tasks", "inits", "methods",
                               "notes"], required=["results", "runs_root", "tasks", "methods"])
    select = top.get("select", "best")
    if select not in ("best", "final"):
        raise SpecError(f"select={select!r} is not valid; choose one of ['best', 'final']")
    seeds = _seeds("seeds", top.get("seeds", [42]))
    raw_inits = top.get("inits") or {}
    if not isinstance(raw_inits, dict):
        raise SpecError(f"inits must be a mapping of names to override sets, got {raw_inits!r}")
    inits = {name: _overrides(f"inits.{name}", v) for name, v in raw_inits.items()}
    tasks: dict[str, Task] = {}
    if not isinstance(top["tasks"], dict) or not isinstance(top["methods"], dict):
        raise SpecError("tasks and methods must be mappings of names to their settings")
    for name, t in top["tasks"].items():
        t = _keys(f"tasks.{name}", t or {}, ["overrides", "seeds"])
        tasks[name] = Task(name, _overrides(f"tasks.{name}.overrides", t.get("overrides")),
                           _seeds(f"tasks.{name}.seeds", t.get("seeds")))
    if not tasks:
        raise SpecError("tasks is empty; name at least one task")
    methods: dict[str, Method] = {}
    for name, m in top["methods"].items():
        m = _keys(f"methods.{name}", m, ["recipe", "command", "overrides", "per_task", "inits", "seeds", "after",
                                         "output_dir", "role", "task_overrides"], required=["recipe"])
        method = Method(name=name, recipe=str(m["recipe"]), command=m.get("command", "distill"),
                        overrides=_overrides(f"methods.{name}.overrides", m.get("overrides")),
                        inits=m.get("inits"), seeds=_seeds(f"methods.{name}.seeds", m.get("seeds")),
                        after=list(m.get("after") or []), output_dir=m.get("output_dir"),
                        role=m.get("role", "student"), task_overrides=bool(m.get("task_overrides", True)),
                        per_task={t: _overrides(f"methods.{name}.per_task.{t}", v)
                                  for t, v in _keys(f"methods.{name}.per_task", m.get("per_task") or {},
                                                    list(tasks)).items()})
        if method.command not in COMMANDS:
            raise SpecError(f"methods.{name}.command={method.command!r} is not valid; choose one of {list(COMMANDS)}")
        if method.role not in ("student", "teacher"):
            raise SpecError(f"methods.{name}.role={method.role!r} is not valid; choose one of ['student', 'teacher']")
        if method.inits is not None:
            if not isinstance(method.inits, list):
                raise SpecError(f"methods.{name}.inits={method.inits!r} must be a list of init names")
            for init in method.inits:
                if init not in inits:
                    raise SpecError(f"methods.{name}.inits: unknown init {init!r}; valid: {sorted(inits)}")
        methods[name] = method
    if not methods:
        raise SpecError("methods is empty; name at least one method")
    for method in methods.values():
        for dep in method.after:
            if dep not in methods or dep == method.name:
                raise SpecError(f"methods.{method.name}.after: unknown method {dep!r}; valid: "
                                f"{sorted(set(methods) - {method.name})}")
    notes = top.get("notes") or []
    notes = [notes] if isinstance(notes, str) else [str(n) for n in notes]
    return Spec(path=path, results=Path(top["results"]), runs_root=str(top["runs_root"]), methods=methods,
                tasks=tasks, inits=inits, seeds=seeds, defaults=_overrides("defaults", top.get("defaults")),
                select=select, notes=notes)


def _method_order(methods: dict[str, Method]) -> list[str]:
    """Methods in spec order, moved after the methods they wait for; a cycle is an error."""
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise SpecError(f"methods wait for each other in a cycle: {' -> '.join([*visiting, name])}")
        visiting.append(name)
        for dep in methods[name].after:
            visit(dep)
        visiting.pop()
        order.append(name)

    for name in methods:
        visit(name)
    return order


def _fill(value: Any, where: str, names: dict[str, Any]) -> Any:
    """Substitute ``{task}``-style placeholders in strings (recursively in lists and mappings)."""
    if isinstance(value, str):
        for _, field_name, _, _ in string.Formatter().parse(value):
            if field_name is not None and field_name not in names:
                raise SpecError(f"{where}={value!r}: unknown placeholder {{{field_name}}}; valid: "
                                f"{['{' + n + '}' for n in PLACEHOLDERS]} (write lists and mappings as YAML, not "
                                "as strings)")
        return value.format_map(names)
    if isinstance(value, list):
        return [_fill(v, where, names) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, where, names) for k, v in value.items()}
    return value


def _cli_value(value: Any) -> str:
    # JSON is YAML flow syntax: lists, mappings, null, true and 5e-05 read back as they were written.
    return value if isinstance(value, str) else json.dumps(value)


def expand(spec: Spec) -> list[Cell]:
    """The grid's cells, ordered task by task with every cell after the cells it waits for."""
    order = _method_order(spec.methods)
    first_init = next(iter(spec.inits), None)
    cells: list[Cell] = []
    by_task_method: dict[tuple[str, str], list[str]] = {}
    for task in spec.tasks.values():
        for mname in order:
            method = spec.methods[mname]
            inits = method.inits if method.inits is not None else ([first_init] if first_init else [])
            seeds = method.seeds or task.seeds or spec.seeds
            for init in inits or [None]:
                for wave, seed in enumerate(seeds):
                    names = {"task": task.name, "method": mname, "init": init or "", "seed": seed,
                             "runs_root": spec.runs_root}
                    cell_id = "/".join([task.name, mname, *([init] if init else []), f"s{seed}"])
                    merged = dict(_fill(spec.defaults, "defaults", names))
                    if method.task_overrides:
                        merged.update(_fill(task.overrides, f"tasks.{task.name}.overrides", names))
                    merged.update(_fill(method.overrides, f"methods.{mname}.overrides", names))
                    merged.update(_fill(method.per_task.get(task.name, {}), f"methods.{mname}.per_task.{task.name}",
                                        names))
                    if init:
                        merged.update(_fill(spec.inits[init], f"inits.{init}", names))
                    out = _fill(method.output_dir, f"methods.{mname}.output_dir", names) if method.output_dir \
                        else f"{spec.runs_root}/{cell_id}"
                    merged["output_dir"] = out
                    merged["train.seed"] = seed
                    after = [c for dep in method.after for c in by_task_method.get((task.name, dep), [])]
                    cells.append(Cell(
                        id=cell_id, task=task.name, method=mname, init=init, seed=seed, command=method.command,
                        recipe=_fill(method.recipe, f"methods.{mname}.recipe", names), output_dir=out,
                        overrides=[f"{k}={_cli_value(v)}" for k, v in merged.items()], after=after,
                        role=method.role, wave=wave))
                    by_task_method.setdefault((task.name, mname), []).append(cell_id)
    outs: dict[str, str] = {}
    for cell in cells:
        if cell.output_dir in outs:
            raise SpecError(f"cells {outs[cell.output_dir]} and {cell.id} share output_dir {cell.output_dir!r}; "
                            "give the method an output_dir with {task}/{init}/{seed} placeholders")
        outs[cell.output_dir] = cell.id
    return cells


def select_cells(cells: list[Cell], only: str | None) -> list[Cell]:
    """Cells whose id matches one of the comma-separated glob patterns, plus the cells they wait for."""
    if not only:
        return cells
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    chosen = {c.id for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)}
    if not chosen:
        raise SpecError(f"--only {only!r} matches no cell; cell ids look like {cells[0].id!r}")
    by_id = {c.id: c for c in cells}
    stack = list(chosen)
    while stack:
        for dep in by_id[stack.pop()].after:
            if dep not in chosen:
                chosen.add(dep)
                stack.append(dep)
    return [c for c in cells if c.id in chosen]


# ------------------------------------------------------------------------------------------------ metrics


def exported_score(metrics: dict[str, Any]) -> float | None:
    """The dev score of the model a run exported (its best evaluation when it exported the best)."""
    block = metrics.get("best") if str(metrics.get("exported", "")).startswith("best") else metrics.get("final")
    return (block or {}).get("score")


def _detail(block: dict[str, Any] | None) -> str:
    if not block:
        return ""
    return " ".join(f"{k}={v:.4f}" for k, v in block.items() if k not in ("step", "score") and isinstance(v, float))


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def cell_row(cell: Cell, record: dict[str, Any], select: str) -> dict[str, Any]:
    """One results.csv row: the study's record of the cell plus its metrics.json, when finished."""
    row: dict[str, Any] = {
        "cell": cell.id, "task": cell.task, "method": cell.method, "init": cell.init or "", "seed": cell.seed,
        "role": cell.role, "status": "done" if cell.finished() else record.get("status", "pending"),
        "selected": select, "score": None, "best_score": None, "best_step": None, "final_score": None,
        "teacher_score": None, "pct_of_teacher": None, "steps": None, "wall_s": _round(record.get("wall_s")),
        "cpu_s": _round(record.get("cpu_s")),
        "best_metrics": "", "final_metrics": "", "output_dir": cell.output_dir, "error": record.get("error", ""),
        "command": cell.command_line(),
    }
    if row["status"] == "done":
        metrics = json.loads((Path(cell.output_dir) / FINISHED_MARKER).read_text())
        best, final = metrics.get("best") or {}, metrics.get("final") or {}
        row.update(best_score=best.get("score"), best_step=best.get("step"), final_score=final.get("score"),
                   steps=metrics.get("total_steps", metrics.get("steps")),  # a staged run: all its stages
                   best_metrics=_detail(best), final_metrics=_detail(final), error="",
                   teacher_score=(metrics.get("teacher") or {}).get("score"))
        row["score"] = row["best_score"] if select == "best" else row["final_score"]
        row["exported_score"] = exported_score(metrics)
    return row


def fill_teacher_scores(rows: list[dict[str, Any]]) -> None:
    """Give every finished row a teacher score and the student's % of it.

    A distillation run records the dev score of the teacher it used; runs without a teacher (fine-tuned students)
    take it from a run of the same task and seed (the same dev subset when dev is subsampled), else of the same
    task, else from the task's teacher cell (its exported model's score).
    """
    per_seed: dict[tuple[str, int], float] = {}
    per_task: dict[str, float] = {}
    for row in rows:
        if row["teacher_score"] is not None:
            per_seed.setdefault((row["task"], row["seed"]), row["teacher_score"])
            per_task.setdefault(row["task"], row["teacher_score"])
    for row in rows:
        if row["role"] == "teacher" and row.get("exported_score") is not None:
            per_task.setdefault(row["task"], row["exported_score"])
    for row in rows:
        if row["status"] != "done" or row["role"] == "teacher":
            continue
        if row["teacher_score"] is None:
            row["teacher_score"] = per_seed.get((row["task"], row["seed"]), per_task.get(row["task"]))
        if row["teacher_score"] and row["score"] is not None:
            row["pct_of_teacher"] = 100.0 * row["score"] / row["teacher_score"]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``None`` when undefined: no values, or one value for the std)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of the finished rows, per task x method x init (in the rows' order)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "done":
            groups.setdefault((row["task"], row["method"], row["init"]), []).append(row)
    out = []
    for (task, method, init), members in groups.items():
        entry: dict[str, Any] = {"task": task, "method": method, "init": init, "role": members[0]["role"],
                                 "n": len(members), "seeds": " ".join(str(r["seed"]) for r in members),
                                 "selected": members[0]["selected"]}
        for key in ("score", "best_score", "final_score", "pct_of_teacher", "teacher_score"):
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std([r[key] for r in members if r[key] is not None])
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------ reports


RESULT_COLUMNS = ["cell", "task", "method", "init", "seed", "role", "status", "selected", "score", "best_score",
                  "best_step", "final_score", "teacher_score", "pct_of_teacher", "steps", "wall_s", "cpu_s",
                  "best_metrics", "final_metrics", "output_dir", "error", "command"]
SUMMARY_COLUMNS = ["task", "method", "init", "role", "n", "seeds", "selected", "score_mean", "score_std",
                   "best_score_mean", "best_score_std", "final_score_mean", "final_score_std", "teacher_score_mean",
                   "pct_of_teacher_mean", "pct_of_teacher_std"]


def _csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})


def _pm(mean: float | None, std: float | None, scale: float = 100.0) -> str:
    if mean is None:
        return "–"
    return f"{mean * scale:.1f} ± {std * scale:.1f}" if std is not None else f"{mean * scale:.1f}"


def teacher_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per task, the teacher's dev score behind the % of teacher: the mean over seeds (a seed's dev subset may
    differ from another's when dev is subsampled)."""
    per_seed: dict[str, dict[int, float]] = {}
    for row in rows:
        if row["status"] == "done" and row["role"] != "teacher" and row["teacher_score"] is not None:
            per_seed.setdefault(row["task"], {}).setdefault(row["seed"], row["teacher_score"])
    return {task: statistics.fmean(seeds.values()) for task, seeds in per_seed.items()}


def summary_markdown(spec: Spec, summary: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """summary.md: one table per task, dev scores x100 as mean ± std over seeds."""
    other = "final" if spec.select == "best" else "best"
    meaning = ("the best dev evaluation over training (as the papers report)" if spec.select == "best"
               else "the dev evaluation at the end of training")
    lines = [f"# Study {spec.path.name}", "",
             f"Dev scores x100, mean ± sample std over seeds (n = seeds finished). **{spec.select}** = {meaning} "
             f"is the selected score; {other} is beside it. % of teacher = selected student score / the task "
             "teacher's dev score.", ""]
    lines += [f"- {note}" for note in spec.notes]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines += ["", "Cells: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), ""]
    teachers = teacher_scores(rows)
    for task in spec.tasks:
        entries = [e for e in summary if e["task"] == task]
        task_rows = [r for r in rows if r["task"] == task and r["status"] == "done"]
        metric = next((r["best_metrics"] for r in task_rows if r["best_metrics"]), "")
        metric_names = ", ".join(part.split("=")[0] for part in metric.split())
        teacher = teachers.get(task)
        lines += [f"## {task}" + (f" (score = mean of {metric_names})" if "," in metric_names else
                                  f" (score = {metric_names})" if metric_names else ""), ""]
        if teacher is not None:
            lines += [f"Teacher dev score: {teacher * 100:.1f}", ""]
        if not entries:
            lines += ["No finished cells yet.", ""]
            continue
        lines += [f"| method | init | n | {spec.select} | {other} | % of teacher |", "|---|---|---|---|---|---|"]
        for e in entries:
            label = e["method"] + (" (teacher)" if e["role"] == "teacher" and "teacher" not in e["method"] else "")
            lines.append(f"| {label} | {e['init'] or '–'} | "
                         f"{e['n']} | {_pm(e['score_mean'], e['score_std'])} | "
                         f"{_pm(e[f'{other}_score_mean'], e[f'{other}_score_std'])} | "
                         f"{_pm(e['pct_of_teacher_mean'], e['pct_of_teacher_std'], 1.0)} |")
        lines.append("")
    problems = [r for r in rows if r["status"] in ("failed", "blocked")]
    if problems:
        lines += ["## Not finished", "", "| cell | status | error |", "|---|---|---|"]
        lines += [f"| {r['cell']} | {r['status']} | {str(r['error']).replace('|', '/')[:200]} |" for r in problems]
        lines.append("")
    return "\n".join(lines)


def plot_summary(spec: Spec, summary: list[dict[str, Any]], teachers: dict[str, float], path: Path) -> bool:
    """summary.png: per task, one bar per method (x init), height = mean selected score x100, std error bars,
    the teacher's score dashed. Returns False (and draws nothing) without matplotlib or finished cells."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = [t for t in spec.tasks if any(e["task"] == t and e["role"] != "teacher" for e in summary)]
    if not tasks:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(5.0, 4.2 * len(tasks)), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        entries = [e for e in summary if e["task"] == task and e["role"] != "teacher"]
        labels = [e["method"] + (f"\n{e['init']}" if e["init"] else "") for e in entries]
        heights = [e["score_mean"] * 100 for e in entries]
        errors = [(e["score_std"] or 0.0) * 100 for e in entries]
        inits = list(dict.fromkeys(e["init"] for e in entries))
        colors = [f"C{inits.index(e['init'])}" for e in entries]
        bars = ax.bar(range(len(entries)), heights, yerr=errors, capsize=3, color=colors, alpha=0.85)
        ax.bar_label(bars, labels=[f"{h:.1f}" for h in heights], fontsize=7, padding=2)
        for init in inits:
            ax.bar([0], [0], width=0, color=f"C{inits.index(init)}", label=f"init {init or '-'}")
        teacher = teachers.get(task)
        if teacher is not None:
            ax.axhline(teacher * 100, color="black", linestyle="--", linewidth=1, label=f"teacher {teacher * 100:.1f}")
        ax.legend(loc="lower right", fontsize=7)
        low = min([h - e for h, e in zip(heights, errors)] + ([teacher * 100] if teacher is not None else []))
        ax.set_ylim(max(0.0, low - 10), None)
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{task} (n = {'/'.join(sorted({str(e['n']) for e in entries}))} seeds)")
        ax.set_ylabel(f"{spec.select} dev score x100")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def commands_markdown(spec: Spec, cells: list[Cell], records: dict[str, dict[str, Any]]) -> str:
    lines = [f"# Commands of study {spec.path}", "",
             f"Run from `{os.getcwd()}`; `scaledkd study {spec.path}` runs them in this order and skips finished "
             "cells.", ""]
    for cell in cells:
        rec = records.get(cell.id, {})
        status = "done" if cell.finished() else rec.get("status", "pending")
        wall = f", {rec['wall_s']:.0f} s" if rec.get("wall_s") is not None else ""
        lines += [f"## {cell.id} ({status}{wall})", "", "```", cell.command_line(), "```", ""]
    return "\n".join(lines)


def write_reports(spec: Spec, cells: list[Cell], records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rewrite results.csv, summary.csv/.md/.png and commands.md from the cells' folders and records."""
    spec.results.mkdir(parents=True, exist_ok=True)
    rows = [cell_row(c, records.get(c.id, {}), spec.select) for c in cells]
    fill_teacher_scores(rows)
    summary = aggregate(rows)
    _csv(spec.results / "results.csv", RESULT_COLUMNS, rows)
    _csv(spec.results / "summary.csv", SUMMARY_COLUMNS, summary)
    (spec.results / "summary.md").write_text(summary_markdown(spec, summary, rows))
    (spec.results / "commands.md").write_text(commands_markdown(spec, cells, records))
    plot_summary(spec, summary, teacher_scores(rows), spec.results / "summary.png")
    return rows


# ------------------------------------------------------------------------------------------------ running


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _error_of(log: Path) -> str:
    """The most telling line of a failed cell's log: scaledkd's own error, else the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("scaledkd: error:"):
            return line
    return lines[-1] if lines else ""


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def _lock(results: Path) -> Path:
    """One study per results folder at a time; a lock left by a dead process is taken over."""
    lock = results / ".lock"
    if lock.exists():
        try:
            pid = int(lock.read_text().strip())
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            pid = None
        if pid is not None and pid != os.getpid():
            raise SpecError(f"another study (pid {pid}) is running on {results}; wait for it or remove {lock}")
    lock.write_text(str(os.getpid()))
    return lock


def cell_env(jobs: int) -> dict[str, str]:
    """The environment of a cell: this process's, without its rendezvous, and with a share of the cores.

    Each cell is its own single-process job: it must not inherit a rendezvous (RANK, MASTER_PORT, ...) that belongs
    to this process or its launcher, or it would try to join that group / bind a port in use. With ``jobs`` cells at
    once each gets ``cores // jobs`` intra-op threads (unless OMP_NUM_THREADS is set), so they do not oversubscribe.
    """
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_cell(cell: Cell, log: Path, *, env: dict[str, str] | None = None,
             running: dict[str, subprocess.Popen] | None = None) -> dict[str, Any]:
    """Run one cell as a subprocess; returns its record (status, rc, wall_s, cpu_s, error).

    ``cpu_s`` (user + system seconds of the cell's process and the children it waited for) is beside the wall time
    because on a shared machine the wall time says more about the neighbours than about the cell. ``running``, when
    given, holds the cell's process while it runs, so that an interrupted study can stop it.
    """
    start = time.time()
    if not Path(cell.recipe).is_file():
        log.write_text(f"recipe {cell.recipe} does not exist\n")
        return {"status": "failed", "rc": None, "wall_s": 0.0, "cpu_s": 0.0,
                "error": f"recipe {cell.recipe!r} does not exist"}
    with log.open("w") as f:
        f.write(f"$ {cell.command_line()}\n")
        f.flush()
        proc = subprocess.Popen(cell.argv(), stdout=f, stderr=subprocess.STDOUT,
                                env=env if env is not None else cell_env(1))
        if running is not None:
            running[cell.id] = proc
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # not proc.wait(): wait4 also gives this child's own rusage
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        finally:
            if running is not None:
                running.pop(cell.id, None)
    wall = time.time() - start
    cpu = usage.ru_utime + usage.ru_stime
    run_dir = Path(cell.output_dir)
    if run_dir.is_dir():
        shutil.copyfile(log, run_dir / "study.log")
    if rc == 0 and cell.finished():
        return {"status": "done", "rc": 0, "wall_s": wall, "cpu_s": cpu, "error": ""}
    error = _error_of(log) if rc != 0 else f"exited 0 without writing {FINISHED_MARKER}"
    if rc < 0:
        error = f"killed by signal {-rc}" + (f"; last line: {error}" if error else "")
    return {"status": "failed", "rc": rc, "wall_s": wall, "cpu_s": cpu, "error": error}


def _clear_unfinished(cell: Cell, record: dict[str, Any]) -> str | None:
    """Make a failed cell's folder ready for a retry (moved to ``<dir>.failed``). A folder the study did not
    start is never touched: the reason is returned instead."""
    run_dir = Path(cell.output_dir)
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    if not record.get("attempts"):
        return (f"output_dir {cell.output_dir!r} holds an unfinished run this study did not start (a run in "
                f"progress?); let it finish, or move it aside (mv {cell.output_dir} {cell.output_dir}.failed) if "
                f"it is a stopped cell whose record was lost with {RECORDS}")
    aside = run_dir.with_name(run_dir.name + ".failed")
    shutil.rmtree(aside, ignore_errors=True)
    run_dir.rename(aside)
    return None


class _Interrupted(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, ``timeout``) turned into an interrupt, so reports are still written."""


def _raise_interrupted(signum, frame):  # noqa: ARG001
    raise _Interrupted(f"signal {signum}")


def run_study(spec_path: str | Path, *, dry_run: bool = False, only: str | None = None, jobs: int = 1,
              echo: Callable[[str], None] = print) -> int:
    """Run (or, with ``dry_run``, list) the spec's unfinished cells; returns 0 when every selected cell is done.

    Cells run seed by seed (every cell's first seed before any second seed), so a study stopped early has every
    method at fewer seeds rather than some methods at none. ``jobs`` cells run at once (a cell starts when the cells
    it waits for are finished); on SIGTERM or Ctrl-C the running cells are stopped and the reports written.
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise SpecError(f"jobs={jobs!r}: must be a whole number >= 1")
    spec = load_spec(spec_path)
    cells = expand(spec)
    chosen = select_cells(cells, only)
    records_path = spec.results / RECORDS
    records: dict[str, dict[str, Any]] = json.loads(records_path.read_text()) if records_path.is_file() else {}
    todo = sorted((c for c in chosen if not c.finished()), key=lambda c: c.wave)  # stable: spec order per wave
    echo(f"study {spec.path}: {len(cells)} cells in the grid, {len(chosen)} selected, "
         f"{len(chosen) - len(todo)} finished, {len(todo)} to run"
         + (f", {jobs} at a time" if jobs > 1 else "") + f"; results in {spec.results}")
    if dry_run:
        for cell in chosen:
            status = "done" if cell.finished() else records.get(cell.id, {}).get("status", "pending")
            after = f"  (after {', '.join(cell.after)})" if cell.after else ""
            echo(f"  [{status:7s}] {cell.id}{after}\n            {cell.command_line()}")
        return 0
    spec.results.mkdir(parents=True, exist_ok=True)
    (spec.results / "logs").mkdir(exist_ok=True)
    lock = _lock(spec.results)
    by_id = {c.id: c for c in cells}
    env = cell_env(jobs)
    started = time.time()
    pending = list(todo)
    in_flight: dict[Future, tuple[Cell, str]] = {}
    procs: dict[str, subprocess.Popen] = {}
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupted) \
        if threading.current_thread() is threading.main_thread() else None

    def progress() -> str:
        elapsed = time.time() - started
        left = len(pending) + len(in_flight)
        ended = len(todo) - left
        eta = f", ETA {_hms(elapsed / ended * left)}" if ended and left else ""
        return f"elapsed {_hms(elapsed)}{eta}"

    def start_ready(pool: ThreadPoolExecutor) -> None:
        """Settle pending cells in order (start, or record as blocked / not run) while there is room; a cell
        waits while a cell it depends on is pending or running. Scans again after settling one, since a
        dependency later in the order (another seed wave) may just have been settled."""
        while pending and len(in_flight) < jobs:
            unsettled = {c.id for c in pending} | {c.id for c, _ in in_flight.values()}
            cell = next((c for c in pending if not unsettled.intersection(c.after)), None)
            if cell is None:
                return  # every pending cell waits for a running one
            pending.remove(cell)
            prefix = f"[{len(todo) - len(pending)}/{len(todo)}] {cell.id}"
            record = records.setdefault(cell.id, {})
            waiting = [d for d in cell.after if not by_id[d].finished()]
            if waiting:
                record.update(status="blocked", error=f"waits for unfinished {', '.join(waiting)}")
                echo(f"{prefix}: blocked, waits for {', '.join(waiting)}")
            elif (reason := _clear_unfinished(cell, record)) is not None:
                record.update(status="failed", error=reason)
                echo(f"{prefix}: not run: {reason}")
            else:
                log = spec.results / "logs" / (cell.id.replace("/", "__") + ".log")
                echo(f"{prefix}: running ({progress()}; log {log})")
                record.update(status="running", command=cell.command_line(), log=str(log),
                              attempts=record.get("attempts", 0) + 1, started=time.strftime("%Y-%m-%d %H:%M:%S"))
                in_flight[pool.submit(run_cell, cell, log, env=env, running=procs)] = (cell, prefix)
            _write_json(records_path, records)

    def finish(future: Future) -> None:
        cell, prefix = in_flight.pop(future)
        record = records[cell.id]
        record.update(future.result())
        if record["status"] == "done":
            metrics = json.loads((Path(cell.output_dir) / FINISHED_MARKER).read_text())
            score = (metrics.get(spec.select) or {}).get("score")
            shown = f"{spec.select} dev score {score:.4f}" if score is not None else "no dev score"
            echo(f"{prefix}: done in {_hms(record['wall_s'])}, {shown} ({progress()})")
        else:
            echo(f"{prefix}: FAILED in {_hms(record['wall_s'])}: {record['error']}")
        _write_json(records_path, records)
        write_reports(spec, cells, records)

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="study-cell")
    try:
        start_ready(pool)
        while in_flight:
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for future in done:
                finish(future)
            start_ready(pool)
        assert not pending, f"cells left unsettled: {[c.id for c in pending]}"  # the spec rejects cycles
    except KeyboardInterrupt as err:
        for proc in list(procs.values()):
            proc.terminate()
        for future, (cell, prefix) in list(in_flight.items()):
            try:
                result = future.result(timeout=60)
            except Exception as exc:  # noqa: BLE001  (the cell's thread died with the interrupt)
                result = {"status": "failed", "error": repr(exc)}
            records[cell.id].update(result, status="failed", error=f"interrupted ({err or 'Ctrl-C'})")
            echo(f"{prefix}: stopped (interrupted)")
        in_flight.clear()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        _write_json(records_path, records)
        write_reports(spec, cells, records)
        lock.unlink(missing_ok=True)
    unfinished = [c.id for c in chosen if not c.finished()]
    echo(f"study finished in {_hms(time.time() - started)}: {len(chosen) - len(unfinished)}/{len(chosen)} "
         f"selected cells done" + (f"; not done: {', '.join(unfinished)} (rerun to retry)" if unfinished else "")
         + f"\n  {spec.results / 'summary.md'}")
    return 1 if unfinished else 0
