"""The Accelerate backend: two DeepSpeed plugins ("student", "teacher") from the recipe's two ds_configs.

The end-to-end case starts `accelerate launch --config_file launch/accelerate/cpu_test.yaml -m scaledkd.cli distill`
(2 gloo processes, teacher ZeRO-3 + student ZeRO-2) and holds it to the same standard as tests/test_multiproc.py:
with per-example losses and dropout off, 2 ranks x micro-batch 4 must log the losses of 1 process x micro-batch 8.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from scaledkd.config import ConfigError, TrainConfig
from scaledkd.engine import accel
from tests.test_multiproc import (  # noqa: F401 - assets and reference are the shared fixtures
    TIMEOUT, _env, assert_same_losses, assets, launch, make_recipe, reference, step_losses,
)
from tests.tiny import REPO

CPU_YAML = REPO / "launch" / "accelerate" / "cpu_test.yaml"


# ------------------------------------------------------------------------------------------- backend choice


@pytest.mark.parametrize(("backend", "flag", "want"), [
    ("auto", None, "deepspeed"), ("auto", "true", "accelerate"), ("auto", "false", "deepspeed"),
    ("deepspeed", "true", "deepspeed"), ("accelerate", None, "accelerate"),
])
def test_backend_resolution(monkeypatch, backend, flag, want):
    monkeypatch.delenv(accel.LAUNCH_FLAG, raising=False)
    if flag is not None:
        monkeypatch.setenv(accel.LAUNCH_FLAG, flag)
    assert accel.resolve_backend(backend) == want


def test_bad_backend_names_the_choices():
    with pytest.raises(ConfigError, match=r"train.backend='horovod'.*'auto', 'deepspeed', 'accelerate'"):
        TrainConfig(backend="horovod")


@pytest.mark.parametrize(("environ", "message"), [
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, r"zero_stage='3'.*student.ds_config"),
    ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, r"config_file='ds.json'"),
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, r"train.grad_accum"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, r"mixed_precision='bf16'.*train.precision='fp32'"),
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, r"mixed_precision='fp8'"),
])
def test_launcher_deepspeed_settings_are_refused(environ, message):
    with pytest.raises(ConfigError, match=message):
        accel.check_launcher_settings(TrainConfig(), environ)


def test_launcher_settings_that_agree_with_the_recipe_pass():
    accel.check_launcher_settings(TrainConfig(), {"ACCELERATE_MIXED_PRECISION": "no",
                                                  "ACCELERATE_CONFIG_DS_FIELDS": "deepspeed_multinode_launcher"})
    accel.check_launcher_settings(TrainConfig(precision="bf16"), {"ACCELERATE_MIXED_PRECISION": "bf16"})
    accel.check_launcher_settings(TrainConfig(precision="bf16"), {"ACCELERATE_MIXED_PRECISION": "no"})


# ------------------------------------------------------------------------------------------- real runs


def accelerate_launch(*args: str) -> str:
    env = {k: v for k, v in _env().items() if not k.startswith("ACCELERATE_")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_YAML),
           "-m", "scaledkd.cli", "distill", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.multiproc
def test_accelerate_launch_two_plugins_match_one_process(assets, tmp_path, reference):
    """Teacher ZeRO-3 + student ZeRO-2 through Accelerate's plugins on 2 processes (~50 s plus the reference)."""
    from transformers import AutoModelForSequenceClassification

    recipe = make_recipe(tmp_path, assets, "acc", "ds_configs/zero2.json", "ds_configs/teacher_zero3.json", 4)
    out = accelerate_launch(str(recipe))
    assert "DeepSpeed engines built by accelerate" in out  # the Accelerate path ran, not the direct one
    run_dir = tmp_path / "acc"
    assert_same_losses(step_losses(run_dir), reference)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["size"]["teacher_params"] > metrics["size"]["student_params"] > 0  # counted, not shard sizes
    assert step_losses(run_dir)[1]["lr"] < step_losses(run_dir)[0]["lr"]  # the torch scheduler steps with the engine

    student = AutoModelForSequenceClassification.from_pretrained(run_dir / "student").eval()
    assert student.config.num_hidden_layers == 2
    with torch.no_grad():
        logits = student(input_ids=torch.randint(1000, 2000, (2, 9))).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.multiproc
def test_backend_accelerate_forced_under_torchrun(assets, tmp_path, reference):
    """train.backend=accelerate without accelerate launch: both models ZeRO-3 through the plugins (~50 s)."""
    recipe = make_recipe(tmp_path, assets, "forced", "ds_configs/zero3.json", "ds_configs/teacher_zero3.json", 4,
                         backend="accelerate")
    proc = launch(recipe)
    assert "DeepSpeed engines built by accelerate" in proc.stdout + proc.stderr
    assert_same_losses(step_losses(tmp_path / "forced"), reference)
    assert (tmp_path / "forced" / "student" / "model.safetensors").is_file()
