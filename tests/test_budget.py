"""Training budgets that hold across data sizes: ``train.min_steps`` (a floor on optimiser steps) and
``train.early_stopping`` (a held-out slice of the training rows), docs/configuration.md#budget.

The recipe tests resolve each shipped GLUE recipe's budget, stage by stage, on a small task (RTE, WNLI) and a large
one (the whole SST-2 training set) from the real GLUE files, without training: the same
:func:`~scaledkd.engine.budget.plan_budget` the engine's learning-rate schedule and loop use.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from scaledkd import data
from scaledkd.build import resolve
from scaledkd.config import (
    GLUE_TASK_NAMES,
    ConfigError,
    DataConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    merge_section,
)
from scaledkd.engine.budget import holdout_split, plan_budget
from scaledkd.engine.early_stopping import EarlyStopping, check_early_stopping
from scaledkd.inputs import EXAMPLE_IDS
from tests.tiny import REPO, SHARED_DATA, free_port, tiny_recipe, write_recipe

GLUE = SHARED_DATA / "glue"
# Every shipped GLUE recipe carries the floor (none is left out).
NOT_HERE: tuple[str, ...] = ()
# Fewest optimiser steps a shipped GLUE recipe may give a small task: about the 625 steps at which the study's SST-2
# students reached 94-98 % of the teacher; at 4 epochs of RTE (308 steps) half the students' best dev evaluation
# was still their last one (benchmarks/results/quality/results.csv).
FLOOR = 600
SMALL = {"rte": 2490, "wnli": 635}  # training pairs in the GLUE files


def _glue_recipes() -> list[Path]:
    out = []
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        if path.name.startswith(NOT_HERE):
            continue
        task = (yaml.safe_load(path.read_text()).get("data") or {}).get("task")
        if task in GLUE_TASK_NAMES:
            out.append(path)
    return out


GLUE_RECIPES = _glue_recipes()


def _stages(path: Path, overrides: list[str]) -> list[tuple[str, TrainConfig, DataConfig]]:
    """(name, train, data) of each stage the recipe runs (one for a single-stage recipe), as the stage runner
    merges them."""
    cfg = load_config(path, [f"data.data_dir={GLUE}", *overrides])
    if not cfg.stages:
        return [(path.stem, cfg.train, cfg.data)]
    return [(stage.name, merge_section(TrainConfig, cfg.train, stage.train, stage.name),
             merge_section(DataConfig, cfg.data, stage.data, stage.name)) for stage in cfg.stages]


@functools.cache
def _rows(data_yaml: str, seed: int) -> int:
    return len(data.load_examples(DataConfig(**yaml.safe_load(data_yaml)), "train", seed))


def _train_rows(cfg: DataConfig, seed: int) -> int:
    """Training examples the run would read (supplementary inputs included), read once per data setting."""
    return _rows(yaml.safe_dump(asdict(cfg)), seed)


@pytest.fixture
def glue_data():
    if not (GLUE / "RTE" / "train.tsv").is_file() or not (GLUE / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"the budget rule is checked on real GLUE sizes; RTE/SST-2 not found under {GLUE}")


def test_every_glue_recipe_is_covered():
    names = {p.name for p in GLUE_RECIPES}
    assert {"distill_sst2_kd.yaml", "finetune_minilm_rte.yaml", "crild_rte.yaml"} <= names


@pytest.mark.parametrize("recipe", GLUE_RECIPES, ids=lambda p: p.stem)
@pytest.mark.parametrize("task", sorted(SMALL))
def test_small_task_gets_at_least_the_floor(recipe, task, glue_data):
    if not (GLUE / data.task_spec(DataConfig(task=task)).folder / "train.tsv").is_file():
        pytest.skip(f"{task} not found under {GLUE}")
    for name, train, data_cfg in _stages(recipe, [f"data.task={task}"]):
        rows = _train_rows(data_cfg, train.seed)
        budget = plan_budget(train, rows, 1)
        assert budget.steps >= FLOOR, (name, budget)
        if budget.epoch_steps < FLOOR:  # the recipe's epochs alone would starve it: the floor decided
            assert budget.rule == "min_steps" and budget.steps == train.min_steps, (name, budget)


@pytest.mark.parametrize("recipe", GLUE_RECIPES, ids=lambda p: p.stem)
def test_large_task_trains_its_epochs(recipe, glue_data):
    """The whole SST-2 training set (67,349 sentences): the floor never adds steps where epochs give enough."""
    for name, train, data_cfg in _stages(recipe, ["data.task=sst2", "data.max_train_samples=null"]):
        rows = _train_rows(data_cfg, train.seed)
        budget = plan_budget(train, rows, 1)
        assert rows >= 67_349 and budget.rule == "epochs", (name, budget)
        assert budget.steps == int(train.epochs * (rows // train.batch_size)), (name, budget)


def test_study_subset_of_sst2_is_not_changed_by_the_floor(glue_data):
    """The recipes' own setting (a 20,000-sentence SST-2 subset, 1 epoch) is the budget the study measured."""
    (_, train, data_cfg), = _stages(REPO / "recipes" / "distill_sst2_kd.yaml", [])
    budget = plan_budget(train, _train_rows(data_cfg, train.seed), 1)
    assert (budget.steps, budget.rule) == (625, "epochs")


