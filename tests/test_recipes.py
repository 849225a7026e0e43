"""Every shipped recipe validates as a user would run it: ``scaledkd validate recipes/X.yaml data.data_dir=...``.

The validation reads the real configs of the teacher and student, builds every loss, reads the DeepSpeed
configs and loads the data. Recipes that read an earlier recipe's output (``runs/teacher_sst2/student``, the
fine-tuned teacher) are validated from a working folder where that output is stood in for by the pre-trained
MiniLM-L6 (same architecture and vocabulary), so the recipe file itself is checked unchanged.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from scaledkd import cli
from tests.conftest import stand_in_outputs

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
SHARED = REPO.parent / "shared" / "data"
GLUE_TASKS = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}


def _tasks_in(recipe: dict) -> set[str]:
    text = yaml.safe_dump(recipe)
    return set(re.findall(r"task: (\w+)", text))


def test_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    for required in ("default.yaml", "finetune_minilm_sst2.yaml", "finetune_minilm_rte.yaml",
                     "finetune_minilm_stsb.yaml", "distill_sst2_kd.yaml", "distill_sst2_hidden.yaml",
                     "distill_sst2_attention.yaml", "distill_sst2_minilmv2.yaml"):
        assert required in names


def test_default_recipe_is_the_embedded_one():
    shipped = yaml.safe_load((REPO / "recipes" / "default.yaml").read_text())
    embedded = yaml.safe_load((REPO / "scaledkd" / "recipes" / "default.yaml").read_text())
    assert shipped == embedded


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(recipe, tmp_path, monkeypatch, capsys, request):
    text = recipe.read_text()
    data = yaml.safe_load(text)
    overrides = []
    if _tasks_in(data) & GLUE_TASKS:
        if not (SHARED / "glue").is_dir():
            pytest.skip(f"recipe {recipe.name} reads GLUE data; shared data not found at {SHARED}")
        overrides.append(f"data.data_dir={SHARED / 'glue'}")
    if "lm" in _tasks_in(data):
        if not (SHARED / "lm").is_dir():
            pytest.skip(f"recipe {recipe.name} reads the LM corpus; shared data not found at {SHARED}")
        overrides.append(f"data.data_dir={SHARED / 'lm'}")
    stand_in_outputs(text, tmp_path, request)
    monkeypatch.chdir(tmp_path)  # relative outputs resolve here; ds_configs/ resolve from the repository
    assert cli.main(["validate", str(recipe), *overrides]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["ok"] is True
    assert not (tmp_path / "runs" / "default").exists()  # validation never trains or writes a run


def test_distill_recipe_names_the_missing_teacher(tmp_path, monkeypatch, capsys):
    if not (SHARED / "glue").is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["validate", str(REPO / "recipes" / "distill_sst2_kd.yaml"), f"data.data_dir={SHARED / 'glue'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "runs/teacher_sst2/student" in err and "finetune_minilm_sst2.yaml" in err
    assert os.listdir(tmp_path) == []
