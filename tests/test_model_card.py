"""The exported student's ``README.md`` model card: teacher, architecture and source blocks, losses with weights,
data, steps, dev scores of student and teacher, and how to load it, from the run's own record."""
from __future__ import annotations

import json

import pytest

from scaledkd import cli
from tests.tiny import REPO, make_sst2, make_tiny_bert, tiny_recipe, write_recipe


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def test_export_has_a_model_card_that_matches_the_provenance(tmp_path, capsys):
    teacher = make_tiny_bert(tmp_path / "teacher")
    data_dir = make_sst2(tmp_path / "glue")
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(tmp_path, teacher, data_dir, train__max_steps=2))
    assert cli.main(["distill", str(recipe)]) == 0
    out = tmp_path / "run" / "student"
    card = (out / "README.md").read_text()
    prov = json.loads((out / "scaledkd_provenance.json").read_text())
    assert f"`{teacher}`" in card
    assert "BertForSequenceClassification (2 blocks, width 64)" in card and "source blocks [1, 2]" in card
    for loss in ("`task` x 0.5", "`logit_kd` x 0.5", "`hidden_mse` x 1", "`attn_kl` x 1"):
        assert loss in card
    assert f"{prov['steps']} optimiser steps, seed {prov['seed']}" in card
    assert f"accuracy {prov['final']['accuracy']:.4f}" in card
    assert f"teacher: accuracy {prov['teacher_scores']['accuracy']:.4f}" in card
    assert "AutoModelForSequenceClassification.from_pretrained" in card

    # `scaledkd export` of the run's checkpoint writes one as well.
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "again")]) == 0
    assert "AutoModelForSequenceClassification" in (tmp_path / "again" / "README.md").read_text()
