"""Resumable state: DeepSpeed checkpoints (sharded per ZeRO stage) plus scaledkd's own loop state and every
rank's RNG state, and consolidation of any checkpoint to a full student state dict on one process."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .engine import dist

CHECKPOINTS = "checkpoints"


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: Path, step: int, loop_state: dict[str, Any]) -> Path:
    """Save a checkpoint ``<run>/checkpoints/step_<N>`` (collective: every rank writes its shards)."""
    root = run_dir / CHECKPOINTS
    tag = f"step_{step}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"scaledkd": loop_state})
    torch.save(_rng_state(), root / tag / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    return root / tag


def resolve(run_dir: Path, resume: str) -> tuple[Path, str]:
    """``latest`` or a checkpoint folder -> (checkpoints root, tag)."""
    if resume == "latest":
        root = run_dir / CHECKPOINTS
        latest = root / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"train.resume=latest: no checkpoint in {root}")
        return root, latest.read_text().strip()
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"train.resume={resume!r}: no such checkpoint folder")
    return path.parent, path.name


def load(engine, root: Path, tag: str) -> dict[str, Any]:
    """Load a checkpoint into ``engine``; returns scaledkd's loop state and restores this rank's RNG."""
    _, client = engine.load_checkpoint(str(root), tag=tag)
    if client is None:
        raise RuntimeError(f"could not load checkpoint {root / tag}")
    rng = root / tag / f"rng_rank{dist.rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return client["scaledkd"]


def consolidated_state(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of a checkpoint on one process, whatever world size or ZeRO stage wrote it."""
    folder = root / tag
    if list(folder.glob("*zero_pp_rank_*optim_states.pt")) or list(folder.glob("*zero_pp_rank_*model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        if state:
            return state
    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed model states")
    return torch.load(files[0], map_location="cpu", weights_only=False)["module"]


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename): a crash never leaves a truncated file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
