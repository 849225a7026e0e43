"""The study's reports: one row per cell, mean and std over seeds, and the files of the results folder.

    results.csv   one row per cell (scores, teacher score, % of teacher, steps, wall and CPU time, status, command)
    summary.csv   mean and std over seeds per task x method x initialisation
    summary.md    the same, readable at a glance (dev scores x100)
    summary.png   bars per method per task with std error bars, the teacher as a dashed line
    commands.md   every cell's command, in run order

Everything is rebuilt from the cells' folders (their ``metrics.json``) and the study's records, so a report is
never out of step with what is on disk.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path
from typing import Any

from ..files import FINISHED_MARKER
from .cells import Cell
from .spec import Spec


# ------------------------------------------------------------------------------------------------ rows


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

