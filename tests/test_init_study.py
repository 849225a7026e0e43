"""The initialisation study (METHODS.md §3, "How to Distill your BERT"): students built from the lower, upper,
uniform or listed blocks of the pre-trained or the task-fine-tuned teacher (``student.from_model``), through the
real run setup, with different distillation losses."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from scaledkd.build import resolve
from scaledkd.config import config_from_dict
from scaledkd.engine import run as run_mod
from tests.tiny import REPO, make_sst2, make_tiny_bert, tiny_recipe


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    pretrained = make_tiny_bert(root / "pretrained", seed=0)
    finetuned = make_tiny_bert(root / "finetuned", seed=1)  # same architecture, other weights
    return pretrained, finetuned, make_sst2(root / "glue")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


def assert_copied(student, source, blocks):
    s, t = student.state_dict(), source.state_dict()
    for key, value in t.items():
        if ".encoder.layer." not in key:
            assert torch.equal(s[key], value), key  # embeddings, pooler, classifier
    for i, block in enumerate(blocks):
        for key in source.bert.encoder.layer[block - 1].state_dict():
            assert torch.equal(s[f"bert.encoder.layer.{i}.{key}"], t[f"bert.encoder.layer.{block - 1}.{key}"]), \
                (i, block, key)


@pytest.mark.parametrize("scheme, blocks, loss, source", [
    ("lower", [1, 2], {"name": "logit_kd"}, "pretrained"),
    ("upper", [3, 4], {"name": "hidden_mse"}, "finetuned"),
    ("uniform", [2, 4], {"name": "attn_kl", "mapping": "uniform"}, "finetuned"),
    ([4, 1], [4, 1], {"name": "qkv_relation", "mapping": "last"}, "pretrained"),
])
def test_student_copies_the_chosen_blocks_of_the_chosen_teacher(assets, tmp_path, scheme, blocks, loss, source):
    pretrained, finetuned, data_dir = assets
    origin = {"pretrained": pretrained, "finetuned": finetuned}[source]
    recipe = tiny_recipe(tmp_path, finetuned, data_dir, losses=[loss], train__max_steps=1)
    recipe["student"].update(layers=scheme, num_layers=2, from_model=str(origin))
    run = run_mod.setup(resolve(config_from_dict(recipe)))
    student = run.engine.module.student
    assert_copied(student, AutoModelForSequenceClassification.from_pretrained(origin), blocks)
    other = pretrained if origin == finetuned else finetuned
    assert not torch.equal(student.bert.embeddings.word_embeddings.weight,
                           AutoModelForSequenceClassification.from_pretrained(other).bert.embeddings.word_embeddings.weight)
    run_mod.finish(run, run_mod.train(run))
    prov = json.loads((tmp_path / "run" / "student" / "scaledkd_provenance.json").read_text())
    assert prov["student_init"]["from"] == str(origin) and prov["teacher"] == str(finetuned)
    assert prov["student_init"]["copied_blocks"] == {"from_layers": blocks}
