"""``train.report_to``: Accelerate's trackers get what ``log.jsonl`` gets. The TensorBoard event file of a tiny run
holds every loss term, the learning rate, throughput, the step-time split and the evaluation scores."""
from __future__ import annotations

import json

import pytest

from scaledkd import cli
from tests.tiny import REPO, tiny_recipe, write_recipe


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def test_tensorboard_receives_every_loss_term_and_the_scores(tiny_assets, tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="the trackers extra (pip install tensorboard) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(tmp_path, *tiny_assets, train__max_steps=3,
                                                                 train__eval_every=2))
    assert cli.main(["distill", str(recipe), "train.report_to=[tensorboard]"]) == 0
    [events] = list((tmp_path / "run" / "trackers" / "run").glob("events.out.tfevents.*"))  # hparams: a subfolder
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for term in ("loss", "task", "logit_kd", "hidden_mse", "attn_kl"):
        assert term in tags, term
        assert [e.step for e in acc.Scalars(term)] == [1, 2, 3]
    assert {"lr", "samples_per_s", "tokens_per_s", "ms_teacher", "ms_student", "ms_backward", "ms_optimizer"} <= tags
    assert {"eval/accuracy", "teacher/accuracy"} <= tags
    logged = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first = next(x for x in logged if x.get("step") == 1 and "loss" in x)
    assert acc.Scalars("loss")[0].value == pytest.approx(first["loss"], rel=1e-6)


def test_an_uninstalled_tracker_is_named_before_anything_runs(tiny_assets, tmp_path, capsys, monkeypatch):
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(tmp_path, *tiny_assets))
    assert cli.main(["validate", str(recipe), "train.report_to=[wandb]"]) == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert cli.main(["validate", str(recipe), "train.report_to=[nope]"]) == 2
    assert "train.report_to[0]='nope' is not valid" in capsys.readouterr().err
