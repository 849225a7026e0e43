"""End to end on tiny real models: the CLI, the export, and every bad input named in the foundation issue.

Runs in-process (world size 1; the process group is created once and reused) so each case costs seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from scaledkd import cli
from scaledkd.build import resolve
from scaledkd.config import config_from_dict
from tests.tiny import REPO, make_sst2, make_tiny_bert, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    teacher = make_tiny_bert(root / "teacher")
    data_dir = make_sst2(root / "glue")
    return teacher, data_dir


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name ds_configs/ relative to the repository


def run_cli(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_distill_exports_a_student_that_reproduces_its_logits(assets, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from scaledkd.engine import run as run_mod
    from scaledkd.engine.run import eval_batches

    teacher, data_dir = assets
    cfg = config_from_dict(tiny_recipe(tmp_path, teacher, data_dir))
    run = run_mod.setup(resolve(cfg))
    teacher_before = {k: v.clone() for k, v in run.teacher_model.state_dict().items()}
    result = run_mod.train(run)
    metrics = run_mod.finish(run, result)

    out = tmp_path / "run" / "student"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "scaledkd_provenance.json",
                 "scaledkd_config.yaml"):
        assert (out / name).is_file(), name
    exported = AutoModelForSequenceClassification.from_pretrained(out).eval()
    from safetensors.torch import load_file

    keys = set(load_file(out / "model.safetensors"))
    assert not [k for k in keys if k.startswith("losses.") or "proj" in k]
    assert exported.config.num_hidden_layers == 2
    student = run.engine.module.student.eval()
    batch = next(eval_batches(run.dev_set, 8, run.collate))
    with torch.no_grad():
        want = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).logits
        got = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The teacher never changes.
    for k, v in run.teacher_model.state_dict().items():
        torch.testing.assert_close(v, teacher_before[k], rtol=0, atol=0)
    # metrics.json: final and best dev, the teacher's dev score, what was exported.
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["final"]["accuracy"] == metrics["final"]["accuracy"]
    assert {"final", "best", "teacher", "exported"} <= set(saved)
    assert saved["exported"] == "final"
    # Every loss term is logged per step.
    lines = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "step" in x and "event" not in x]
    assert [x["step"] for x in steps] == [1, 2, 3]
    assert {"loss", "task", "logit_kd", "hidden_mse", "attn_kl", "lr"} <= set(steps[0])
    prov = json.loads((out / "scaledkd_provenance.json").read_text())
    assert prov["teacher"] == str(teacher) and prov["seed"] == 42
    assert prov["student_init"]["copied_blocks"] == {"from_layers": [1, 2]}
    resolved = yaml.safe_load((out / "scaledkd_config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 3


def test_cli_distill_validate_eval(assets, tmp_path, capsys):
    teacher, data_dir = assets
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(tmp_path, teacher, data_dir))
    code, out, err = run_cli(["validate", str(recipe)], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["train_examples"] == 96 and report["student_blocks"] == 2
    code, out, err = run_cli(["distill", str(recipe), "train.max_steps=2"], capsys)
    assert code == 0, err
    assert "exported final student" in out
    # Where the time goes: every logged step splits its wall time, and the summary prints the run's split.
    assert "ms per optimiser step: teacher" in out and "tokens/s" in out
    steps = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"step"' in x]
    logged = next(x for x in steps if x.get("step") == 1 and "loss" in x)
    assert all(logged[f"ms_{p}"] > 0 for p in ("teacher", "student", "backward", "optimizer"))
    assert logged["tokens_per_s"] > 0
    split = json.loads((tmp_path / "run" / "metrics.json").read_text())["speed"]["step_ms"]
    assert set(split) == {"teacher", "student", "backward", "optimizer"}
    code, out, err = run_cli(["eval", str(tmp_path / "run" / "student"), "--task", "sst2",
                              "--data-dir", str(data_dir)], capsys)
    assert code == 0, err
    scores = json.loads(out)
    assert scores["examples"] == 32 and 0.0 <= scores["accuracy"] <= 1.0


def test_finetune_needs_no_teacher(assets, tmp_path, capsys):
    teacher, data_dir = assets
    recipe = tiny_recipe(tmp_path, teacher, data_dir, losses=[{"name": "task"}])
    recipe["student"] = {"init": "pretrained", "path": str(teacher), "ds_config": "ds_configs/zero0.json"}
    code, out, err = run_cli(["finetune", str(write_recipe(tmp_path / "f.yaml", **recipe))], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["teacher"] is None and metrics["size"]["student_params"] > 0


# --------------------------------------------------------------------------- bad input: clear error, no damage


def expect_error(capsys, argv, *needles):
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (out, err)
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_unknown_config_key(assets, tmp_path, capsys):
    teacher, data_dir = assets
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(tmp_path, teacher, data_dir))
    expect_error(capsys, ["distill", str(recipe), "train.max_stepz=3"], "unknown config key train.max_stepz",
                 "max_steps")
    assert not (tmp_path / "run").exists()


def test_unknown_loss(assets, tmp_path, capsys):
    teacher, data_dir = assets
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(tmp_path, teacher, data_dir, losses=[{"name": "kd2"}]))
    expect_error(capsys, ["validate", str(recipe)], "unknown loss 'kd2'", "logit_kd", "qkv_relation")


def test_layer_out_of_range(assets, tmp_path, capsys):
    teacher, data_dir = assets
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(
        tmp_path, teacher, data_dir, losses=[{"name": "hidden_mse", "mapping": [[1, 2], [2, 9]]}]))
    expect_error(capsys, ["validate", str(recipe)], "teacher layer 9 is out of range", "valid: 0..4")
    recipe = write_recipe(tmp_path / "r2.yaml", **tiny_recipe(tmp_path, teacher, data_dir))
    expect_error(capsys, ["validate", str(recipe), "student.layers=[1,7]", "student.num_layers=2"],
                 "teacher block 7 is out of range", "valid: 1..4")


def test_relation_heads_not_dividing_width(assets, tmp_path, capsys):
    teacher, data_dir = assets
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(
        tmp_path, teacher, data_dir, losses=[{"name": "qkv_relation", "params": {"relation_heads": 5}}]))
    expect_error(capsys, ["validate", str(recipe)], "not divisible into relation_heads=5", "64")


def test_vocabulary_mismatch(assets, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    teacher, data_dir = assets
    other = tmp_path / "other"
    config = AutoConfig.from_pretrained(teacher)
    config.vocab_size = 1000
    AutoModelForSequenceClassification.from_config(config).save_pretrained(other)
    recipe = tiny_recipe(tmp_path, teacher, data_dir)
    recipe["student"] = {"init": "pretrained", "path": str(other), "ds_config": "ds_configs/zero0.json"}
    expect_error(capsys, ["validate", str(write_recipe(tmp_path / "r.yaml", **recipe))],
                 "teacher vocabulary size 30522", "student vocabulary size 1000")


def test_missing_data_file(assets, tmp_path, capsys):
    teacher, _ = assets
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(tmp_path, teacher, tmp_path / "nowhere"))
    expect_error(capsys, ["distill", str(recipe)], "nowhere", "data.data_dir")


def test_malformed_tsv_row(assets, tmp_path, capsys):
    teacher, data_dir = assets
    bad = make_sst2(tmp_path / "glue")
    lines = (bad / "SST-2" / "train.tsv").read_text().splitlines()
    lines[5] = "a row with no label column"
    (bad / "SST-2" / "train.tsv").write_text("\n".join(lines) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(tmp_path, teacher, bad))
    expect_error(capsys, ["distill", str(recipe)], "train.tsv:6", "expected 2 tab-separated columns")


def test_label_outside_label_set(assets, tmp_path, capsys):
    teacher, _ = assets
    bad = make_sst2(tmp_path / "glue")
    path = bad / "SST-2" / "dev.tsv"
    path.write_text(path.read_text().replace("\t1\n", "\t7\n", 1))
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(tmp_path, teacher, bad))
    expect_error(capsys, ["distill", str(recipe)], "dev.tsv", "'7'")


def test_empty_dataset(assets, tmp_path, capsys):
    teacher, _ = assets
    bad = make_sst2(tmp_path / "glue")
    (bad / "SST-2" / "train.tsv").write_text("sentence\tlabel\n")
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(tmp_path, teacher, bad))
    expect_error(capsys, ["distill", str(recipe)], "train.tsv", "no examples")


def test_finished_output_dir_is_refused_and_untouched(assets, tmp_path, capsys):
    teacher, data_dir = assets
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(tmp_path, teacher, data_dir))
    assert cli.main(["distill", str(recipe), "train.max_steps=1"]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "run"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    expect_error(capsys, ["distill", str(recipe), "train.max_steps=2"], "already holds a finished run",
                 "overwrite=true")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # With overwrite the new run replaces the old one, which is gone only after the new one finished.
    assert cli.main(["distill", str(recipe), "train.max_steps=2", "overwrite=true"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 2
    assert not list(tmp_path.glob("run.replaced-*"))


def test_nan_loss_stops_with_step_and_term(assets, tmp_path, capsys, monkeypatch):
    teacher, data_dir = assets
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugins"))
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(
        tmp_path, teacher, data_dir, losses=[{"name": "task"}, {"name": "nan_after", "params": {"calls": 2}}],
        plugins=["nan_loss_plugin"]))
    expect_error(capsys, ["distill", str(recipe)], "non-finite loss at step 3", "nan_after=nan")
    run_dir = tmp_path / "run"
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "student").exists()
    steps = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in steps if "step" in x and "event" not in x] == [1, 2]
