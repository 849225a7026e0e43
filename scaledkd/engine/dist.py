"""Process-group setup that works the same with no launcher, torchrun, the deepspeed launcher, accelerate or
srun, plus the few collectives the loop needs. Gloo on CPU, NCCL on GPUs."""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as torch_dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment() -> None:
    """Environment defaults, set before DeepSpeed is imported.

    Without a GPU DeepSpeed must be told to use its CPU accelerator (it warns and guesses otherwise). Without a
    launcher the rendezvous variables are missing and DeepSpeed falls back to MPI discovery, which fails without
    mpi4py, so a plain ``scaledkd distill`` becomes rank 0 of a world of 1 on a free local port.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ and "SCALEDKD_SRUN_RANKS" in os.environ:
        # srun starting one process per GPU (launch/slurm/*_srun.sbatch): map SLURM's ids to torch's.
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")


def init(timeout_s: int) -> None:
    """Initialise the default process group once (DeepSpeed's wrapper, so its comm layer knows about it)."""
    prepare_environment()
    import deepspeed

    if torch_dist.is_available() and torch_dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if torch_dist.is_initialized() and world_size() > 1:
        torch_dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """All-reduce mean of a small float vector (loss terms): every rank sees the same numbers."""
    if world_size() > 1:
        values = values.clone()
        torch_dist.all_reduce(values, op=torch_dist.ReduceOp.SUM)
        values /= world_size()
    return values


def any_across_ranks(flags: list[bool]) -> list[bool]:
    """Element-wise OR of boolean flags over ranks (one small all-reduce): every rank takes the same decision
    (stop, save) even when only one rank's clock or signal asked for it."""
    if world_size() <= 1:
        return list(flags)
    values = torch.tensor([float(f) for f in flags])
    torch_dist.all_reduce(values, op=torch_dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def broadcast_object(obj):
    if world_size() <= 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]
