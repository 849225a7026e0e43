"""Multi-node launch, trained for real: two one-process "nodes" on loopback distil a tiny BERT through
``launch/slurm/multi_node.sbatch`` (by-hand mode) through Accelerate's multi-node YAML and through a DeepSpeed
hostfile (each host starting its own launcher, no ssh); every loss of every step equals a single-node 2-rank ``torchrun.sh`` run's.
(Same world size, same seed and data order: the runs must agree exactly.)"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.test_launch import LAUNCH, launch_env, run_together
from tests.tiny import free_port, tiny_recipe, write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
TIMEOUT_S = 300


def _recipe(tmp_path: Path, assets, name: str) -> Path:
    recipe = tiny_recipe(tmp_path / name, *assets, train__max_steps=3, train__log_every=1)
    recipe["output_dir"] = str(tmp_path / name / "run")
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    return write_recipe(tmp_path / name / "recipe.yaml", **recipe)


def _losses(recipe: Path) -> list[dict]:
    log = recipe.parent / "run" / "log.jsonl"
    keep = ("step", "loss", "task", "logit_kd", "hidden_mse", "attn_kl")
    return [{k: r[k] for k in keep} for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def single_node(tiny_assets, tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("single")
    recipe = _recipe(tmp, tiny_assets, "single")
    env = launch_env(NPROC_PER_NODE="2", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run_together([(["bash", str(LAUNCH / "torchrun.sh"), str(recipe)], env)], tmp / "logs", timeout=TIMEOUT_S)
    losses = _losses(recipe)
    assert [r["step"] for r in losses] == [1, 2, 3]
    return losses


def test_multi_node_sbatch_by_hand_trains_like_one_node(tiny_assets, tmp_path, single_node):
    recipe = _recipe(tmp_path, tiny_assets, "sbatch")
    port = str(free_port())
    jobs = [(["bash", str(LAUNCH / "slurm/multi_node.sbatch"), str(recipe)],
             launch_env(SLURM_NODEID=node, SLURM_JOB_NUM_NODES="2", SCALEDKD_HOSTNAMES="127.0.0.1 127.0.0.1",
                        GPUS_PER_NODE="1", MASTER_PORT=port, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
            for node in ("0", "1")]
    run_together(jobs, tmp_path / "logs", timeout=TIMEOUT_S)
    assert _losses(recipe) == single_node


def test_accelerate_multi_node_yaml_trains_like_one_node(tiny_assets, tmp_path, single_node):
    recipe = _recipe(tmp_path, tiny_assets, "accelerate")
    port = str(free_port())
    jobs = [([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(LAUNCH / "accelerate/multi_node.yaml"), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
              "--main_process_port", port, "--machine_rank", rank, "-m", "scaledkd.cli", "distill", str(recipe)],
             launch_env(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu"))
            for rank in ("0", "1")]
    run_together(jobs, tmp_path / "logs", timeout=TIMEOUT_S)
    assert _losses(recipe) == single_node


def test_deepspeed_hostfile_without_ssh_trains_like_one_node(tiny_assets, tmp_path, single_node):
    """A two-host hostfile, each "host" starting deepspeed.sh itself with its NODE_RANK (DeepSpeed's --no_ssh)."""
    recipe = _recipe(tmp_path, tiny_assets, "hostfile")
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(free_port())
    jobs = [(["bash", str(LAUNCH / "deepspeed.sh"), str(recipe)],
             launch_env(HOSTFILE=str(hostfile), NODE_RANK=node, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu"))
            for node in ("0", "1")]
    run_together(jobs, tmp_path / "logs", timeout=TIMEOUT_S)
    assert _losses(recipe) == single_node
