"""The run folder: created or reused as the config says, and never a place where data is lost.

``overwrite=true`` replaces only a folder that holds a scaledkd run. The old run is renamed aside first
(``<dir>.replaced-<time>``); if the new run fails it is put back (the failed attempt is kept beside it as
``<dir>.failed-<time>``), and it is deleted only once the new run has finished and exported. Nothing else is ever
deleted. Rank 0 acts; every rank waits for it.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from ..build import RunDirError, check_run_dir
from ..config import Config
from ..files import is_run_folder
from . import dist

log = logging.getLogger("scaledkd")

def prepare(cfg: Config, what: str = "run") -> tuple[Path, Path | None]:
    """Create or reuse ``output_dir``; returns it and, with ``overwrite=true``, where the old run was moved.

    Raises:
        RunDirError: a finished run without ``overwrite``; a non-empty folder without resume/overwrite; a folder
            that ``overwrite`` would replace but that holds no scaledkd run.
    """
    run_dir = Path(cfg.output_dir)
    aside = None
    if dist.is_main():
        check_run_dir(cfg, what)
        if cfg.overwrite and run_dir.is_dir() and any(run_dir.iterdir()) and not cfg.train.resume:
            if not is_run_folder(run_dir):
                raise RunDirError(
                    f"output_dir {str(run_dir)!r} is not empty and holds no scaledkd run (no config.yaml with run "
                    "files); overwrite=true replaces only scaledkd runs. Choose another output_dir or empty it yourself"
                )
            aside = move_aside(run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            if aside is not None:
                restore(run_dir, aside)
            raise RunDirError(f"output_dir {str(run_dir)!r} cannot be created: {err.strerror}") from None
    dist.barrier()
    return run_dir, aside


def move_aside(run_dir: Path) -> Path:
    """Rename the previous run to ``<dir>.replaced-<time>``; :func:`drop_replaced` deletes it after success."""
    aside = _sibling(run_dir, "replaced")
    run_dir.rename(aside)
    log.warning("overwrite=true: moved the previous run in %s to %s; it is deleted once this run finishes, and put "
                "back if it fails", run_dir, aside)
    return aside


def restore(run_dir: Path, aside: Path | None) -> None:
    """The new run failed: put the moved-aside run back; the failed attempt stays beside it (rank 0)."""
    if aside is None or not dist.is_main() or not aside.exists():
        return
    if run_dir.exists():
        failed = _sibling(run_dir, "failed")
        run_dir.rename(failed)
        log.warning("this run failed: its folder is kept as %s", failed)
    aside.rename(run_dir)
    log.warning("this run failed: the previous run is back in %s", run_dir)


def drop_replaced(aside: Path | None) -> None:
    """The new run finished and exported: delete the run it replaced (rank 0)."""
    if aside is not None and dist.is_main() and aside.exists():
        shutil.rmtree(aside)
        log.info("deleted the replaced run %s", aside)


def _sibling(run_dir: Path, kind: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = run_dir.with_name(f"{run_dir.name}.{kind}-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = run_dir.with_name(f"{run_dir.name}.{kind}-{stamp}-{n}")
    return candidate