# ------------------------------------------------------------------------------------------ the rule itself


def test_plan_budget_rule():
    train = TrainConfig(batch_size=32, epochs=1, min_steps=600)
    small = plan_budget(train, 2490, 1)
    assert (small.steps, small.rule, small.epoch_steps) == (600, "min_steps", 77)
    assert "train.min_steps=600" in small.describe() and "77" in small.describe()
    large = plan_budget(train, 67_349, 1)
    assert (large.steps, large.rule) == (2104, "epochs")
    assert plan_budget(TrainConfig(batch_size=32, epochs=1), 2490, 1).steps == 77  # no floor: as before
    # max_steps overrides both.
    assert plan_budget(TrainConfig(batch_size=32, epochs=1, min_steps=600, max_steps=50), 2490, 1).steps == 50
    # Ranks and accumulation: steps count optimiser updates of the global batch.
    assert plan_budget(TrainConfig(batch_size=32, epochs=2, grad_accum=2), 2490, 2).epoch_steps == 38
    with pytest.raises(ConfigError, match="train.max_steps"):
        plan_budget(TrainConfig(), None, 1)  # a stream has no epochs


def test_fewer_rows_than_a_global_batch_names_the_batch_it_would_take():
    with pytest.raises(ConfigError) as err:
        plan_budget(TrainConfig(batch_size=32), 50, 2)
    assert "fewer than one global batch of 64 (train.batch_size=32 x 2 ranks); lower train.batch_size to at most " \
           "25" in str(err.value)
    with pytest.raises(ConfigError, match="train on more examples or on fewer ranks"):
        plan_budget(TrainConfig(batch_size=1), 3, 4)  # not even one row per rank


def test_holdout_is_seeded_disjoint_and_removed_from_the_budget():
    train = TrainConfig(batch_size=8, epochs=1, eval_every=5, early_stopping={"holdout": 0.1})
    kept, held = holdout_split(635, train)
    assert len(held) == 64 and not set(kept) & set(held) and sorted(kept + held) == list(range(635))
    assert holdout_split(635, train) == (kept, held)  # the same rows on every rank and on resume
    other = TrainConfig(batch_size=8, epochs=1, eval_every=5, early_stopping={"holdout": 0.1}, seed=7)
    assert holdout_split(635, other)[1] != held
    budget = plan_budget(train, 635, 1)
    assert (budget.train_rows, budget.holdout_rows, budget.epoch_steps) == (571, 64, 71)
    with pytest.raises(ConfigError, match="holds out 8 of 15 training rows; the 7 left are fewer than one global"):
        plan_budget(TrainConfig(batch_size=8, eval_every=5, early_stopping={"holdout": 0.5}), 15, 1)


