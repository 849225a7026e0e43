"""Atomic, verified checkpoints (issue 12): a kill at any moment of a save leaves the previous complete
checkpoint usable, a resume skips an incomplete one with a warning and ends bit-identical to an uninterrupted
run, RNG files load with ``weights_only=True``, and retention deletes only our own older complete checkpoints.

In-process runs (world size 1) on the tiny BERT of ``tests/tiny.py``, with dropout on so that a resume without
the RNG state shows in the weights.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from scaledkd import checkpoint
from scaledkd.config import config_from_dict
from scaledkd.files import sha256_file
from tests.tiny import REPO, make_sst2, make_tiny_bert, small_engine, tiny_recipe

LOSSES = [{"name": "task", "weight": 0.5}, {"name": "logit_kd", "weight": 0.5}]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_assets")
    teacher = make_tiny_bert(root / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    config["hidden_dropout_prob"] = 0.1  # the student copies it: its training draws random numbers
    (teacher / "config.json").write_text(json.dumps(config))
    return teacher, make_sst2(root / "glue")


def recipe_for(assets, run_dir: Path, **train) -> dict:
    teacher, data_dir = assets
    recipe = tiny_recipe(run_dir.parent, teacher, data_dir, losses=LOSSES)
    recipe["output_dir"] = str(run_dir)
    recipe["teacher"]["ds_config"] = str(REPO / "ds_configs/teacher_replicated.json")
    recipe["student"]["ds_config"] = str(REPO / "ds_configs/zero0.json")
    recipe["train"].update({"keep_checkpoints": 0, "save_every_min": 0, **train})  # keep every checkpoint: tests
    return recipe                                                                     # look at older ones


def distill(assets, run_dir: Path, **train) -> Path:
    from scaledkd.engine import run as run_mod

    run_mod.run_distillation(config_from_dict(recipe_for(assets, run_dir, **train)))
    return run_dir


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "student" / "model.safetensors")


@pytest.fixture(scope="module")
def full_run(assets, tmp_path_factory):
    """6 steps, a checkpoint every 2: step_2, step_4 and step_6 (the end)."""
    return distill(assets, tmp_path_factory.mktemp("full") / "run", max_steps=6, save_every=2)


@pytest.fixture(scope="module")
def engine():
    """A DeepSpeed engine (ZeRO-0, a 4x4 layer, one optimiser step taken), for saving into any folder."""
    return small_engine(4)


def interrupted_copy(full: Path, dest: Path, latest: str) -> Path:
    """``full`` as an interrupted run would leave it: no finished marker, no export, ``latest`` -> ``latest``."""
    shutil.copytree(full, dest)
    (dest / "metrics.json").unlink()
    shutil.rmtree(dest / "student")
    (dest / "checkpoints" / "latest").write_text(latest)
    return dest


def test_every_checkpoint_has_a_manifest_of_all_its_files(full_run):
    root = full_run / checkpoint.CHECKPOINTS
    assert (root / "latest").read_text().strip() == "step_6"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_2", "step_4", "step_6"]  # no partials
    for tag in ("step_2", "step_4", "step_6"):
        folder = root / tag
        manifest = json.loads((folder / "manifest.json").read_text())
        on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and
                         p.name != "manifest.json")
        assert sorted(manifest["files"]) == on_disk
        assert "rng_rank0.pt" in on_disk and "mp_rank_00_model_states.pt" in on_disk
        for name, entry in manifest["files"].items():
            assert entry["size"] == (folder / name).stat().st_size
            assert entry["sha256"] == sha256_file(folder / name)


def test_rng_files_load_with_weights_only(full_run):
    state = torch.load(full_run / "checkpoints" / "step_2" / "rng_rank0.pt", weights_only=True)
    assert {"python", "numpy", "torch"} <= set(state)


def test_kill_between_shards_and_rng_resumes_from_the_previous_checkpoint_bit_identical(
        assets, full_run, tmp_path, caplog):
    # What the old save order left after a kill at step 4: DeepSpeed's shards and `latest`, no RNG file.
    killed = interrupted_copy(full_run, tmp_path / "run", latest="step_4")
    shutil.rmtree(killed / "checkpoints" / "step_6")
    (killed / "checkpoints" / "step_4" / "rng_rank0.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="scaledkd"):
        distill(assets, killed, max_steps=6, save_every=2, resume="latest")
    assert any("step_4" in r.getMessage() and "rng_rank0.pt is missing" in r.getMessage() for r in caplog.records)
    lines = [json.loads(x) for x in (killed / "log.jsonl").read_text().splitlines()]
    resumed = [x["step"] for x in lines if "step" in x and "event" not in x][6:]
    assert resumed == [3, 4, 5, 6]  # from step_2, not from the incomplete step_4
    want, got = student_weights(full_run), student_weights(killed)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    # The re-saved step_4 replaced the incomplete one and is complete.
    assert checkpoint.problem(killed / "checkpoints" / "step_4") is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "bad_manifest", "extra_missing"])
def test_resolve_skips_an_incomplete_checkpoint_with_a_warning(full_run, tmp_path, caplog, damage):
    run = interrupted_copy(full_run, tmp_path / "run", latest="step_6")
    folder = run / "checkpoints" / "step_6"
    shard = folder / "mp_rank_00_model_states.pt"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (folder / "manifest.json").unlink()
    elif damage == "bad_manifest":
        (folder / "manifest.json").write_text('{"format": "scaledkd-checkpoint/1", "files": ')
    else:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"]["rng_rank1.pt"] = {"size": 10, "sha256": "0" * 64}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="scaledkd"):
        root, tag = checkpoint.resolve(run, "latest")
    assert (root, tag) == (run / "checkpoints", "step_4")
    assert any(str(folder) in r.getMessage() for r in caplog.records)


def test_no_complete_checkpoint_is_a_clear_error(full_run, tmp_path):
    run = interrupted_copy(full_run, tmp_path / "run", latest="step_6")
    for tag in ("step_2", "step_4", "step_6"):
        (run / "checkpoints" / tag / "rng_rank0.pt").unlink()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in .*checkpoints.*step_6: rng_rank0.pt"):
        checkpoint.resolve(run, "latest")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpoint.resolve(tmp_path / "elsewhere", "latest")


def test_latest_missing_takes_the_newest_complete(full_run, tmp_path):
    # A kill after the rename but before `latest` was written.
    run = interrupted_copy(full_run, tmp_path / "run", latest="x")
    (run / "checkpoints" / "latest").unlink()
    assert checkpoint.resolve(run, "latest") == (run / "checkpoints", "step_6")
    assert checkpoint.resolve(run, "step_4") == (run / "checkpoints", "step_4")  # a bare tag of this run
    assert checkpoint.resolve(tmp_path, str(run)) == (run / "checkpoints", "step_6")  # a run folder


def test_resume_target_that_is_not_a_checkpoint_is_a_message(full_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{empty} is not a complete scaledkd checkpoint: no manifest.json")):
        checkpoint.resolve(tmp_path, str(empty))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    with pytest.raises(ValueError, match="is a file, not a checkpoint folder"):
        checkpoint.resolve(tmp_path, str(a_file))
    partial = tmp_path / "partial"
    shutil.copytree(full_run / "checkpoints" / "step_2", partial)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt is 10 bytes"):
        checkpoint.resolve(tmp_path, str(partial))


def test_a_kill_inside_a_save_leaves_latest_on_the_previous_checkpoint(engine, tmp_path, monkeypatch):
    run = tmp_path / "run"
    checkpoint.save(engine, run, 1, {"step": 1, "micro": 1, "best": None, "history": []})
    original = engine.save_checkpoint

    def killed_after_shards(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt("killed after the shards")

    monkeypatch.setattr(engine, "save_checkpoint", killed_after_shards)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(engine, run, 2, {"step": 2, "micro": 2, "best": None, "history": []})
    monkeypatch.undo()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_1"
    assert not (run / "checkpoints" / "step_2").exists()
    assert checkpoint.resolve(run, "latest") == (run / "checkpoints", "step_1")
    # The next save clears the leftover partial folder.
    checkpoint.save(engine, run, 2, {"step": 2, "micro": 2, "best": None, "history": []})
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step_1", "step_2"]


def test_load_restores_loop_state_and_rng(engine, tmp_path):
    run = tmp_path / "run"
    torch.manual_seed(123)
    state = {"step": 7, "micro": 14, "best": {"step": 7, "score": 0.5}, "history": [{"step": 7, "score": 0.5}]}
    checkpoint.save(engine, run, 7, state)
    want = torch.rand(3)
    torch.manual_seed(999)
    root, tag = checkpoint.resolve(run, "latest")
    assert checkpoint.load(engine, root, tag) == state
    assert torch.equal(torch.rand(3), want)


def test_retention_keeps_the_newest_complete_and_only_deletes_our_own(engine, tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    root.mkdir(parents=True)
    (root / "step_1").mkdir()  # not ours (no manifest): never deleted
    (root / "step_1" / "notes.txt").write_text("keep me")
    (root / "mine").mkdir()
    for step in (2, 3, 4, 5):
        checkpoint.save(engine, run, step, {"step": step, "micro": step, "best": None, "history": []}, keep=2)
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
        assert f"step_{step}" in names and "step_1" in names and "mine" in names
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["mine", "step_1", "step_4", "step_5"]
    assert (root / "step_1" / "notes.txt").read_text() == "keep me"
    assert checkpoint.resolve(run, "latest") == (root, "step_5")
    # A broken newer checkpoint is not counted: the complete one before it survives.
    (root / "step_5" / "rng_rank0.pt").unlink()
    checkpoint.save(engine, run, 6, {"step": 6, "micro": 6, "best": None, "history": []}, keep=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["mine", "step_1", "step_4", "step_5", "step_6"]
    checkpoint.save(engine, run, 7, {"step": 7, "micro": 7, "best": None, "history": []}, keep=1)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["mine", "step_1", "step_5", "step_7"]
    with pytest.raises(ValueError, match="keep must be at least 1"):
        checkpoint.save(engine, run, 8, {"step": 8}, keep=0)
