"""Untrusted files never run code: a crafted checkpoint (resume, export) and a crafted ``pytorch_model.bin``
teacher are refused with a message, and the code they carry never runs."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from scaledkd import cli
from tests.tiny import REPO, make_sst2, make_tiny_bert, tiny_recipe, write_recipe


class _Payload:
    """Unpickling this runs ``os.system`` (what a malicious checkpoint carries)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (its final checkpoint is the one the tests poison)."""
    root = tmp_path_factory.mktemp("untrusted")
    teacher, data_dir = make_tiny_bert(root / "teacher"), make_sst2(root / "glue")
    recipe = tiny_recipe(root, teacher, data_dir, train__max_steps=2)
    assert cli.main(["distill", str(write_recipe(root / "r.yaml", **recipe))]) == 0
    return root, recipe


def _poison(folder: Path, name: str, marker: Path) -> None:
    """Replace ``name`` with a pickle that runs code, and fix the manifest so only the unpickler can object."""
    path = folder / name
    torch.save({"module": _Payload(marker)}, path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name].update(size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_crafted_checkpoint_is_refused_on_resume_and_export(finished, tmp_path, capsys):
    root, recipe = finished
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    shutil.rmtree(run / "student")
    (run / "metrics.json").unlink()  # an interrupted run that resumes from its (poisoned) checkpoint
    marker = tmp_path / "pwned"
    _poison(run / "checkpoints" / "step_2", "mp_rank_00_model_states.pt", marker)

    assert cli.main(["export", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "refused to unpickle" in err and "mp_rank_00_model_states.pt" in err

    recipe = {**recipe, "output_dir": str(run), "train": {**recipe["train"], "resume": "latest"}}
    assert cli.main(["distill", str(write_recipe(tmp_path / "r.yaml", **recipe))]) == 2
    assert "refused to unpickle" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_crafted_pytorch_model_bin_teacher_is_refused(finished, tmp_path, capsys):
    root, recipe = finished
    teacher = tmp_path / "teacher"
    shutil.copytree(Path(recipe["teacher"]["path"]), teacher)
    (teacher / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"bert.embeddings.word_embeddings.weight": _Payload(marker)}, teacher / "pytorch_model.bin")
    recipe = {**recipe, "output_dir": str(tmp_path / "run"), "teacher": {**recipe["teacher"], "path": str(teacher)}}
    assert cli.main(["distill", str(write_recipe(tmp_path / "r.yaml", **recipe))]) == 2
    err = capsys.readouterr().err
    assert "scaledkd: error:" in err and "Traceback" not in err
    assert not marker.exists()
