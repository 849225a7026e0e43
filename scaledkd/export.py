"""Students out as Hugging Face folders: ``config.json``, ``model.safetensors``, tokenizer, provenance.

Only the student's own weights are written: projections, filters and heads that exist for distillation live
in the losses and never reach the export. Folders are written to a temporary sibling and renamed into place,
so a crash never leaves a half-written export behind.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .engine import dist

PROVENANCE_FILE = "scaledkd_provenance.json"
CONFIG_FILE = "scaledkd_config.yaml"
STUDENT_PREFIX = "student."


def gather_student_state(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Full student state dict on rank 0 (None elsewhere); a collective under ZeRO-3 (all ranks must call).

    Args:
        module: the :class:`~scaledkd.engine.module.DistillModule` (or the student itself).
    """
    import deepspeed

    student = getattr(module, "student", module)
    params = [p for p in student.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
        state = None
        if dist.is_main():
            state = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
    return state


def strip_to_student(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a DistillModule state dict -> the student's own keys (distillation-only modules dropped)."""
    return {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}


def atomic_dir(target: Path):
    """A temporary folder beside ``target``; call ``commit()`` to move it into place (replacing ``target``)."""

    class _Staged:
        def __init__(self) -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))

        def commit(self) -> None:
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                target.rename(old)
            self.path.rename(target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

        def abort(self) -> None:
            shutil.rmtree(self.path, ignore_errors=True)

    return _Staged()


def save_student(
    student: nn.Module,
    state: dict[str, torch.Tensor],
    out_dir: str | Path,
    tokenizer: Any | None,
    provenance: dict[str, Any],
    config_yaml: str | None,
) -> Path:
    """Write ``state`` as a Hugging Face folder for ``student``'s class and config (rank 0 only)."""
    out_dir = Path(out_dir)
    staged = atomic_dir(out_dir)
    try:
        # save_pretrained consumes the dict it is given (docs/environment.md#transformers-5-behaviours-that-matter):
        # hand it a shallow copy.
        student.save_pretrained(staged.path, state_dict=dict(state), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staged.path)
        record = {"scaledkd_version": __version__, **provenance}
        (staged.path / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        if config_yaml is not None:
            (staged.path / CONFIG_FILE).write_text(config_yaml)
        staged.commit()
    except BaseException:
        staged.abort()
        raise
    return out_dir


def export_run(run_dir: Path, out_dir: Path, tag: str = "latest") -> Path:
    """Consolidate a run's checkpoint into a Hugging Face folder on one process (any saved world size/stage)."""
    from transformers import AutoConfig

    from . import checkpoint, models

    root, tag = checkpoint.resolve(run_dir, tag)
    init = run_dir / "student_init"
    info = json.loads((init / "run_info.json").read_text())
    config = AutoConfig.from_pretrained(init)
    student = models.auto_class(info["task"]).from_config(config)
    state = strip_to_student(checkpoint.consolidated_state(root, tag))
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or {})
    if unexpected or [k for k in missing if k not in tied]:
        raise RuntimeError(f"checkpoint {root / tag} does not match the student: missing {missing}, "
                           f"unexpected {unexpected}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(init)
    config_yaml = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else None
    provenance = {"run_dir": str(run_dir), "checkpoint": str(root / tag), **info}
    return save_student(student, student.state_dict(), out_dir, tokenizer, provenance, config_yaml)
