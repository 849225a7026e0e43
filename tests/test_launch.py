"""The launchers in launch/: shell syntax and lint, the SLURM rank/address logic with fake SLURM variables, dry runs,
and real multi-process starts on loopback (gloo) with a small all-reduce probe in place of the training entry
(``SCALEDKD_ENTRY``). The GPU paths are the same commands with other counts; nothing here needs a GPU or SLURM.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny import REPO, free_port

LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.rglob("*") if p.suffix in (".sh", ".sbatch"))
TIMEOUT_S = 60

# Every process: join the gloo group the launcher describes, all-reduce its rank, print what it sees.
PROBE = """\
import datetime, os, sys
import torch
import torch.distributed as dist

if os.environ.get("SCALEDKD_SRUN_RANKS"):
    from scaledkd.engine.dist import prepare_environment

    prepare_environment()  # the engine's own SLURM_PROCID -> RANK mapping
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=45))
total = torch.tensor([float(dist.get_rank())])
dist.all_reduce(total)
args = " ".join(a for a in sys.argv[1:] if not a.startswith("--local_rank"))
line = f"PROBE RANK={dist.get_rank()} WORLD_SIZE={dist.get_world_size()} SUM={int(total.item())} ARGS={args}\\n"
os.write(1, line.encode())  # one write: the ranks share stdout, and `python -u` would split print() in two
dist.destroy_process_group()
"""


def launch_env(**extra: str) -> dict[str, str]:
    """This environment without anything a launcher or SLURM would read, plus ``extra``.

    The venv's bin comes first on PATH and PYTHON is this interpreter, so every launcher runs the scaledkd under test.
    """
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC_PER_NODE",
            "GPUS_PER_NODE", "NUM_GPUS", "HOSTFILE", "SEED_BASE", "DRY_RUN", "OMP_NUM_THREADS"}
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("SLURM_", "SCALEDKD_", "TORCHELASTIC_", "PMI_", "OMPI_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_together(jobs: list[tuple[list[str], dict[str, str]]], logs: Path, timeout: float = TIMEOUT_S) -> list[str]:
    """Start every job at once (each in its own process group), wait up to ``timeout`` s for all, return their outputs.

    On a timeout or a failure every group is killed, so no launcher or worker outlives the test.
    """
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    try:
        for i, (cmd, env) in enumerate(jobs):
            out = open(logs / f"job{i}.log", "w+")
            files.append(out)
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    outputs = []
    for f in files:
        f.seek(0)
        outputs.append(f.read())
        f.close()
    for code, text in zip(codes, outputs):
        assert code == 0, text[-4000:]
    return outputs


def probe_lines(text: str) -> list[str]:
    return [line[len("PROBE "):] for line in text.splitlines() if line.startswith("PROBE ")]


@pytest.fixture
def probe(tmp_path) -> Path:
    path = tmp_path / "launch_probe.py"
    path.write_text(PROBE)
    return path


# ------------------------------------------------------------------------------------------------ syntax and lint


def test_every_launcher_is_there():
    names = {p.relative_to(LAUNCH).as_posix() for p in SCRIPTS}
    assert {"torchrun.sh", "deepspeed.sh", "common.sh", "slurm/env.sh", "slurm/node.sh", "slurm/single_node.sbatch",
            "slurm/multi_node.sbatch", "slurm/multi_node_srun.sbatch", "slurm/seed_sweep.sbatch"} <= names
    for name in ("hostfile.example", "README.md", "accelerate/single_node_multi_gpu.yaml",
                 "accelerate/multi_node.yaml", "accelerate/cpu_test.yaml"):
        assert (LAUNCH / name).is_file(), name


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(LAUNCH).as_posix())
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_passes():
    if shutil.which("shellcheck") is None:
        if os.environ.get("SCALEDKD_REQUIRE_SHELLCHECK"):  # set by .ci/run, which installs it
            pytest.fail("shellcheck is required here (SCALEDKD_REQUIRE_SHELLCHECK is set) but not installed")
        pytest.skip("shellcheck is not installed (Debian/Ubuntu: apt-get install shellcheck)")
    # -x follows the sourced helpers (common.sh, slurm/env.sh), so their functions and variables are checked in use.
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# -------------------------------------------------------------------------------------------- SLURM variables


SHOW = "for v in MASTER_ADDR MASTER_PORT NNODES NODE_RANK NPROC_PER_NODE OMP_NUM_THREADS; do echo \"$v=${!v:-}\"; done"


def slurm_env(**variables: str) -> tuple[int, dict[str, str], str]:
    """Source env.sh, call scaledkd_slurm_env with ``variables`` set, return (status, the exported values, stderr)."""
    script = f"source launch/slurm/env.sh && scaledkd_slurm_env && {SHOW}"
    result = run(["bash", "-c", script], launch_env(**variables))
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return result.returncode, values, result.stderr


def test_slurm_env_from_slurm_variables():
    job = dict(SLURM_JOB_NODELIST="node[1-2]", SCALEDKD_HOSTNAMES="node1 node2", SLURM_NODEID="1",
               SLURM_JOB_ID="12345", SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="64")
    code, got, err = slurm_env(**job)
    assert code == 0, err
    assert got == {"MASTER_ADDR": "node1", "MASTER_PORT": str(15000 + 12345 % 20000), "NNODES": "2", "NODE_RANK": "1",
                   "NPROC_PER_NODE": "4", "OMP_NUM_THREADS": "16"}
    # Deterministic: every node of the job derives the same port; another job gets another one.
    assert slurm_env(**{**job, "SLURM_NODEID": "0"})[1]["MASTER_PORT"] == got["MASTER_PORT"]
    assert slurm_env(**{**job, "SLURM_JOB_ID": "12346"})[1]["MASTER_PORT"] == str(15000 + 12346 % 20000)


def test_slurm_env_asks_scontrol_for_the_hosts(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/bash\necho "$*" > "$(dirname "$0")/args"\nprintf "gpu-a17\\ngpu-a18\\ngpu-a19\\n"\n')
    scontrol.chmod(0o755)
    script = f"source launch/slurm/env.sh && scaledkd_slurm_env && {SHOW}"
    env = launch_env(SLURM_JOB_NODELIST="gpu-a[17-19]", SLURM_NODEID="2", SLURM_JOB_ID="7", GPUS_PER_NODE="8")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    result = run(["bash", "-c", script], env)
    assert result.returncode == 0, result.stderr
    assert (bin_dir / "args").read_text().split() == ["show", "hostnames", "gpu-a[17-19]"]
    got = dict(line.split("=", 1) for line in result.stdout.splitlines())
    # No SLURM_JOB_NUM_NODES: the node count is the number of hosts; GPUS_PER_NODE stands in for SLURM_GPUS_ON_NODE.
    assert (got["MASTER_ADDR"], got["NNODES"], got["NODE_RANK"], got["NPROC_PER_NODE"], got["MASTER_PORT"]) == \
        ("gpu-a17", "3", "2", "8", "15007")


def test_slurm_env_keeps_values_set_beforehand():
    # With the address and node count given, scontrol (absent here) is never needed.
    code, got, err = slurm_env(SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1",
                               SLURM_JOB_ID="12345", SLURM_GPUS_ON_NODE="4", MASTER_ADDR="10.0.0.5",
                               MASTER_PORT="23456", NPROC_PER_NODE="2", OMP_NUM_THREADS="3")
    assert code == 0, err
    assert got == {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "23456", "NNODES": "2", "NODE_RANK": "1",
                   "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "3"}


def test_slurm_env_outside_a_job_is_one_local_node():
    code, got, err = slurm_env(GPUS_PER_NODE="2")
    assert code == 0, err
    assert got == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "NNODES": "1", "NODE_RANK": "0",
                   "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": ""}


@pytest.mark.parametrize("bad,message", [
    ({"SLURM_NODEID": "2"}, "NODE_RANK=2 must be below NNODES=2"),
    ({"SLURM_GPUS_ON_NODE": "gpu:4"}, "NPROC_PER_NODE=gpu:4 is not a whole number"),
])
def test_slurm_env_rejects_inconsistent_values(bad, message):
    code, _, err = slurm_env(**{"SCALEDKD_HOSTNAMES": "node1 node2", "SLURM_GPUS_ON_NODE": "4", **bad})
    assert code != 0
    assert message in err


# ---------------------------------------------------------------------------------------------------- dry runs


def dry_run(script: str, *args: str, **variables: str) -> list[list[str]]:
    result = run(["bash", str(LAUNCH / script), *args], launch_env(DRY_RUN="1", **variables))
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def test_torchrun_dry_run_is_the_documented_command():
    [cmd] = dry_run("torchrun.sh", "recipes/r.yaml", "train.max_steps=5", NNODES="2", NODE_RANK="1",
                    MASTER_ADDR="node-a", MASTER_PORT="29555", NPROC_PER_NODE="8")
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "1",
                   "--nproc_per_node", "8", "--master_addr", "node-a", "--master_port", "29555",
                   "-m", "scaledkd.cli", "distill", "train.resume=auto", "recipes/r.yaml", "train.max_steps=5"]


def test_deepspeed_dry_run_uses_the_hostfile_and_the_module_entry():
    [cmd] = dry_run("deepspeed.sh", "recipes/r.yaml", "train.lr=1e-4", HOSTFILE="launch/hostfile.example",
                    NNODES="2", NUM_GPUS="8")
    assert cmd == [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", "launch/hostfile.example",
                   "--num_nodes", "2", "--num_gpus", "8", "--master_port", "29500",
                   "--module", "scaledkd.cli", "distill", "train.resume=auto", "recipes/r.yaml", "train.lr=1e-4"]
    # One machine: no hostfile flag, a free port.
    [cmd] = dry_run("deepspeed.sh", "recipes/r.yaml")
    assert "--hostfile" not in cmd and int(cmd[cmd.index("--master_port") + 1]) > 0


def test_hostfile_example_parses_as_deepspeed_reads_it():
    from deepspeed.launcher.runner import fetch_hostfile

    assert dict(fetch_hostfile(str(LAUNCH / "hostfile.example"))) == {"node-001": 8, "node-002": 8}


def test_single_node_sbatch_dry_run_takes_gpus_and_port_from_slurm():
    [cmd] = dry_run("slurm/single_node.sbatch", "recipes/r.yaml", SLURM_JOB_ID="777", SLURM_JOB_NUM_NODES="1",
                    SLURM_NODEID="0", SCALEDKD_HOSTNAMES="gpu-1", SLURM_GPUS_ON_NODE="8")
    assert cmd[cmd.index("--nproc_per_node") + 1] == "8"
    assert cmd[cmd.index("--master_port") + 1] == "15777"
    assert cmd[cmd.index("--master_addr") + 1] == "gpu-1"
    assert cmd[-5:] == ["-m", "scaledkd.cli", "distill", "train.resume=auto", "recipes/r.yaml"]


def test_multi_node_sbatch_dry_run_in_a_job_uses_one_srun_task_per_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/bash\nexit 99\n")  # present, never run in a dry run
    (bin_dir / "srun").chmod(0o755)
    variables = dict(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="4", SLURM_NODEID="0", SLURM_CPUS_ON_NODE="96",
                     SCALEDKD_HOSTNAMES="n1 n2 n3 n4", SLURM_GPUS_ON_NODE="8")
    env = launch_env(DRY_RUN="1", **variables)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    result = run(["bash", str(LAUNCH / "slurm/multi_node.sbatch"), "recipes/r.yaml"], env)
    assert result.returncode == 0, result.stderr
    srun, torchrun = [shlex.split(line) for line in result.stdout.splitlines()]
    assert srun[:6] == ["srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--cpus-per-task=96",
                        "--kill-on-bad-exit=1"]
    assert srun[-3:] == ["bash", str(LAUNCH / "slurm/node.sh"), "recipes/r.yaml"]
    assert torchrun[torchrun.index("--nnodes") + 1] == "4"
    assert torchrun[torchrun.index("--master_addr") + 1] == "n1"
    assert torchrun[torchrun.index("--master_port") + 1] == str(15000 + 4242)
    # SCALEDKD_NO_SRUN=1: this node's share only, even inside a job.
    env["SCALEDKD_NO_SRUN"] = "1"
    result = run(["bash", str(LAUNCH / "slurm/multi_node.sbatch"), "recipes/r.yaml"], env)
    assert [line.split()[1:3] for line in result.stdout.splitlines()] == [["-m", "torch.distributed.run"]]


def test_seed_sweep_dry_run_sets_the_seed_and_suffixes_output_dir(tmp_path):
    base = tmp_path / "sweep"
    [cmd] = dry_run("slurm/seed_sweep.sbatch", f"output_dir={base}", "train.seed=1", SLURM_ARRAY_TASK_ID="2",
                    SLURM_JOB_ID="900", GPUS_PER_NODE="1")
    assert cmd[-2:] == ["train.seed=44", f"output_dir={base}_seed44"]  # last, so they win over earlier overrides
    # Without an output_dir override: the recipe's own (here the embedded default recipe's), suffixed.
    [cmd] = dry_run("slurm/seed_sweep.sbatch", SLURM_ARRAY_TASK_ID="0", SEED_BASE="7", GPUS_PER_NODE="1")
    assert cmd[-2:] == ["train.seed=7", "output_dir=runs/default_seed7"]


def test_seed_sweep_fails_clearly_outside_an_array_or_on_a_bad_recipe():
    result = run(["bash", str(LAUNCH / "slurm/seed_sweep.sbatch")], launch_env(DRY_RUN="1"))
    assert result.returncode != 0 and "SLURM_ARRAY_TASK_ID" in result.stderr
    result = run(["bash", str(LAUNCH / "slurm/seed_sweep.sbatch"), "no/such.yaml"],
                 launch_env(DRY_RUN="1", SLURM_ARRAY_TASK_ID="0"))
    assert result.returncode != 0 and "no/such.yaml" in result.stderr and "does not exist" in result.stderr


# ------------------------------------------------------------------------------------------- accelerate configs


@pytest.mark.parametrize("name,machines,processes", [("single_node_multi_gpu", 1, 8), ("multi_node", 2, 16),
                                                     ("cpu_test", 1, 2)])
def test_accelerate_configs_load(name, machines, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    path = LAUNCH / "accelerate" / f"{name}.yaml"
    yaml.safe_load(path.read_text())
    config = load_config_from_file(str(path))
    assert (config.num_machines, config.num_processes) == (machines, processes)
    assert config.mixed_precision == "no"  # precision is the recipe's train.precision
    if machines > 1:
        assert config.main_process_ip and config.main_process_port


# ------------------------------------------------------------------------------------- real starts on loopback


@pytest.mark.multiproc
def test_multi_node_sbatch_runs_two_nodes_on_loopback(probe, tmp_path):
    """multi_node.sbatch run by hand twice (no srun): two one-process "nodes" form one gloo world of 2."""
    port = str(free_port())
    jobs = []
    for node in ("0", "1"):
        env = launch_env(SLURM_NODEID=node, SLURM_JOB_NUM_NODES="2", SCALEDKD_HOSTNAMES="127.0.0.1 127.0.0.1",
                         GPUS_PER_NODE="1", MASTER_PORT=port, SCALEDKD_ENTRY=str(probe), OMP_NUM_THREADS="1")
        jobs.append((["bash", str(LAUNCH / "slurm/multi_node.sbatch"), "recipes/r.yaml", "train.seed=3"], env))
    outputs = run_together(jobs, tmp_path / "logs")
    for node, text in enumerate(outputs):
        assert probe_lines(text) == [f"RANK={node} WORLD_SIZE=2 SUM=1 ARGS=recipes/r.yaml train.seed=3"], text[-3000:]
        assert f"--nnodes 2 --node_rank {node} --nproc_per_node 1" in text  # the logged command


@pytest.mark.multiproc
def test_srun_sbatch_ranks_come_from_slurm_variables(probe, tmp_path):
    """multi_node_srun.sbatch as two hand-started tasks: scaledkd maps SLURM_PROCID/NTASKS/LOCALID to torch's."""
    port = str(free_port())
    jobs = [(["bash", str(LAUNCH / "slurm/multi_node_srun.sbatch"), "recipes/r.yaml"],
             launch_env(SLURM_PROCID=r, SLURM_NTASKS="2", SLURM_LOCALID=r, SCALEDKD_HOSTNAMES="127.0.0.1",
                        MASTER_PORT=port, SCALEDKD_ENTRY=str(probe)))
            for r in ("0", "1")]
    outputs = run_together(jobs, tmp_path / "logs")
    for task, text in enumerate(outputs):
        assert probe_lines(text) == [f"RANK={task} WORLD_SIZE=2 SUM=1 ARGS=recipes/r.yaml"], text[-3000:]


