"""The run folder never loses data: ``overwrite=true`` replaces only a scaledkd run, puts the old run back when the
new one fails, and deletes only the run it replaced, after the new one finished; a resume whose config would change
the trajectory is refused before anything is written, and an allowed change is recorded."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from scaledkd import cli
from tests.tiny import REPO, tiny_recipe, write_recipe


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.fixture
def assets(tiny_assets):
    return tiny_assets


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _distill(tmp_path: Path, assets, *overrides: str) -> int:
    recipe = write_recipe(tmp_path / "r.yaml", **tiny_recipe(tmp_path, *assets, train__max_steps=2))
    return cli.main(["distill", str(recipe), *overrides])


def test_overwrite_refuses_a_folder_that_holds_no_run(assets, tmp_path, capsys):
    mine = tmp_path / "run"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert _distill(tmp_path, assets, "overwrite=true") == 2
    assert "holds no scaledkd run" in capsys.readouterr().err
    assert _tree(mine) == {"thesis.tex": hashlib.sha256(b"years of work").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "run"]


def test_a_failed_overwrite_puts_the_old_run_back(assets, tmp_path, capsys, monkeypatch):
    from scaledkd.engine import run as run_mod

    assert _distill(tmp_path, assets) == 0
    before = _tree(tmp_path / "run")

    def broken(run):
        raise RuntimeError("the node died")

    monkeypatch.setattr(run_mod, "train", broken)
    with pytest.raises(RuntimeError, match="the node died"):
        _distill(tmp_path, assets, "overwrite=true")
    assert _tree(tmp_path / "run") == before  # the finished run is back, byte for byte
    failed = [p.name for p in tmp_path.iterdir() if ".failed-" in p.name]
    assert len(failed) == 1  # the failed attempt is kept beside it, nothing is deleted
    assert not [p for p in tmp_path.iterdir() if ".replaced-" in p.name]


def test_a_successful_overwrite_deletes_only_the_run_it_replaced(assets, tmp_path, capsys):
    assert _distill(tmp_path, assets) == 0
    stale = tmp_path / "run.replaced-20200101-000000"  # left by some earlier, interrupted overwrite
    stale.mkdir()
    (stale / "keep.txt").write_text("not ours to delete")
    assert _distill(tmp_path, assets, "overwrite=true") == 0
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert (stale / "keep.txt").read_text() == "not ours to delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "run", stale.name]


def test_a_resume_that_changes_the_trajectory_is_refused_before_anything_is_written(assets, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, *assets, train__max_steps=4, train__save_every=2, train__save_every_min=0)
    path = write_recipe(tmp_path / "r.yaml", **recipe)
    assert cli.main(["distill", str(path), "train.max_steps=2"]) == 0  # stands in for a run stopped at step 2
    (tmp_path / "run" / "metrics.json").unlink()
    before = _tree(tmp_path / "run")
    assert cli.main(["distill", str(path), "train.resume=latest", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.001 -> 0.5" in err and "train.max_steps: 2 -> 4" in err and "resume_allow_changes" in err
    assert _tree(tmp_path / "run") == before

    assert cli.main(["distill", str(path), "train.resume=latest", "train.resume_allow_changes=[train.max_steps]"]) == 0
    history = yaml.safe_load((tmp_path / "run" / "config_history.yaml").read_text())
    assert history[-1]["changed"]["train.max_steps"] == {"was": 2, "now": 4}
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["max_steps"] == 4


def _resolved(tmp_path: Path, **overrides) -> dict:
    from scaledkd.config import config_from_dict

    return config_from_dict(tiny_recipe(tmp_path, tmp_path / "teacher", tmp_path / "glue", **overrides)).to_dict()


def test_eval_every_is_a_trajectory_key_only_when_early_stopping_is_on(tmp_path):
    from scaledkd.resume import config_changes

    early = {"holdout": 0.1, "patience": 2}
    # Without early stopping, eval_every only decides when the dev set is scored: a free change.
    assert config_changes(_resolved(tmp_path, train__eval_every=4), _resolved(tmp_path, train__eval_every=8)) == {}
    # With it, patience counts evaluations, so eval_every decides the stop step: refused in either direction of
    # turning it on or off, and when it stays on.
    on4 = _resolved(tmp_path, train__eval_every=4, train__early_stopping=early)
    on8 = _resolved(tmp_path, train__eval_every=8, train__early_stopping=early)
    assert config_changes(on4, on8) == {"train.eval_every": (4, 8)}
    assert config_changes(on4, _resolved(tmp_path, train__eval_every=8))["train.eval_every"] == (4, 8)
    assert config_changes(_resolved(tmp_path, train__eval_every=4), on8)["train.eval_every"] == (4, 8)
    assert config_changes(on4, on4) == {}
