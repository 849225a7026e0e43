"""One resolved run plan (``scaledkd.build``): ``validate`` refuses exactly what ``distill`` refuses before its first
step, with the same message, and ``finetune`` of any recipe is that recipe's no-teacher baseline.

Runs in-process on a tiny random BERT teacher with the real MiniLM tokenizer and a GLUE-format SST-2 folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from scaledkd import cli
from scaledkd.build import baseline, resolve
from scaledkd.config import config_from_dict, load_config
from tests.conftest import stand_in_outputs
from tests.tiny import REPO, SHARED_DATA, tiny_recipe, write_recipe


@pytest.fixture
def assets(tiny_assets):
    return tiny_assets


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name ds_configs/ relative to the repository


def _recipe(tmp_path: Path, teacher: Path, data_dir: Path, change) -> Path:
    recipe = tiny_recipe(tmp_path, teacher, data_dir)
    change(recipe, tmp_path)
    return write_recipe(tmp_path / "recipe.yaml", **recipe)


def _set(section: str, **values):
    def change(recipe, tmp_path):
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(recipe.get(section), dict) else values
    return change


def _losses(*losses):
    def change(recipe, tmp_path):
        recipe["losses"] = list(losses)
    return change


def _bad_ds_config(recipe, tmp_path):
    path = tmp_path / "zero_three.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": "three"}}))
    recipe["student"]["ds_config"] = str(path)


def _finished_run(recipe, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")


def _foreign_files(recipe, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")


def _output_is_a_file(recipe, tmp_path):
    (tmp_path / "run").write_text("not a folder")


def _ema_zero3(recipe, tmp_path):
    recipe["student"]["ds_config"] = "ds_configs/zero3.json"
    recipe["train"]["mixup"] = True
    recipe["losses"] = [{"name": "hidden_mse"}, {"name": "crild_consistency", "params": {"ema_decay": 0.99}}]


# Every refusal ``distill`` makes before its first step, and the words its message must contain.
REFUSALS = {
    "position_limit": (_set("data", max_length=512), "exceeds the teacher's position limit of 128"),
    "ema_with_zero3_student": (_ema_zero3, "not supported with a ZeRO-3 student"),
    "nothing_to_train": (_set("student", freeze=True), "nothing to train"),
    "labels_with_mixup": (_set("train", mixup=True), "train.mixup=true mixes inputs"),
    "clean_without_mixup": (_losses({"name": "crild_consistency"}), "set train.mixup: true"),
    "unknown_loss": (_losses({"name": "nope"}), "unknown loss 'nope'"),
    "layer_out_of_range": (_set("student", layers=[1, 9], num_layers=None), "teacher block 9 is out of range"),
    "mapping_out_of_range": (_losses({"name": "hidden_mse", "mapping": [[1, 7]]}), "teacher layer 7 is out of range"),
    "unknown_param": (_losses({"name": "logit_kd", "params": {"temp": 2}}), "has no parameter 'temp'"),
    "batch_larger_than_data": (_set("train", batch_size=1000, max_steps=3, lr=1e-3, log_every=1, progress=False,
                                    dist_timeout_s=120),
                               ("fewer than one global batch of 1000 (train.batch_size=1000 x 1 ranks); lower "
                                "train.batch_size to at most 96")),
    "bad_zero_stage": (_bad_ds_config, "zero_optimization.stage='three' is not valid"),
    "finished_output_dir": (_finished_run, "already holds a finished run"),
    "foreign_output_dir": (_foreign_files, "is not empty"),
    "output_dir_is_a_file": (_output_is_a_file, "is a file, not a folder"),
    "missing_data_dir": (lambda r, t: r["data"].update(data_dir=str(t / "nowhere")), "nowhere"),
    "hub_id_while_offline": (lambda r, t: r["teacher"].update(path="no-such-org/no-such-model"),
                             "no-such-org/no-such-model"),
    "resume_without_checkpoint": (_set("train", batch_size=8, max_steps=3, lr=1e-3, log_every=1, progress=False,
                                       dist_timeout_s=120, resume="latest"), "no checkpoint in"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_validate_refuses_what_distill_refuses_with_the_same_message(case, assets, tmp_path, capsys):
    change, words = REFUSALS[case]
    recipe = _recipe(tmp_path, *assets, change)
    before = sorted(p.name for p in tmp_path.iterdir())
    messages = {}
    for command in ("validate", "distill"):
        assert cli.main([command, str(recipe)]) == 2, command
        captured = capsys.readouterr()
        errors = [ln for ln in captured.err.splitlines() if ln.startswith("scaledkd: error:")]
        assert errors, captured.err[-2000:]
        messages[command] = errors[-1]
        assert "Traceback" not in captured.err
    assert messages["validate"] == messages["distill"]
    assert words in messages["distill"], messages["distill"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # a refused distill created nothing


def test_plan_holds_resolved_sources_losses_and_ds_configs(assets, tmp_path):
    teacher, data_dir = assets
    plan = resolve(config_from_dict(tiny_recipe(tmp_path, teacher, data_dir)), world_size=2)
    assert plan.task == "classification" and plan.student_source == str(teacher)
    assert plan.student_layers == [1, 2] and plan.student_config.num_hidden_layers == 2
    assert plan.ds_student["train_batch_size"] == 8 * 2  # "auto" filled for 2 ranks
    assert [lp.key for lp in plan.losses] == ["task", "logit_kd", "hidden_mse", "attn_kl"]
    hidden = plan.losses[2]
    assert hidden.pairs == ((0, 0), (1, 2), (2, 4)) and hidden.trainable_params == 0  # equal widths: no projection
    assert {t.layer for t in hidden.teacher_taps} == {0, 2, 4}
    assert plan.train_examples == 96 and plan.dev_examples == 32
    assert not (tmp_path / "run").exists()  # resolving writes nothing


def test_baseline_drops_the_teacher_and_what_reads_it(assets, tmp_path):
    teacher, data_dir = assets
    cfg = baseline(config_from_dict(tiny_recipe(tmp_path, teacher, data_dir)))
    assert cfg.teacher is None and [lc.name for lc in cfg.losses] == ["task"]
    assert cfg.student.from_model == str(teacher) and cfg.student.init == "teacher_layers"
    only_kd = baseline(config_from_dict(tiny_recipe(tmp_path, teacher, data_dir, losses=[{"name": "logit_kd"}])))
    assert [lc.name for lc in only_kd.losses] == ["task"]  # every loss read the teacher: the task's own loss


def test_finetune_of_a_distillation_recipe_trains_the_same_student_without_teacher(assets, tmp_path, capsys):
    teacher, data_dir = assets
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(tmp_path, teacher, data_dir, train__max_steps=2))
    assert cli.main(["finetune", str(recipe)]) == 0
    prov = json.loads((tmp_path / "run" / "student" / "scaledkd_provenance.json").read_text())
    assert prov["teacher"] is None and [x["name"] for x in prov["losses"]] == ["task"]
    assert prov["student_init"]["from"] == str(teacher)


# ------------------------------------------------------------------------------------------ shipped recipes


DISTILL_RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml")
                         if p.stem.startswith(("distill_", "lm_distill_", "crild_", "ted_")))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", DISTILL_RECIPES, ids=lambda p: p.stem)
def test_finetune_of_every_shipped_distillation_recipe_runs(recipe, tmp_path, monkeypatch, capsys, request):
    """``scaledkd finetune RECIPE`` is the recipe's no-teacher baseline: it trains (2 steps here) without the
    teacher and without the losses that read it. The fine-tuned teachers the recipes name are stood in for by
    MiniLM-L6 (GLUE) and by a random model of the LM demo's architecture (LM)."""
    lm = recipe.stem.startswith("lm_")
    data_dir = SHARED_DATA / ("lm" if lm else "glue")
    if not data_dir.is_dir():
        pytest.skip(f"recipe {recipe.name} reads the shared data; not found at {data_dir}")
    stand_in_outputs(recipe.read_text(), tmp_path, request)
    monkeypatch.chdir(tmp_path)
    overrides = [f"data.data_dir={data_dir}", f"output_dir={tmp_path / 'out'}", "train.max_steps=2",
                 "train.batch_size=4", "train.eval_every=0", "train.progress=false", "data.max_eval_samples=16",
                 "data.max_train_samples=64"]
    for stage in load_config(recipe, []).stages:  # a staged recipe's baseline runs its last student stage's settings
        overrides += [f"stages.{stage.name}.train.max_steps=2", f"stages.{stage.name}.train.eval_every=0"]
    assert cli.main(["finetune", str(recipe), *overrides]) == 0, capsys.readouterr().err[-3000:]
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["teacher"] is None
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["teacher"] is None and saved["stages"] == []
    assert [loss["name"] for loss in saved["losses"]] == (["lm_task"] if lm else ["task"])
    assert (out / "student" / "model.safetensors").is_file()