@pytest.mark.multiproc
def test_deepspeed_sh_starts_two_cpu_processes_with_a_module_entry(probe, tmp_path):
    """NUM_GPUS=2 is DeepSpeed's --num_accelerators on CPU; "-m module" becomes the launcher's --module."""
    env = launch_env(NUM_GPUS="2", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", SCALEDKD_ENTRY="-m launch_probe",
                     PYTHONPATH=str(probe.parent))
    [text] = run_together([(["bash", str(LAUNCH / "deepspeed.sh"), "recipes/r.yaml"], env)], tmp_path / "logs")
    assert sorted(probe_lines(text)) == [f"RANK={r} WORLD_SIZE=2 SUM=1 ARGS=recipes/r.yaml" for r in (0, 1)], text


@pytest.mark.multiproc
def test_accelerate_cpu_config_starts_two_ranks(probe, tmp_path):
    """cpu_test.yaml reproduces `--multi_gpu --num_processes 2`: two processes in one gloo world, on CPU."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(LAUNCH / "accelerate/cpu_test.yaml"), str(probe), "recipes/r.yaml"]
    [text] = run_together([(cmd, launch_env(OMP_NUM_THREADS="1"))], tmp_path / "logs")
    assert sorted(probe_lines(text)) == [f"RANK={r} WORLD_SIZE=2 SUM=1 ARGS=recipes/r.yaml" for r in (0, 1)], text


@pytest.mark.multiproc
def test_accelerate_multi_node_config_joins_two_machines_on_loopback(probe, tmp_path):
    """multi_node.yaml as two one-process "machines" on 127.0.0.1 (only the counts and address overridden)."""
    port = str(free_port())
    jobs = [([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(LAUNCH / "accelerate/multi_node.yaml"), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
              "--main_process_port", port, "--machine_rank", rank, str(probe), "recipes/r.yaml"],
             launch_env(OMP_NUM_THREADS="1"))
            for rank in ("0", "1")]
    outputs = run_together(jobs, tmp_path / "logs")
    for rank, text in enumerate(outputs):
        assert probe_lines(text) == [f"RANK={rank} WORLD_SIZE=2 SUM=1 ARGS=recipes/r.yaml"], text[-3000:]


@pytest.mark.slow
@pytest.mark.multiproc
def test_torchrun_sh_distils_a_tiny_bert_on_two_ranks(tmp_path):
    """The real entry end to end: launch/torchrun.sh, 2 gloo ranks, `scaledkd distill` on a tiny BERT (~1 min)."""
    from tests.tiny import make_sst2, make_tiny_bert, tiny_recipe, write_recipe

    recipe = tiny_recipe(tmp_path, make_tiny_bert(tmp_path / "teacher"), make_sst2(tmp_path / "glue"))
    path = write_recipe(tmp_path / "recipe.yaml", **recipe)
    env = launch_env(NPROC_PER_NODE="2", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run_together([(["bash", str(LAUNCH / "torchrun.sh"), str(path), "train.max_steps=2"], env)], tmp_path / "logs",
                 timeout=240)
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
