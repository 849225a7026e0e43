"""Resuming a run: which checkpoint it continues from, and whether the config still describes that run.

A resumed run must follow the trajectory the checkpoint was on. Keys that change it (the schedule, the batch, the
seed, the data, the losses, the models) are compared with the checkpointed run's ``config.yaml`` before any model
is loaded; a difference is refused with the list of keys, unless ``train.resume_allow_changes`` names them, in
which case the change is recorded in ``config_history.yaml``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from . import checkpoint
from .config import Config, ConfigError
from .files import write_text_atomic

HISTORY_FILE = "config_history.yaml"

# Keys that do not change what a resumed run computes (where it writes, how often it logs/evaluates/saves).
# train.eval_every leaves this set when early stopping is on (_not_trajectory).
NOT_TRAJECTORY = frozenset({
    "output_dir", "overwrite", "recipe_path", "plugins", "stages",
    "train.resume", "train.resume_allow_changes", "train.progress", "train.log_every", "train.eval_every",
    "train.save_every", "train.save_every_min", "train.keep_checkpoints", "train.dist_timeout_s", "train.backend",
    "train.export", "train.report_to",
})


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def _not_trajectory(saved: dict[str, Any], now: dict[str, Any]) -> frozenset[str]:
    """NOT_TRAJECTORY for this pair of configs: with early stopping on in either, ``train.eval_every`` decides
    when the holdout is scored and ``patience`` counts those evaluations, so it decides the step the run stops at."""
    early = any(isinstance(cfg.get("train"), dict) and cfg["train"].get("early_stopping") for cfg in (saved, now))
    return NOT_TRAJECTORY - {"train.eval_every"} if early else NOT_TRAJECTORY


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, new value)}`` for every trajectory key whose value differs."""
    a, b = _flatten(saved), _flatten(now)
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    skip = _not_trajectory(saved, now)
    return {k: v for k, v in changed.items() if k not in skip and not any(k.startswith(f"{n}.") for n in skip)}


def _allowed(key: str, allow: list[str]) -> bool:
    return any(key == a or key.startswith(f"{a}.") for a in allow)


def check_resume(cfg: Config) -> tuple[Path, str] | None:
    """The checkpoint ``cfg.train.resume`` continues from, checked against the config; None for a fresh start.

    Raises:
        checkpoint.NoCheckpoint: ``latest`` with nothing to resume from (``auto`` starts fresh instead).
        checkpoint.CheckpointError: a named folder that is not a complete checkpoint.
        ConfigError: a trajectory key differs from the checkpointed run's and is not allowed.
    """
    resume = cfg.train.resume
    if not resume:
        return None
    run_dir = Path(cfg.output_dir)
    try:
        root, tag = checkpoint.resolve(run_dir, "latest" if resume == "auto" else resume)
    except checkpoint.NoCheckpoint:
        if resume == "auto":
            return None
        raise
    saved_file = root.parent / "config.yaml"
    if saved_file.is_file():
        saved = yaml.safe_load(saved_file.read_text()) or {}
        changes = config_changes(saved, cfg.to_dict())
        refused = sorted(k for k in changes if not _allowed(k, cfg.train.resume_allow_changes))
        if refused:
            shown = ", ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in refused[:8])
            more = f" (and {len(refused) - 8} more)" if len(refused) > 8 else ""
            raise ConfigError(
                f"train.resume={resume!r}: the config differs from the checkpointed run's ({saved_file}) in keys that "
                f"change its trajectory: {shown}{more}. Resume with the saved values, name the keys in "
                f"train.resume_allow_changes={refused} to change them deliberately, or start a new output_dir"
            )
    return root, tag


def record_changes(run_dir: Path, cfg: Config, resumed_from: tuple[Path, str]) -> None:
    """Append this resume's allowed config changes to ``config_history.yaml`` (rank 0, before config.yaml is
    rewritten), so the saved config's provenance stays true."""
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        return
    changes = config_changes(yaml.safe_load(saved_file.read_text()) or {}, cfg.to_dict())
    history_file = run_dir / HISTORY_FILE
    history = (yaml.safe_load(history_file.read_text()) if history_file.is_file() else None) or []
    history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_from": str(resumed_from[0] / resumed_from[1]),
                    "changed": {k: {"was": a, "now": b} for k, (a, b) in changes.items()}})
    write_text_atomic(history_file, yaml.safe_dump(history, sort_keys=False))
