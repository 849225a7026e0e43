"""Pre-emption: SIGTERM/SIGUSR1 make a run finish its optimiser step, write a checkpoint and leave with exit 75;
running the same command again (``train.resume=auto``, the launchers' default) continues it, and the result is
bit-identical to a run that was never interrupted. The SLURM path is simulated end to end with the sbatch script's
by-hand mode, a SIGUSR1 to the batch shell and a stand-in ``scontrol`` that records the requeue.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaledkd.errors import PREEMPTED_EXIT
from tests.tiny import REPO, free_port, make_sst2, make_tiny_bert, tiny_recipe, write_recipe

pytestmark = pytest.mark.faults
STEPS = 60


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return make_tiny_bert(root / "teacher"), make_sst2(root / "glue")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                          "MASTER_ADDR", "LOCAL_WORLD_SIZE")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHON=sys.executable, **extra)
    return env


def _recipe(tmp_path: Path, assets, name: str) -> Path:
    teacher, data_dir = assets
    recipe = tiny_recipe(tmp_path / name, teacher, data_dir, train__max_steps=STEPS, train__save_every=0,
                         train__save_every_min=0, train__log_every=1)
    recipe["output_dir"] = str(tmp_path / name / "run")
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    return write_recipe(tmp_path / name / "recipe.yaml", **recipe)


def _steps_logged(log: Path) -> int:
    if not log.is_file():
        return 0
    steps = [json.loads(line).get("step") or 0 for line in log.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _signal_after(proc: subprocess.Popen, log: Path, sig: int, at_step: int = 3, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _steps_logged(log) < at_step:
        assert proc.poll() is None, "the run ended before it could be signalled"
        assert time.monotonic() < deadline, "the run did not reach the step to signal at"
        time.sleep(0.02)
    proc.send_signal(sig)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "student" / "model.safetensors")


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("whole")
    recipe = _recipe(tmp, assets, "whole")
    result = subprocess.run([sys.executable, "-m", "scaledkd.cli", "distill", str(recipe), "train.progress=false"],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return _weights(tmp / "whole" / "run")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_checkpoints_exits_75_and_the_same_command_continues_bit_identically(
        sig, assets, tmp_path, uninterrupted):
    recipe = _recipe(tmp_path, assets, "stopped")
    run = tmp_path / "stopped" / "run"
    cmd = [sys.executable, "-m", "scaledkd.cli", "distill", "train.resume=auto", str(recipe), "train.progress=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _signal_after(proc, run / "log.jsonl", sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    assert "train.resume=auto" in err and "Traceback" not in err
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    stopped = [e for e in events if e.get("event") == "stopped"]
    assert stopped and stopped[0]["signal"] == signal.Signals(sig).name and stopped[0]["step"] < STEPS
    assert (run / "checkpoints" / f"step_{stopped[0]['step']}" / "manifest.json").is_file()
    assert not (run / "metrics.json").exists()

    again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
               if '"resumed"' in line]
    assert resumed and resumed[0]["step"] == stopped[0]["step"]
    _assert_identical(_weights(run), uninterrupted)


def test_slurm_preemption_by_hand_requeues_and_resumes(assets, tmp_path, uninterrupted):
    """single_node.sbatch by hand (SLURM variables set, torchrun with one CPU process): SIGUSR1 to the batch shell
    (what ``--signal=B:USR1@300`` sends) reaches the worker, which checkpoints; the script asks ``scontrol requeue``
    and exits 75; the requeued job (the same command) resumes and ends where an uninterrupted run ends."""
    recipe = _recipe(tmp_path, assets, "slurm")
    run = tmp_path / "slurm" / "run"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/bash\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1",
               SLURM_NODEID="0", SCALEDKD_HOSTNAMES="127.0.0.1", GPUS_PER_NODE="1", MASTER_PORT=str(free_port()))
    cmd = ["bash", str(REPO / "launch" / "slurm" / "single_node.sbatch"), str(recipe), "train.progress=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _signal_after(proc, run / "log.jsonl", signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert any(json.loads(line).get("event") == "stopped" for line in (run / "log.jsonl").read_text().splitlines())

    env["MASTER_PORT"] = str(free_port())
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]  # no second requeue
    _assert_identical(_weights(run), uninterrupted)


@pytest.mark.parametrize("script,extra", [("torchrun.sh", {"NPROC_PER_NODE": "1"}),
                                          ("deepspeed.sh", {"NUM_GPUS": "1"})], ids=["torchrun.sh", "deepspeed.sh"])
def test_launcher_scripts_pass_a_stop_to_the_workers(script, extra, assets, tmp_path, uninterrupted):
    """SIGTERM to launch/torchrun.sh or launch/deepspeed.sh reaches the workers (the leaves of its process tree), not
    the launcher in between, so they checkpoint; the script exits 75 and the same command ends bit-identically."""
    recipe = _recipe(tmp_path, assets, "launcher")
    run = tmp_path / "launcher" / "run"
    env = _env(MASTER_PORT=str(free_port()), **extra)
    cmd = ["bash", str(REPO / "launch" / script), str(recipe), "train.progress=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _signal_after(proc, run / "log.jsonl", signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    assert any(json.loads(line).get("event") == "stopped" for line in (run / "log.jsonl").read_text().splitlines())
    env["MASTER_PORT"] = str(free_port())
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_identical(_weights(run), uninterrupted)