def test_early_stopping_rule_and_floor():
    from scaledkd.config import EarlyStoppingConfig

    def run(scores, metric="score", floor=0, patience=2):
        es = EarlyStopping(EarlyStoppingConfig(patience=patience, metric=metric), [], 8, None, "classification",
                           "rte", floor=floor)
        record, stops = {}, []
        for i, value in enumerate(scores, 1):
            record = es.update(record, 10 * i, {metric: value})
            stops.append(record["stopped"])
        return record, stops

    record, stops = run([0.5, 0.6, 0.6, 0.55])
    assert stops == [False, False, False, True] and record["best_step"] == 20 and record["best"] == 0.6
    _, stops = run([0.5, 0.5, 0.5, 0.5, 0.5], floor=45)  # never before train.min_steps
    assert stops == [False, False, False, False, True]
    record, stops = run([1.0, 0.9, 0.95, 0.97], metric="loss")  # lower is better
    assert stops == [False, False, False, True] and record["best_step"] == 20


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_holdout_scores_are_the_dev_metrics_plus_the_task_loss(task):
    """The holdout is scored as the dev set is (the same predictions, so the same metrics) plus the mean task loss
    over its rows (cross-entropy, or MSE for regression), here worked out on the model's own logits."""
    import torch
    import torch.nn.functional as F

    from scaledkd.engine.early_stopping import holdout_scores
    from scaledkd.evaluation import evaluate_task
    from tests.conftest import make_batch, tiny_model

    labels = 1 if task == "regression" else 3
    model = tiny_model("bert", num_labels=labels)
    batches = [make_batch(3, seed=1, num_labels=3), make_batch(2, seed=2, num_labels=3)]  # uneven: a row mean
    if task == "regression":
        for b in batches:
            b["labels"] = b["labels"].float() / 2
    metric = "stsb" if task == "regression" else "sst2"
    got = holdout_scores(model, batches, task, metric)
    with torch.no_grad():
        logits = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                            for b in batches])
    gold = torch.cat([b["labels"] for b in batches])
    want = (F.mse_loss(logits.squeeze(-1), gold) if task == "regression" else F.cross_entropy(logits, gold))
    assert got["loss"] == pytest.approx(float(want), rel=1e-5)
    assert {k: v for k, v in got.items() if k != "loss"} == evaluate_task(model, batches, task, metric)


# ------------------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize("train, message", [
    ({"min_steps": 0}, "train.min_steps=0 must be > 0"),
    ({"min_steps": 2.5}, "train.min_steps=2.5 must be int"),
    ({"eval_every": 10, "early_stopping": {"holdout": 0.0}}, "holdout=0.0 must be a share of the training rows in (0, 0.5]"),
    ({"eval_every": 10, "early_stopping": {"holdout": 0.6}}, "holdout=0.6"),
    ({"eval_every": 10, "early_stopping": {"patience": 0}}, "patience=0 must be an integer >= 1"),
    ({"eval_every": 10, "early_stopping": {"patience": True}}, "patience=True"),
    ({"eval_every": 10, "early_stopping": {"metric": ""}}, "train.early_stopping.metric=''"),
    ({"eval_every": 10, "early_stopping": {"holdout": 0.1, "wait": 3}},
     "unknown config key train.early_stopping.wait"),
    ({"eval_every": 0, "early_stopping": {}}, "train.eval_every=0"),
])
def test_bad_budget_values(train, message):
    recipe = yaml.safe_load((REPO / "recipes" / "distill_sst2_kd.yaml").read_text())
    recipe["train"].update(train)
    with pytest.raises(ConfigError) as err:
        config_from_dict(recipe)
    assert message in str(err.value)