def test_a_zero3_teacher_does_not_prefetch_unless_asked():
    """DeepSpeed's prefetch gathered the whole forward-only teacher on every rank (benchmarks/results/scale.md):
    a ZeRO-3 teacher config fetches each module when it runs unless the JSON sets the bucket itself."""
    from scaledkd.config import TrainConfig
    from scaledkd.ds_config import read_ds_config, teacher_ds_config

    train = TrainConfig()
    resolved = teacher_ds_config({"zero_optimization": {"stage": 3}}, train, 2)
    assert resolved["zero_optimization"]["stage3_prefetch_bucket_size"] == 0
    mine = teacher_ds_config({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 1000}}, train, 2)
    assert mine["zero_optimization"]["stage3_prefetch_bucket_size"] == 1000
    shipped = teacher_ds_config(read_ds_config("ds_configs/teacher_zero3.json"), train, 2)
    assert shipped["zero_optimization"]["stage3_prefetch_bucket_size"] == 0
    assert "stage3_prefetch_bucket_size" not in teacher_ds_config({}, train, 2).get("zero_optimization", {})


def test_a_recipe_that_is_not_yaml_is_a_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: runs/x\nstudent: {init: [\n")
    for command in ("validate", "distill"):
        assert cli.main([command, str(bad)]) == 2
        err = capsys.readouterr().err
        assert "is not valid YAML" in err and str(bad) in err and "Traceback" not in err
