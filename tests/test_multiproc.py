"""Two gloo ranks under torchrun: independent teacher/student sharding, resume, consolidated export.

A 2-rank run with micro-batch 4 sees exactly the examples of a 1-rank run with micro-batch 8 (rank r takes
every other example of the same seeded order) and DeepSpeed averages the ranks' gradients, so with per-example
losses (task CE, logit KD, [CLS] MSE) and dropout off the two runs must log the same losses step by step.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny import REPO, free_port, make_sst2, make_tiny_bert, tiny_recipe, write_recipe

pytestmark = pytest.mark.multiproc
TIMEOUT = 240
LOSSES = [{"name": "task", "weight": 0.5}, {"name": "logit_kd", "weight": 0.5}, {"name": "pkd_cls"}]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    return make_tiny_bert(root / "teacher"), make_sst2(root / "glue")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return env


def launch(recipe: Path, *overrides: str, nproc: int = 2, module: str = "scaledkd.cli") -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", module]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", module]
    args = ["distill", str(recipe), *overrides] if module == "scaledkd.cli" else [str(recipe), *overrides]
    proc = subprocess.run(cmd + args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def step_losses(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [x for x in lines if "step" in x and "event" not in x]


def make_recipe(tmp: Path, assets, name: str, student_ds: str, teacher_ds: str, batch: int, **extra) -> Path:
    teacher, data_dir = assets
    recipe = tiny_recipe(tmp / name, teacher, data_dir, losses=LOSSES)
    recipe["output_dir"] = str(tmp / name)
    recipe["student"]["ds_config"] = student_ds
    recipe["teacher"]["ds_config"] = teacher_ds
    recipe["train"].update(batch_size=batch, max_steps=4, **extra)
    return write_recipe(tmp / f"{name}.yaml", **recipe)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    launch(make_recipe(tmp, assets, "single", "ds_configs/zero0.json", "ds_configs/teacher_replicated.json", 8),
           nproc=1)
    return step_losses(tmp / "single")


def assert_same_losses(got: list[dict], want: list[dict], steps: int = 4) -> None:
    assert len(got) >= steps and len(want) >= steps
    for g, w in zip(got[:steps], want[:steps]):
        for key in ("loss", "task", "logit_kd", "pkd_cls"):
            assert g[key] == pytest.approx(w[key], rel=2e-4, abs=1e-7), (g["step"], key, g[key], w[key])


@pytest.mark.parametrize(
    ("student_ds", "teacher_ds"),
    [
        ("ds_configs/zero2.json", "ds_configs/teacher_zero3.json"),
        ("ds_configs/zero3.json", "ds_configs/teacher_zero3.json"),
        ("ds_configs/zero3.json", "ds_configs/teacher_replicated.json"),
    ],
    ids=["student-z2_teacher-z3", "student-z3_teacher-z3", "student-z3_teacher-replicated"],
)
def test_two_ranks_match_one_process(assets, tmp_path, reference, student_ds, teacher_ds):
    launch(make_recipe(tmp_path, assets, "two", student_ds, teacher_ds, 4))
    assert_same_losses(step_losses(tmp_path / "two"), reference)
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["size"]["teacher_params"] > metrics["size"]["student_params"] > 0  # counted, not shard sizes


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_gives_identical_losses_and_exports_on_one_process(assets, tmp_path, stage):
    from transformers import AutoModelForSequenceClassification

    recipe = make_recipe(tmp_path, assets, "full", f"ds_configs/zero{stage}.json", "ds_configs/teacher_zero3.json",
                         4, save_every=2)
    launch(recipe)
    full = step_losses(tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoints" / "step_2"
    assert ckpt.is_dir()
    launch(recipe, f"output_dir={tmp_path / 'resumed'}", f"train.resume={ckpt}")
    resumed = step_losses(tmp_path / "resumed")
    assert [x["step"] for x in resumed] == [3, 4]
    for r, f in zip(resumed, full[2:]):
        for key in ("loss", "task", "logit_kd", "pkd_cls"):
            assert r[key] == pytest.approx(f[key], rel=1e-5, abs=1e-8), (r["step"], key)

    # A checkpoint written by 2 ranks, consolidated on one process without the original world size.
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "scaledkd.cli", "export", str(tmp_path / "full"), str(out)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = AutoModelForSequenceClassification.from_pretrained(out).eval()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full" / "student").eval()
    ids = torch.randint(1000, 2000, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=1e-6, atol=1e-6)
    assert not [k for k in a.state_dict() if "proj" in k]


def test_zero3_taps_equal_unsharded(assets, tmp_path):
    teacher, _ = assets
    out = tmp_path / "taps.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__).parent / "workers" / "zero3_taps.py"), str(teacher), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["partitioned"], "the teacher was not partitioned: the test would prove nothing"
    assert report["captures"] >= 6
    assert report["max_abs_diff"] < 1e-5