def test_early_stopping_metric_must_be_the_tasks():
    recipe = yaml.safe_load((REPO / "recipes" / "distill_sst2_kd.yaml").read_text())
    recipe["data"]["task"] = "rte"
    recipe["train"]["early_stopping"] = {"metric": "pearson"}
    cfg = config_from_dict(recipe)
    spec = data.task_spec(cfg.data)
    with pytest.raises(ConfigError) as err:
        check_early_stopping(cfg, spec, "classification")
    assert "metric='pearson'" in str(err.value) and "['score', 'loss', 'accuracy']" in str(err.value)
    cfg.train.early_stopping.metric = "accuracy"
    check_early_stopping(cfg, spec, "classification")
    recipe["data"] = {"task": "text", "train_file": "builtin:python-docs"}
    with pytest.raises(ConfigError, match="has no labels to score"):
        check_early_stopping(config_from_dict(recipe), data.task_spec(config_from_dict(recipe).data), "agnostic")
    recipe["data"] = {"task": "rte", "supplementary": {"task": "stsb"}}
    cfg = config_from_dict(recipe)
    with pytest.raises(ConfigError, match="data.supplementary"):
        check_early_stopping(cfg, data.task_spec(cfg.data), "classification")


# ------------------------------------------------------------------------------------------ end to end (tiny)


@pytest.fixture
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name ds_configs/ relative to the repository


class _Recorded:
    """The run's own batches, with the dataset rows each micro-batch trained on written down."""

    def __init__(self, batches) -> None:
        self.inner, self.seen = batches, set()
        self.per_epoch = batches.per_epoch

    def __call__(self, epoch, skip=0):
        for batch in self.inner(epoch, skip):
            self.seen.update(batch[EXAMPLE_IDS].tolist())
            yield batch

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def _early_stopping_recipe(tmp_path, tiny_assets, **train):
    teacher, data_dir = tiny_assets
    # lr 1e-12: the student does not move, so its holdout score never improves after the first evaluation.
    recipe = tiny_recipe(tmp_path, teacher, data_dir, losses=[{"name": "task", "weight": 0.5},
                                                               {"name": "logit_kd", "weight": 0.5}])
    recipe["train"].update({"max_steps": None, "epochs": 5, "lr": 1e-12, "eval_every": 3, "save_every": 0,
                            "early_stopping": {"holdout": 0.25, "patience": 2}, **train})
    return recipe


def _train(recipe):
    from scaledkd.engine import run as run_mod

    run = run_mod.setup(resolve(config_from_dict(recipe)))
    run.batches = _Recorded(run.batches)
    return run, run_mod.finish(run, run_mod.train(run))


def test_early_stopping_stops_before_the_epochs_and_never_trains_on_the_holdout(tmp_path, tiny_assets, _repo_cwd):
    run, metrics = _train(_early_stopping_recipe(tmp_path, tiny_assets))
    # 96 rows: 24 held out, 72 trained = 9 steps of 8 per epoch, 45 steps for 5 epochs.
    assert metrics["budget"] == {"steps": 45, "rule": "epochs", "epoch_steps": 45, "epochs": 5.0, "train_rows": 72,
                                 "holdout_rows": 24}
    # Evaluations at steps 3 (best), 6 and 9 (no better): patience 2 stops at step 9.
    assert metrics["steps"] == 9
    assert metrics["early_stopping"] == {**metrics["early_stopping"], "best_step": 3, "bad_evals": 2, "stopped": True}
    _, held = holdout_split(96, run.cfg.train)
    assert len(held) == 24 and run.batches.seen and not run.batches.seen & set(held)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if x.get("event") == "holdout"] == [3, 6, 9]
    assert [x["step"] for x in log if x.get("event") == "early_stop"] == [9]
    # The stop's evaluation at step 9 is the final one: not run and recorded a second time.
    assert [x["step"] for x in log if x.get("event") == "eval"] == [3, 6, 9]
    assert [x["step"] for x in metrics["history"]] == [3, 6, 9]
    assert metrics["final"] == {k: v for k, v in metrics["history"][-1].items() if k != "step"}
    assert max(x["step"] for x in log if "loss" in x and "event" not in x) == 9


