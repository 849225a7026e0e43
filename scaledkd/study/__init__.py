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
    defaults: {data.data_dir: /path/to/glue}   # overrides of every cell
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

The package: :mod:`.spec` (the schema, read like the recipes), :mod:`.cells` (the grid), :mod:`.report` (rows,
aggregation, the report files), :mod:`.runner` (the subprocesses, the scheduler, ``cells.json``). None of it
imports torch: the CLI and the cells' parent process stay light.
"""
from __future__ import annotations

from ..files import FINISHED_MARKER
from .cells import PLACEHOLDERS, Cell, expand, select_cells
from .report import (RESULT_COLUMNS, SUMMARY_COLUMNS, aggregate, cell_row, commands_markdown, exported_score,
                     fill_teacher_scores, mean_std, plot_summary, summary_markdown, teacher_scores, write_reports)
from .runner import RECORDS, RENDEZVOUS_VARS, cell_env, run_cell, run_study
from .spec import COMMANDS, Method, Spec, SpecError, Task, load_spec

__all__ = ["COMMANDS", "FINISHED_MARKER", "PLACEHOLDERS", "RECORDS", "RENDEZVOUS_VARS", "RESULT_COLUMNS",
           "SUMMARY_COLUMNS", "Cell", "Method", "Spec", "SpecError", "Task", "aggregate", "cell_env", "cell_row",
           "commands_markdown", "exported_score", "expand", "fill_teacher_scores", "load_spec", "mean_std",
           "plot_summary", "run_cell", "run_study", "select_cells", "summary_markdown", "teacher_scores",
           "write_reports"]
