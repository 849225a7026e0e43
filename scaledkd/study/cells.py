"""The cells of a study: the grid of a :class:`~scaledkd.study.spec.Spec` expanded into one run each.

A cell is ``python -m scaledkd.cli distill|finetune RECIPE overrides...``; its overrides merge the spec's layers
(defaults < task < method < per_task < init, then ``output_dir`` and ``train.seed``) with the ``{task}``-style
placeholders filled.
"""
from __future__ import annotations

import fnmatch
import json
import shlex
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import FINISHED_MARKER
from .spec import Method, Spec, SpecError

PLACEHOLDERS = ("task", "method", "init", "seed", "runs_root")


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

