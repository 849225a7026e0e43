"""``export`` never destroys data (issue 12): a non-empty target is refused unless ``overwrite`` and an earlier
export; the run it reads, the folders around it and anything beside the target are never touched, whatever
``overwrite`` says; a failed export leaves nothing behind.

One tiny in-process run (world size 1) with checkpoints at steps 1 and 2 serves every case; each case compares
a snapshot of the folders it must not touch before and after.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scaledkd.config import config_from_dict
from scaledkd.export import export_run
from tests.tiny import REPO, make_sst2, make_tiny_bert, tiny_recipe


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``folder``: relative path -> (size, mtime_ns) (folders as (-1, 0))."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns) if p.is_file() else (-1, 0)
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_assets")
    teacher, data_dir = make_tiny_bert(root / "teacher"), make_sst2(root / "glue")
    recipe = tiny_recipe(root, teacher, data_dir, losses=[{"name": "task", "weight": 0.5},
                                                          {"name": "logit_kd", "weight": 0.5}])
    recipe["output_dir"] = str(root / "runs" / "run")
    recipe["teacher"]["ds_config"] = str(REPO / "ds_configs/teacher_replicated.json")
    recipe["student"]["ds_config"] = str(REPO / "ds_configs/zero0.json")
    recipe["train"].update(max_steps=2, save_every=1)
    from scaledkd.engine import run as run_mod

    run_mod.run_distillation(config_from_dict(recipe))
    return root / "runs" / "run"


@pytest.fixture
def run(finished_run, tmp_path):
    """A private copy of the finished run in ``tmp_path/dir/run``, beside an unrelated file."""
    (tmp_path / "dir").mkdir()
    copy = Path(shutil.copytree(finished_run, tmp_path / "dir" / "run"))
    (tmp_path / "dir" / "notes.txt").write_text("not yours to delete")
    return copy


def assert_refused(run_dir: Path, out: Path, *needles: str, overwrite: bool = False, watch: Path | None = None):
    watch = watch or run_dir.parent.parent
    before = snapshot(watch)
    with pytest.raises(ValueError) as info:
        export_run(run_dir, out, overwrite=overwrite)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    assert snapshot(watch) == before  # nothing touched, no temporary folder left
    return str(info.value)


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_into_the_run_itself_is_refused(run, overwrite):
    assert_refused(run, run, str(run), "is", "never replaced", overwrite=overwrite)


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_into_the_folder_holding_the_run_is_refused(run, overwrite):
    assert_refused(run, run.parent, str(run.parent), "contains", overwrite=overwrite)
    assert (run.parent / "notes.txt").read_text() == "not yours to delete"
    assert_refused(run, run.parent.parent, "contains", overwrite=overwrite)


@pytest.mark.parametrize("inside", ["student", "checkpoints", "student_init", "checkpoints/new", "student/sub"])
def test_export_into_a_folder_of_the_run_is_refused_even_with_overwrite(run, inside):
    assert_refused(run, run / inside, "belongs to the run", overwrite=True)


def test_export_into_a_fresh_subfolder_of_the_run_works(run):
    out = export_run(run, run / "exports" / "final")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (run / "checkpoints" / "latest").is_file() and (run / "student" / "model.safetensors").is_file()


def test_non_empty_target_is_refused_without_overwrite(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    message = assert_refused(run, out, str(out), "not an exported model", watch=tmp_path)
    assert "choose a new or empty folder" in message
    assert_refused(run, out, str(out), overwrite=True, watch=tmp_path)  # not a model folder: never replaced
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_refused(run, a_file, "not a folder", overwrite=True, watch=tmp_path)


def test_overwrite_replaces_an_earlier_export_and_nothing_beside_it(run, tmp_path):
    out = tmp_path / "exports" / "model"
    export_run(run, out)
    old = out / "model.safetensors"
    assert old.is_file()
    # The old atomic_dir deleted a sibling named .<OUT>.old; a user's file of that name must survive.
    sibling = tmp_path / "exports" / ".model.old"
    sibling.mkdir()
    (sibling / "data.txt").write_text("someone else's")
    (tmp_path / "exports" / "other.txt").write_text("beside")
    assert_refused(run, out, str(out), "--overwrite", watch=tmp_path)
    export_run(run, out, tag="step_1", overwrite=True)
    prov = json.loads((out / "scaledkd_provenance.json").read_text())
    assert prov["checkpoint"].endswith("step_1")
    assert (sibling / "data.txt").read_text() == "someone else's"
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == [".model.old", "model", "other.txt"]


def test_an_empty_target_folder_is_used(run, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    export_run(run, out)
    assert (out / "model.safetensors").is_file()


def test_failed_export_leaves_the_old_export_and_no_temporary_folder(run, tmp_path, monkeypatch):
    out = tmp_path / "model"
    export_run(run, out)
    before = snapshot(tmp_path)
    from transformers import PreTrainedModel

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(OSError):
        export_run(run, out, overwrite=True)
    assert snapshot(tmp_path) == before


def test_export_without_a_checkpoint_says_so(run, tmp_path):
    shutil.rmtree(run / "checkpoints")
    message = assert_refused(run, tmp_path / "out", str(run), "no complete checkpoint", watch=tmp_path)
    assert "train.resume" not in message
    assert not (tmp_path / "out").exists()


def test_export_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "nothing").mkdir()
    assert_refused(tmp_path / "nothing", tmp_path / "out", "not a scaledkd run folder", watch=tmp_path)
