"""Students out as Hugging Face folders: ``config.json``, ``model.safetensors``, tokenizer, provenance.

Only the student's own weights are written: projections, filters and heads that exist for distillation live
in the losses and never reach the export. Folders are written to a temporary sibling and renamed into place,
so a crash never leaves a half-written export behind. ``export`` replaces an existing folder only when asked to
(``--overwrite``), only if it is an earlier export, and never the run it reads or anything around it.
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
from .model_card import CARD_FILE, render_card
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


def atomic_dir(target: Path, replace: bool = True):
    """A temporary folder beside ``target``; call ``commit()`` to move it into place.

    ``commit`` takes the place of a missing or empty ``target``; a non-empty one is replaced only with
    ``replace`` (moved into a fresh temporary sibling, deleted once the new folder is in place, put back if the
    rename fails). Nothing beside ``target`` but the temporary folders this creates is ever touched.
    """

    class _Staged:
        def __init__(self) -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))

        def commit(self) -> None:
            aside = None
            if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
                target.rmdir()
            elif target.exists() or target.is_symlink():
                if not replace:
                    raise FileExistsError(f"{target} appeared while the export was being written; it was left as "
                                          "it is")
                aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
                target.rename(aside / target.name)
            try:
                self.path.rename(target)
            except BaseException:
                if aside is not None:
                    (aside / target.name).rename(target)
                    aside.rmdir()
                raise
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)

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
    replace: bool = True,
) -> Path:
    """Write ``state`` as a Hugging Face folder for ``student``'s class and config (rank 0 only).

    ``replace``: a non-empty ``out_dir`` is replaced (after the new folder is complete); otherwise it is an
    error. Callers decide beforehand whether ``out_dir`` may be replaced (:func:`check_export_target`).
    """
    out_dir = Path(out_dir)
    staged = atomic_dir(out_dir, replace=replace)
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
        (staged.path / CARD_FILE).write_text(render_card(record, student.config, str(record.get("task"))))
        staged.commit()
    except BaseException as err:
        from .checkpoint import DiskFull, format_bytes, free_bytes, is_disk_full

        full = isinstance(err, Exception) and is_disk_full(err, out_dir.parent)  # before abort gives space back
        free = free_bytes(out_dir.parent) if full else None
        staged.abort()
        if full:
            before = ("the earlier export there is untouched" if is_model_folder(out_dir) else
                      "nothing was left there")
            raise DiskFull(f"no space left on device while writing the export {str(out_dir)!r} "
                           f"({format_bytes(free)} free); {before}: free some space and export again (scaledkd export RUN OUT; a run's "
                           "last checkpoint is kept for this)") from err
        raise
    return out_dir


class ExportError(ValueError):
    """``export`` cannot write where it was asked to; the message names the folder and the way out."""


RUN_FOLDERS = ("checkpoints", "student", "student_init")  # a run's own folders: never an export target


def is_model_folder(folder: Path) -> bool:
    """A Hugging Face model folder (what an export writes): ``config.json`` and safetensors weights."""
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_export_target(out_dir: Path, protected: list[Path], overwrite: bool) -> None:
    """Refuse an export target that would destroy something the user did not name.

    ``out_dir`` may be missing or an empty folder. A non-empty one is replaced only with ``overwrite`` and only
    if it is a model folder (an earlier export). Whatever ``overwrite`` says, it may not be, contain or lie
    inside any ``protected`` folder (the run, the checkpoint), except as a fresh subfolder of one.
    """
    out = Path(out_dir).resolve()
    if Path(out_dir).is_symlink():
        raise ExportError(f"export target {str(out_dir)!r} is a symbolic link; name the folder itself")
    for folder in protected:
        folder = Path(folder).resolve()
        if _within(folder, out):
            what = "is" if folder == out else "contains"
            raise ExportError(f"export target {str(out_dir)!r} {what} {str(folder)!r}, which the export reads; "
                              "choose a new folder (e.g. beside the run) — it is never replaced, even with "
                              "--overwrite")
        if folder in out.parents:
            first = folder / out.relative_to(folder).parts[0]
            fresh = not first.exists() or (first == out and out.is_dir() and not any(out.iterdir()))
            if not fresh or first.name in RUN_FOLDERS:
                raise ExportError(f"export target {str(out_dir)!r} is inside {str(folder)!r} at {str(first)!r}, "
                                  "which belongs to the run; export to a new folder (e.g. beside the run) — this "
                                  "is never replaced, even with --overwrite")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"export target {str(out_dir)!r} exists and is not a folder; choose a new folder")
    if not any(out.iterdir()):
        return
    if not is_model_folder(out):
        raise ExportError(f"export target {str(out_dir)!r} exists, is not empty and is not an exported model "
                          "(no config.json with model.safetensors); it is never replaced, even with --overwrite: "
                          "choose a new or empty folder")
    if not overwrite:
        raise ExportError(f"export target {str(out_dir)!r} already holds an exported model; pass --overwrite to "
                          "replace it (the old one is deleted only after the new one is in place), or choose a "
                          "new folder")


def export_run(run_dir: Path, out_dir: Path, tag: str = "latest", overwrite: bool = False) -> Path:
    """Consolidate a run's checkpoint into a Hugging Face folder on one process (any saved world size/stage).

    Args:
        tag: ``latest`` (the newest complete checkpoint), ``step_<N>`` or a checkpoint folder.
        overwrite: replace ``out_dir`` if it holds an earlier export. Without it a non-empty ``out_dir`` is
            refused; with it, only a model folder outside the run may be replaced (:func:`check_export_target`).

    Raises:
        ExportError: ``out_dir`` may not be written, or the run has no usable checkpoint.
    """
    from transformers import AutoConfig

    from . import checkpoint, models

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_export_target(out_dir, [run_dir], overwrite)
    if not run_dir.is_dir():
        raise ExportError(f"{str(run_dir)!r} is not a folder; name a scaledkd run folder")
    init = run_dir / "student_init"
    if not (init / "run_info.json").is_file():
        raise ExportError(f"{str(run_dir)!r} is not a scaledkd run folder (no student_init/run_info.json)")
    try:
        root, tag = checkpoint.resolve(run_dir, tag, what="--checkpoint")
    except checkpoint.NoCheckpoint as err:
        hint = (f"; the finished run's student is already exported in {str(run_dir / 'student')!r}"
                if is_model_folder(run_dir / "student") else "")
        raise ExportError(f"run {str(run_dir)!r} has no complete checkpoint to export ({err}); checkpoints are "
                          f"written every train.save_every steps and at the end of a run{hint}") from err
    except checkpoint.CheckpointError as err:
        raise ExportError(f"cannot export run {str(run_dir)!r}: {err}") from err
    check_export_target(out_dir, [run_dir, root / tag], overwrite)
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
    return save_student(student, student.state_dict(), out_dir, tokenizer, provenance, config_yaml,
                        replace=overwrite)
