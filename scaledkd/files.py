"""Run-folder names and crash-safe file writes, shared by the engine, export and the study (no torch import).

A file is written to a temporary sibling, flushed to disk and renamed into place, so a reader (a resumed run, a
study deciding whether a cell finished) sees either the old file or the whole new one, never half of it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

FINISHED_MARKER = "metrics.json"  # written last by a run; its presence means "finished"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a flushed temporary sibling and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_json(path: Path, data: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    """Write JSON atomically (:func:`write_text_atomic`); values JSON cannot hold are written as ``str``."""
    write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")


# What a folder written by scaledkd holds (a single run, or a staged recipe's root): config.yaml plus one of these.
RUN_MARKERS = (FINISHED_MARKER, "student_init", "checkpoints", "log.jsonl", "student")


def is_run_folder(path: Path) -> bool:
    """Whether ``path`` holds a scaledkd run (or a staged recipe's root): its ``config.yaml`` and run files."""
    if not (path / "config.yaml").is_file():
        return False
    return any((path / m).exists() for m in RUN_MARKERS) or any(path.glob("stage_*"))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks (weight files may be far larger than memory allows)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
