"""``scaledkd study``: grid expansion, resumption, failed cells, aggregation and the reports.

The unit tests build cells and hand-written ``metrics.json`` folders (no training); one integration test runs a
real 2 methods x 2 seeds grid of tiny runs as subprocesses, then resumes it.
"""
from __future__ import annotations

import csv
import json
import math
import socket
import time
from pathlib import Path

import pytest
import yaml

from scaledkd import cli, study
from scaledkd.study import SpecError, aggregate, expand, load_spec, run_study, select_cells
from tests.tiny import REPO, make_sst2, make_tiny_bert, tiny_recipe, write_recipe


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def write_spec(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def grid_spec(tmp: Path, recipe: Path, **extra) -> dict:
    """A teacher fine-tune per task, then kd (lower/upper) and hidden (lower) after it."""
    spec = {
        "results": str(tmp / "results"),
        "runs_root": str(tmp / "runs"),
        "seeds": [1, 2],
        "defaults": {"data.data_dir": "/data/glue", "train.max_steps": 3},
        "tasks": {
            "rte": {"overrides": {"data.task": "rte", "teacher.path": "{runs_root}/teacher_{task}/student"}},
            "sst2": {"overrides": {"data.task": "sst2", "teacher.path": "{runs_root}/teacher_{task}/student"},
                     "seeds": [7]},
        },
        "inits": {"lower": {"student.layers": "lower"}, "upper": {"student.layers": "upper"}},
        "methods": {
            "kd": {"recipe": str(recipe), "inits": ["lower", "upper"], "after": ["teacher"],
                   "overrides": {"train.max_steps": 5}},
            "hidden": {"recipe": str(recipe), "after": ["teacher"],
                       "overrides": {"losses": [{"name": "task"}, {"name": "hidden_mse"}]}},
            "teacher": {"recipe": str(recipe), "command": "finetune", "role": "teacher", "seeds": [42], "inits": [],
                        "task_overrides": False, "output_dir": "{runs_root}/teacher_{task}"},
        },
    }
    spec.update(extra)
    return spec


# ------------------------------------------------------------------------------------------------ the grid


def test_expand_orders_cells_after_what_they_wait_for(tmp_path):
    cells = expand(load_spec(write_spec(tmp_path / "s.yaml", **grid_spec(tmp_path, tmp_path / "r.yaml"))))
    ids = [c.id for c in cells]
    assert ids == ["rte/teacher/s42", "rte/kd/lower/s1", "rte/kd/lower/s2", "rte/kd/upper/s1", "rte/kd/upper/s2",
                   "rte/hidden/lower/s1", "rte/hidden/lower/s2",
                   "sst2/teacher/s42", "sst2/kd/lower/s7", "sst2/kd/upper/s7", "sst2/hidden/lower/s7"]
    by_id = {c.id: c for c in cells}
    kd = by_id["rte/kd/upper/s2"]
    assert kd.after == ["rte/teacher/s42"] and by_id["sst2/hidden/lower/s7"].after == ["sst2/teacher/s42"]
    # The wave is the seed's position in its group: a study runs every cell's first seed before any second.
    assert [by_id[i].wave for i in ("rte/teacher/s42", "rte/kd/upper/s1", "rte/kd/upper/s2", "sst2/kd/lower/s7")] \
        == [0, 0, 1, 0]
    assert kd.output_dir == f"{tmp_path}/runs/rte/kd/upper/s2"
    # defaults < task < method < init, then output_dir and the seed; placeholders filled.
    assert kd.overrides == ["data.data_dir=/data/glue", "train.max_steps=5", "data.task=rte",
                            f"teacher.path={tmp_path}/runs/teacher_rte/student", "student.layers=upper",
                            f"output_dir={kd.output_dir}", "train.seed=2"]
    assert kd.argv()[1:5] == ["-m", "scaledkd.cli", "distill", str(tmp_path / "r.yaml")]
    # Lists travel as YAML flow (JSON) that the recipe loader reads back.
    hidden = by_id["rte/hidden/lower/s1"]
    assert 'losses=[{"name": "task"}, {"name": "hidden_mse"}]' in hidden.overrides
    # The teacher cell: no task overrides, its own output_dir, the finetune command.
    teacher = by_id["rte/teacher/s42"]
    assert teacher.command == "finetune" and teacher.init is None and teacher.role == "teacher"
    assert teacher.overrides == ["data.data_dir=/data/glue", "train.max_steps=3",
                                 f"output_dir={tmp_path}/runs/teacher_rte", "train.seed=42"]


def test_override_values_round_trip_through_the_recipe_loader(tmp_path):
    from scaledkd.config import apply_overrides

    cells = expand(load_spec(write_spec(tmp_path / "s.yaml", **grid_spec(
        tmp_path, tmp_path / "r.yaml", defaults={"train.lr": 3e-5, "train.progress": False,
                                                 "data.max_train_samples": None}))))
    data = apply_overrides({}, cells[1].overrides)
    assert data["train"]["lr"] == 3e-5 and data["train"]["progress"] is False
    assert data["data"]["max_train_samples"] is None and data["train"]["seed"] == 1


def test_only_selects_cells_and_what_they_wait_for(tmp_path):
    cells = expand(load_spec(write_spec(tmp_path / "s.yaml", **grid_spec(tmp_path, tmp_path / "r.yaml"))))
    chosen = [c.id for c in select_cells(cells, "sst2/kd/*")]
    assert chosen == ["sst2/teacher/s42", "sst2/kd/lower/s7", "sst2/kd/upper/s7"]
    assert len(select_cells(cells, "*/hidden/*,rte/kd/upper/s1")) == 6  # 3 hidden + 1 kd + 2 teachers
    with pytest.raises(SpecError, match="matches no cell"):
        select_cells(cells, "qnli/*")


@pytest.mark.parametrize("change, needle", [
    (lambda s: s.update(seed=[1]), "unknown key spec.seed"),
    (lambda s: s["methods"]["kd"].update(command="train"), "command='train' is not valid"),
    (lambda s: s["methods"]["kd"].update(inits=["middle"]), "unknown init 'middle'"),
    (lambda s: s["methods"]["kd"].update(after=["techer"]), "unknown method 'techer'"),
    (lambda s: s["methods"]["teacher"].update(after=["kd"]), "cycle"),
    (lambda s: s["methods"]["kd"].update(overrides={"losses": "[{name: task}]"}), "unknown placeholder {name}"),
    (lambda s: s["methods"]["teacher"].update(output_dir="{runs_root}/teacher"), "share output_dir"),
    (lambda s: s.update(select="last"), "select='last' is not valid"),
    (lambda s: s["tasks"]["rte"].update(seeds=[]), "non-empty list of integers"),
    (lambda s: s["methods"]["kd"].pop("recipe"), "missing key methods.kd.recipe"),
    (lambda s: s["methods"]["kd"].update(name="kd2"), "unknown key methods.kd.name"),  # the name is the key
    (lambda s: s["tasks"]["rte"].update(seeds=["1"]), "tasks.rte.seeds[0]='1' must be int"),
])
def test_spec_errors_name_the_value_and_the_choices(tmp_path, change, needle):
    spec = grid_spec(tmp_path, tmp_path / "r.yaml")
    change(spec)
    with pytest.raises(SpecError, match=needle.replace("[", r"\[").replace("{", r"\{")):
        expand(load_spec(write_spec(tmp_path / "s.yaml", **spec)))


# ------------------------------------------------------------------------------------------------ aggregation


def row(task, method, seed, score, teacher=0.8, init="lower", status="done", role="student"):
    return {"task": task, "method": method, "init": init, "seed": seed, "status": status, "role": role,
            "selected": "best", "score": score, "best_score": score,
            "final_score": None if score is None else score - 0.1,
            "teacher_score": teacher, "pct_of_teacher": None if score is None else 100 * score / teacher}


def test_aggregate_mean_and_sample_std_over_seeds():
    rows = [row("rte", "kd", 1, 0.6), row("rte", "kd", 2, 0.7), row("rte", "kd", 3, 0.8),
            row("rte", "kd", 4, None, status="failed"), row("rte", "hidden", 1, 0.65), row("stsb", "kd", 1, 0.9, 0.9)]
    summary = aggregate(rows)
    assert [(e["task"], e["method"], e["n"]) for e in summary] == [("rte", "kd", 3), ("rte", "hidden", 1),
                                                                   ("stsb", "kd", 1)]
    kd = summary[0]
    assert math.isclose(kd["score_mean"], 0.7) and math.isclose(kd["score_std"], 0.1)
    assert math.isclose(kd["final_score_mean"], 0.6) and math.isclose(kd["final_score_std"], 0.1)
    assert math.isclose(kd["pct_of_teacher_mean"], 87.5) and math.isclose(kd["pct_of_teacher_std"], 12.5)
    assert kd["seeds"] == "1 2 3"
    assert summary[1]["score_std"] is None  # one seed: no std
    assert math.isclose(summary[2]["pct_of_teacher_mean"], 100.0)


def fake_finished(cell, best, final, teacher=None, exported="best (step 4)", stages=False):
    """A finished cell folder with a hand-written metrics.json in the shape run.finish() writes."""
    folder = Path(cell.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    metrics = {"task": cell.task, "steps": 10, "final": {"accuracy": final, "score": final},
               "best": {"step": 4, "accuracy": best, "score": best},
               "teacher": {"accuracy": teacher, "score": teacher} if teacher is not None else None,
               "exported": exported}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_reports_from_finished_cells_and_nothing_reruns(tmp_path):
    spec_path = write_spec(tmp_path / "s.yaml", **grid_spec(tmp_path, tmp_path / "missing.yaml"))
    spec = load_spec(spec_path)
    cells = expand(spec)
    scores = iter([0.60, 0.70, 0.62, 0.64, 0.66, 0.68, 0.50, 0.52, 0.54])
    for cell in cells:
        if cell.role == "teacher":
            fake_finished(cell, best=0.75 if cell.task == "rte" else 0.9, final=0.7)
        elif cell.method == "hidden":  # a run without a teacher score of its own (like a fine-tuned student)
            fake_finished(cell, best=next(scores), final=0.5)
        else:
            teacher = 0.9 if cell.task == "sst2" else 0.8 if cell.seed == 1 else 0.7  # dev subsets differ by seed
            fake_finished(cell, best=next(scores), final=0.5, teacher=teacher)
    lines = []
    # Every cell is finished, so the study launches nothing (the recipe does not even exist).
    assert run_study(spec_path, echo=lines.append) == 0
    assert "0 to run" in lines[0]
    results = spec.results
    rows = {r["cell"]: r for r in read_csv(results / "results.csv")}
    assert len(rows) == len(cells) and {r["status"] for r in rows.values()} == {"done"}
    kd = rows["rte/kd/lower/s1"]
    assert float(kd["score"]) == 0.60 and float(kd["final_score"]) == 0.5 and float(kd["teacher_score"]) == 0.8
    assert math.isclose(float(kd["pct_of_teacher"]), 75.0) and kd["best_metrics"] == "accuracy=0.6000"
    assert "scaledkd.cli distill" in kd["command"] and "train.seed=1" in kd["command"]
    # No teacher score of its own: the one of a cell of the same task and seed.
    assert float(rows["rte/hidden/lower/s1"]["teacher_score"]) == 0.8
    assert float(rows["rte/hidden/lower/s2"]["teacher_score"]) == 0.7
    summary = {(r["task"], r["method"], r["init"]): r for r in read_csv(results / "summary.csv")}
    kd_lower = summary[("rte", "kd", "lower")]
    assert kd_lower["n"] == "2" and math.isclose(float(kd_lower["score_mean"]), 0.65)
    assert math.isclose(float(kd_lower["score_std"]), 0.0707106781, rel_tol=1e-6)
    md = (results / "summary.md").read_text()
    assert "| kd | lower | 2 | 65.0 ± 7.1 | 50.0 ± 0.0 | 87.5 ± 17.7 |" in md  # 60/80 and 70/70
    assert "| hidden | lower | 1 | 54.0 | 50.0 | 60.0 |" in md
    assert "Teacher dev score: 75.0" in md and "Teacher dev score: 90.0" in md  # rte: mean over seeds
    assert (results / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (results / "commands.md").read_text().count("```") == 2 * len(cells)


def test_missing_recipe_is_a_failed_cell_and_blocks_what_waits(tmp_path):
    spec_path = write_spec(tmp_path / "s.yaml", **grid_spec(tmp_path, tmp_path / "missing.yaml"))
    lines = []
    assert run_study(spec_path, only="rte/*", echo=lines.append) == 1
    records = json.loads((tmp_path / "results" / "cells.json").read_text())
    assert records["rte/teacher/s42"]["status"] == "failed"
    assert "missing.yaml' does not exist" in records["rte/teacher/s42"]["error"]
    assert records["rte/kd/lower/s1"] == {"status": "blocked", "error": "waits for unfinished rte/teacher/s42"}
    assert "sst2/kd/lower/s7" not in records
    statuses = {r["cell"]: r["status"] for r in read_csv(tmp_path / "results" / "results.csv")}
    assert statuses["rte/teacher/s42"] == "failed" and statuses["sst2/kd/lower/s7"] == "pending"
    assert "## Not finished" in (tmp_path / "results" / "summary.md").read_text()
    assert not (tmp_path / "results" / ".lock").exists()


def test_a_cell_waiting_for_a_later_seed_wave_is_recorded_as_blocked(tmp_path):
    # pre fails, so both teacher seeds are blocked without ever running; the teacher's second seed comes in wave 1,
    # after kd's only (wave 0) cell in the run order, and kd must still be settled as blocked by them.
    spec = grid_spec(tmp_path, tmp_path / "missing.yaml")
    spec["methods"]["pre"] = {"recipe": str(tmp_path / "missing.yaml"), "command": "finetune", "seeds": [1],
                              "inits": [], "output_dir": "{runs_root}/pre_{task}"}
    spec["methods"]["teacher"].update(seeds=[42, 43], output_dir="{runs_root}/teacher_{task}_s{seed}", after=["pre"])
    spec["methods"]["kd"]["inits"] = ["lower"]
    spec["tasks"]["rte"]["seeds"] = [1]
    spec_path = write_spec(tmp_path / "s.yaml", **spec)
    lines = []
    assert run_study(spec_path, only="rte/kd/*", echo=lines.append) == 1
    records = json.loads((tmp_path / "results" / "cells.json").read_text())
    assert records["rte/teacher/s43"] == {"status": "blocked", "error": "waits for unfinished rte/pre/s1"}
    assert records["rte/kd/lower/s1"] == {"status": "blocked",
                                          "error": "waits for unfinished rte/teacher/s42, rte/teacher/s43"}
    assert [line.split(":")[0] for line in lines if ": running" in line or ": blocked" in line] == [
        "[1/4] rte/pre/s1", "[2/4] rte/teacher/s42", "[3/4] rte/teacher/s43", "[4/4] rte/kd/lower/s1"]


def test_unfinished_folder_the_study_did_not_start_is_left_alone(tmp_path):
    spec_path = write_spec(tmp_path / "s.yaml", **grid_spec(tmp_path, tmp_path / "missing.yaml"))
    live = tmp_path / "runs" / "teacher_rte"
    live.mkdir(parents=True)
    (live / "log.jsonl").write_text("{}\n")
    assert run_study(spec_path, only="rte/teacher/*", echo=lambda s: None) == 1
    assert (live / "log.jsonl").read_text() == "{}\n"
    error = json.loads((tmp_path / "results" / "cells.json").read_text())["rte/teacher/s42"]["error"]
    assert "this study did not start" in error
    # A folder left by the study's own failed attempt is moved aside for the retry.
    (tmp_path / "results" / "cells.json").write_text(json.dumps({"rte/teacher/s42": {"status": "failed",
                                                                                      "attempts": 1}}))
    assert run_study(spec_path, only="rte/teacher/*", echo=lambda s: None) == 1
    assert not live.exists() and (tmp_path / "runs" / "teacher_rte.failed" / "log.jsonl").is_file()
    assert json.loads((tmp_path / "results" / "cells.json").read_text())["rte/teacher/s42"]["attempts"] == 2


def test_per_task_overrides_apply_to_that_task_only(tmp_path):
    spec = grid_spec(tmp_path, tmp_path / "r.yaml")
    spec["methods"]["hidden"]["per_task"] = {"sst2": {"train.max_steps": 9, "data.max_length": 64}}
    by_id = {c.id: c for c in expand(load_spec(write_spec(tmp_path / "s.yaml", **spec)))}
    assert "train.max_steps=9" in by_id["sst2/hidden/lower/s7"].overrides
    assert "data.max_length=64" in by_id["sst2/hidden/lower/s7"].overrides
    assert "train.max_steps=3" in by_id["rte/hidden/lower/s1"].overrides
    assert not any(o.startswith("data.max_length") for o in by_id["rte/hidden/lower/s1"].overrides)
    spec["methods"]["hidden"]["per_task"] = {"mnli": {"train.max_steps": 9}}
    with pytest.raises(SpecError, match=r"unknown key methods.hidden.per_task.mnli; valid keys: \['rte', 'sst2'\]"):
        load_spec(write_spec(tmp_path / "s.yaml", **spec))


def test_jobs_must_be_positive_and_share_the_cores(tmp_path, monkeypatch, capsys):
    spec_path = write_spec(tmp_path / "s.yaml", **grid_spec(tmp_path, tmp_path / "r.yaml"))
    with pytest.raises(SpecError, match="jobs=0"):
        run_study(spec_path, jobs=0)
    with pytest.raises(SystemExit):
        cli.main(["study", str(spec_path), "--jobs", "0"])
    assert "'0' is not a whole number >= 1" in capsys.readouterr().err
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(study.runner.os, "cpu_count", lambda: 16)
    assert study.cell_env(4)["OMP_NUM_THREADS"] == "4" and study.cell_env(32)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in study.cell_env(1) and "MASTER_PORT" not in study.cell_env(4)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert study.cell_env(4)["OMP_NUM_THREADS"] == "3"  # the user's setting wins


def test_dry_run_writes_nothing(tmp_path, capsys):
    spec_path = write_spec(tmp_path / "s.yaml", **grid_spec(tmp_path, tmp_path / "r.yaml"))
    assert cli.main(["study", str(spec_path), "--dry-run", "--only", "rte/kd/*"]) == 0
    out = capsys.readouterr().out
    assert "11 cells in the grid, 5 selected" in out and "rte/kd/upper/s2  (after rte/teacher/s42)" in out
    assert not (tmp_path / "results").exists()
    assert cli.main(["study", str(tmp_path / "nope.yaml")]) == 2
    assert "study spec" in capsys.readouterr().err


@pytest.mark.parametrize("name, n_cells", [("study.yaml", 80), ("smoke.yaml", 6)])
def test_shipped_specs_expand_and_name_existing_recipes(name, n_cells):
    cells = expand(load_spec(REPO / "benchmarks" / "quality" / name))
    assert len(cells) == n_cells
    missing = sorted({c.recipe for c in cells if not (REPO / c.recipe).is_file()})
    assert not missing, missing


def test_finished_marker_matches_the_engine():
    from scaledkd import files
    from scaledkd.engine.run import FINISHED_MARKER

    assert study.FINISHED_MARKER == files.FINISHED_MARKER == FINISHED_MARKER


def test_the_study_does_not_import_torch():
    # The CLI's study command and the parent of the cells stay light: torch is imported only by the cells.
    import subprocess
    import sys

    code = "import sys, scaledkd.study; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_tiny_grid_runs_resumes_and_records_a_failing_cell(tmp_path, monkeypatch):
    # The study's own process holds a rendezvous (as after an in-process run): cells must not inherit it.
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    monkeypatch.setenv("MASTER_PORT", str(held.getsockname()[1]))
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(key, value)
    teacher = make_tiny_bert(tmp_path / "teacher")
    data_dir = make_sst2(tmp_path / "glue")
    recipe = write_recipe(tmp_path / "kd.yaml", **tiny_recipe(
        tmp_path, teacher, data_dir, losses=[{"name": "task", "weight": 0.5}, {"name": "logit_kd", "weight": 0.5}]))
    spec_path = write_spec(
        tmp_path / "study.yaml", results=str(tmp_path / "results"), runs_root=str(tmp_path / "runs"), seeds=[1, 2],
        defaults={"train.max_steps": 2, "train.eval_every": 1},
        tasks={"sst2": {"overrides": {"data.task": "sst2"}}},
        inits={"lower": {"student.layers": "lower"}},
        methods={"kd": {"recipe": str(recipe)},
                 "hidden": {"recipe": str(recipe), "overrides": {"losses": [{"name": "task"}, {"name": "hidden_mse"}]}},
                 "broken": {"recipe": str(recipe), "seeds": [1], "overrides": {"train.max_stepz": 2}}})
    lines = []
    t0 = time.time()
    assert run_study(spec_path, jobs=2, echo=lines.append) == 1
    first_wall = time.time() - t0
    results = tmp_path / "results"
    records = json.loads((results / "cells.json").read_text())
    done = ["sst2/kd/lower/s1", "sst2/kd/lower/s2", "sst2/hidden/lower/s1", "sst2/hidden/lower/s2"]
    assert [records[c]["status"] for c in done] == ["done"] * 4
    assert all(records[c]["cpu_s"] > 1.0 for c in done)  # each cell's own CPU time (wait4), not the study's
    broken = records["sst2/broken/lower/s1"]
    assert broken["status"] == "failed" and broken["rc"] == 2 and "train.max_stepz" in broken["error"]
    # Seed by seed: the three first-seed cells start first; two at a time: the second starts before the first ends.
    started = [line.split(":")[0] for line in lines if line.endswith(".log)") and ": running (" in line]
    assert started == ["[1/5] sst2/kd/lower/s1", "[2/5] sst2/hidden/lower/s1", "[3/5] sst2/broken/lower/s1",
                       "[4/5] sst2/kd/lower/s2", "[5/5] sst2/hidden/lower/s2"]
    assert lines[1].startswith("[1/5] sst2/kd/lower/s1: running") and lines[2].startswith("[2/5] sst2/hidden")
    assert any(line.startswith("[3/5] sst2/broken/lower/s1: FAILED") for line in lines)
    assert any("ETA" in line for line in lines)
    # Each finished cell: its own folder, its captured log, a different seed.
    rows = {r["cell"]: r for r in read_csv(results / "results.csv")}
    for c in done:
        run_dir = tmp_path / "runs" / c
        assert (run_dir / "metrics.json").is_file()
        assert "scaledkd: sst2 run finished" in (run_dir / "study.log").read_text()
        assert rows[c]["steps"] == "2" and float(rows[c]["wall_s"]) > 0 and rows[c]["teacher_score"]
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["seed"] == int(c[-1])
    hidden_losses = yaml.safe_load((tmp_path / "runs" / done[2] / "config.yaml").read_text())["losses"]
    assert [lc["name"] for lc in hidden_losses] == ["task", "hidden_mse"]
    summary = {(r["method"]): r for r in read_csv(results / "summary.csv")}
    assert summary["kd"]["n"] == "2" and "broken" not in summary
    for name in ("results.csv", "summary.csv", "summary.md", "summary.png", "commands.md"):
        assert (results / name).stat().st_size > 0, name

    # Second invocation: finished cells are skipped (not re-run), the failed one is retried.
    stamps = {c: (tmp_path / "runs" / c / "metrics.json").stat().st_mtime_ns for c in done}
    lines = []
    t0 = time.time()
    assert run_study(spec_path, echo=lines.append) == 1
    assert "4 finished, 1 to run" in lines[0] and lines[1].startswith("[1/1] sst2/broken/lower/s1: running")
    assert {c: (tmp_path / "runs" / c / "metrics.json").stat().st_mtime_ns for c in done} == stamps
    records = json.loads((results / "cells.json").read_text())
    assert [records[c]["attempts"] for c in done] == [1] * 4 and records["sst2/broken/lower/s1"]["attempts"] == 2
    print(f"first invocation {first_wall:.1f} s (5 cells), second {time.time() - t0:.1f} s (1 cell)")


@pytest.mark.slow
def test_sigterm_stops_running_cells_writes_reports_and_the_rerun_retries_them(tmp_path):
    # A scheduler's time limit (timeout, SLURM) sends SIGTERM: the running cells are stopped and recorded, the
    # reports and cells.json are written, the lock is released; the next invocation moves the stopped cells'
    # folders aside and runs them again.
    import os
    import signal
    import subprocess
    import sys

    teacher = make_tiny_bert(tmp_path / "teacher")
    data_dir = make_sst2(tmp_path / "glue")
    recipe = write_recipe(tmp_path / "kd.yaml", **tiny_recipe(tmp_path, teacher, data_dir))
    spec_path = write_spec(
        tmp_path / "study.yaml", results=str(tmp_path / "results"), runs_root=str(tmp_path / "runs"), seeds=[1, 2],
        defaults={"train.eval_every": 0, "train.max_steps": 100000},  # runs until stopped
        tasks={"sst2": {"overrides": {"data.task": "sst2"}}}, inits={"lower": {"student.layers": "lower"}},
        methods={"kd": {"recipe": str(recipe)}})
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "scaledkd.cli", "study", str(spec_path), "--jobs", "2"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    results = tmp_path / "results"
    deadline = time.time() + 120
    while time.time() < deadline:  # both cells have written their first training log line: they are mid-run
        logs = [tmp_path / "runs" / "sst2" / "kd" / "lower" / s / "log.jsonl" for s in ("s1", "s2")]
        if all(p.is_file() and '"step"' in p.read_text() for p in logs):
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the cells did not start training within 120 s:\n" + proc.communicate()[0][-3000:])
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "sst2/kd/lower/s1: stopped (interrupted)" in out and "sst2/kd/lower/s2: stopped (interrupted)" in out
    records = json.loads((results / "cells.json").read_text())
    for cell in ("sst2/kd/lower/s1", "sst2/kd/lower/s2"):
        assert records[cell]["status"] == "failed" and records[cell]["error"] == "interrupted (signal 15)"
        assert records[cell]["attempts"] == 1
    assert "## Not finished" in (results / "summary.md").read_text()
    assert not (results / ".lock").exists()
    # The rerun: the stopped folders go aside, both cells run to the end.
    short = write_spec(spec_path, **dict(yaml.safe_load(spec_path.read_text()),
                                         defaults={"train.eval_every": 0, "train.max_steps": 2}))
    assert run_study(short, jobs=2, echo=lambda line: None) == 0
    records = json.loads((results / "cells.json").read_text())
    assert [records[c]["attempts"] for c in ("sst2/kd/lower/s1", "sst2/kd/lower/s2")] == [2, 2]
    assert (tmp_path / "runs" / "sst2" / "kd" / "lower" / "s1.failed" / "log.jsonl").is_file()