def test_an_early_stop_between_logged_steps_logs_its_last_window(tmp_path, tiny_assets, _repo_cwd):
    """log_every=4 and a stop at step 9: steps 9's window (one step) is written like the run's last step is, not
    dropped with its losses and timing."""
    run, metrics = _train(_early_stopping_recipe(tmp_path, tiny_assets, log_every=4))
    assert metrics["steps"] == 9
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "loss" in x and "event" not in x] == [4, 8, 9]
    assert run.timer.run_steps == 9  # the run's step-time totals (metrics.json speed) cover every step


def test_early_stopping_waits_for_min_steps(tmp_path, tiny_assets, _repo_cwd):
    _, metrics = _train(_early_stopping_recipe(tmp_path, tiny_assets, min_steps=14))
    assert metrics["budget"]["rule"] == "epochs"  # 45 steps from epochs: the floor only holds early stopping back
    assert metrics["steps"] == 15  # the first evaluation at or after step 14


def test_resume_keeps_the_early_stopping_record(tmp_path, tiny_assets, _repo_cwd):
    """A run interrupted after step 7 (evaluations at 3 and 6 recorded) and resumed stops at step 9, as the
    uninterrupted run does; counting afresh would stop at 15."""
    recipe = _early_stopping_recipe(tmp_path, tiny_assets, max_steps=7)
    _train(recipe)
    (tmp_path / "run" / "metrics.json").unlink()  # as if it had stopped between its last checkpoint and the end
    recipe["train"].update(max_steps=None, resume="latest", resume_allow_changes=["train.max_steps"])
    _, metrics = _train(recipe)
    assert metrics["steps"] == 9 and metrics["early_stopping"]["best_step"] == 3


@pytest.mark.slow  # ~50 s on 2 cores
@pytest.mark.multiproc
def test_two_ranks_stop_together_under_zero3(tmp_path, tiny_assets):
    """Two gloo ranks with a ZeRO-3 student (every holdout forward is a collective): both ranks score the holdout
    and stop at the same step, as one rank with the same global batch does; a rank that stopped alone would hang
    the other in its next collective until the timeout."""
    recipe = _early_stopping_recipe(tmp_path, tiny_assets, batch_size=4, dist_timeout_s=60)
    recipe["student"]["ds_config"] = "ds_configs/zero3.json"
    path = write_recipe(tmp_path / "r.yaml", **recipe)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "scaledkd.cli", "distill", str(path)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["budget"]["steps"] == 45 and metrics["steps"] == 9
    assert metrics["early_stopping"]["stopped"] and metrics["early_stopping"]["best_step"] == 3


def test_validate_prints_the_resolved_budget(tmp_path, tiny_assets, _repo_cwd, capsys):
    from scaledkd import cli

    recipe = _early_stopping_recipe(tmp_path, tiny_assets, min_steps=100)
    assert cli.main(["validate", str(write_recipe(tmp_path / "r.yaml", **recipe))]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    assert report["budget"] == {"steps": 100, "rule": "min_steps", "epoch_steps": 45, "epochs": 100 / 9,
                                "train_rows": 72, "holdout_rows": 24}
    recipe["train"]["early_stopping"] = {"holdout": 0.5}
    recipe["train"]["batch_size"] = 64  # 48 rows left to train on: fewer than one batch, refused before any model
    assert cli.main(["validate", str(write_recipe(tmp_path / "r.yaml", **recipe))]) == 2
    assert "holdout=0.5 holds out 48 of 96 training rows; the 48 left are fewer than one global batch" in \
        capsys.readouterr().err
