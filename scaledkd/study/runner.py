"""Running a study: each cell a subprocess, scheduled ``--jobs`` at a time, recorded in ``cells.json``.

A cell whose folder holds the finished marker is skipped; a failed cell is retried on the next invocation (its
folder moved aside). One study per results folder at a time (a lock); SIGTERM and Ctrl-C stop the running cells
and still write the records and reports.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from ..files import FINISHED_MARKER, write_json
from .cells import Cell, expand, select_cells
from .report import write_reports
from .spec import SpecError, load_spec

RENDEZVOUS_VARS = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                              "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"})

RECORDS = "cells.json"  # the study's record of its cells, in the results folder


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _error_of(log: Path) -> str:
    """The most telling line of a failed cell's log: scaledkd's own error, else the last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("scaledkd: error:"):
            return line
    return lines[-1] if lines else ""


def _lock(results: Path) -> Path:
    """One study per results folder at a time; a lock left by a dead process is taken over."""
    lock = results / ".lock"
    if lock.exists():
        try:
            pid = int(lock.read_text().strip())
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            pid = None
        if pid is not None and pid != os.getpid():
            raise SpecError(f"another study (pid {pid}) is running on {results}; wait for it or remove {lock}")
    lock.write_text(str(os.getpid()))
    return lock


def cell_env(jobs: int) -> dict[str, str]:
    """The environment of a cell: this process's, without its rendezvous, and with a share of the cores.

    Each cell is its own single-process job: it must not inherit a rendezvous (RANK, MASTER_PORT, ...) that belongs
    to this process or its launcher, or it would try to join that group / bind a port in use. With ``jobs`` cells at
    once each gets ``cores // jobs`` intra-op threads (unless OMP_NUM_THREADS is set), so they do not oversubscribe.
    """
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env["PYTHONUNBUFFERED"] = "1"
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return env


def run_cell(cell: Cell, log: Path, *, env: dict[str, str] | None = None,
             running: dict[str, subprocess.Popen] | None = None) -> dict[str, Any]:
    """Run one cell as a subprocess; returns its record (status, rc, wall_s, cpu_s, error).

    ``cpu_s`` (user + system seconds of the cell's process and the children it waited for) is beside the wall time
    because on a shared machine the wall time says more about the neighbours than about the cell. ``running``, when
    given, holds the cell's process while it runs, so that an interrupted study can stop it.
    """
    start = time.time()
    if not Path(cell.recipe).is_file():
        log.write_text(f"recipe {cell.recipe} does not exist\n")
        return {"status": "failed", "rc": None, "wall_s": 0.0, "cpu_s": 0.0,
                "error": f"recipe {cell.recipe!r} does not exist"}
    with log.open("w") as f:
        f.write(f"$ {cell.command_line()}\n")
        f.flush()
        proc = subprocess.Popen(cell.argv(), stdout=f, stderr=subprocess.STDOUT,
                                env=env if env is not None else cell_env(1))
        if running is not None:
            running[cell.id] = proc
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # not proc.wait(): wait4 also gives this child's own rusage
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        finally:
            if running is not None:
                running.pop(cell.id, None)
    wall = time.time() - start
    cpu = usage.ru_utime + usage.ru_stime
    run_dir = Path(cell.output_dir)
    if run_dir.is_dir():
        shutil.copyfile(log, run_dir / "study.log")
    if rc == 0 and cell.finished():
        return {"status": "done", "rc": 0, "wall_s": wall, "cpu_s": cpu, "error": ""}
    error = _error_of(log) if rc != 0 else f"exited 0 without writing {FINISHED_MARKER}"
    if rc < 0:
        error = f"killed by signal {-rc}" + (f"; last line: {error}" if error else "")
    return {"status": "failed", "rc": rc, "wall_s": wall, "cpu_s": cpu, "error": error}


def _clear_unfinished(cell: Cell, record: dict[str, Any]) -> str | None:
    """Make a failed cell's folder ready for a retry (moved to ``<dir>.failed``). A folder the study did not
    start is never touched: the reason is returned instead."""
    run_dir = Path(cell.output_dir)
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    if not record.get("attempts"):
        return (f"output_dir {cell.output_dir!r} holds an unfinished run this study did not start (a run in "
                f"progress?); let it finish, or move it aside (mv {cell.output_dir} {cell.output_dir}.failed) if "
                f"it is a stopped cell whose record was lost with {RECORDS}")
    aside = run_dir.with_name(run_dir.name + ".failed")
    shutil.rmtree(aside, ignore_errors=True)
    run_dir.rename(aside)
    return None


class _Interrupted(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, ``timeout``) turned into an interrupt, so reports are still written."""


def _raise_interrupted(signum, frame):  # noqa: ARG001
    raise _Interrupted(f"signal {signum}")


def run_study(spec_path: str | Path, *, dry_run: bool = False, only: str | None = None, jobs: int = 1,
              echo: Callable[[str], None] = print) -> int:
    """Run (or, with ``dry_run``, list) the spec's unfinished cells; returns 0 when every selected cell is done.

    Cells run seed by seed (every cell's first seed before any second seed), so a study stopped early has every
    method at fewer seeds rather than some methods at none. ``jobs`` cells run at once (a cell starts when the cells
    it waits for are finished); on SIGTERM or Ctrl-C the running cells are stopped and the reports written.
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise SpecError(f"jobs={jobs!r}: must be a whole number >= 1")
    spec = load_spec(spec_path)
    cells = expand(spec)
    chosen = select_cells(cells, only)
    records_path = spec.results / RECORDS
    records: dict[str, dict[str, Any]] = json.loads(records_path.read_text()) if records_path.is_file() else {}
    todo = sorted((c for c in chosen if not c.finished()), key=lambda c: c.wave)  # stable: spec order per wave
    echo(f"study {spec.path}: {len(cells)} cells in the grid, {len(chosen)} selected, "
         f"{len(chosen) - len(todo)} finished, {len(todo)} to run"
         + (f", {jobs} at a time" if jobs > 1 else "") + f"; results in {spec.results}")
    if dry_run:
        for cell in chosen:
            status = "done" if cell.finished() else records.get(cell.id, {}).get("status", "pending")
            after = f"  (after {', '.join(cell.after)})" if cell.after else ""
            echo(f"  [{status:7s}] {cell.id}{after}\n            {cell.command_line()}")
        return 0
    spec.results.mkdir(parents=True, exist_ok=True)
    (spec.results / "logs").mkdir(exist_ok=True)
    lock = _lock(spec.results)
    by_id = {c.id: c for c in cells}
    env = cell_env(jobs)
    started = time.time()
    pending = list(todo)
    in_flight: dict[Future, tuple[Cell, str]] = {}
    procs: dict[str, subprocess.Popen] = {}
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupted) \
        if threading.current_thread() is threading.main_thread() else None

    def progress() -> str:
        elapsed = time.time() - started
        left = len(pending) + len(in_flight)
        ended = len(todo) - left
        eta = f", ETA {_hms(elapsed / ended * left)}" if ended and left else ""
        return f"elapsed {_hms(elapsed)}{eta}"

    def start_ready(pool: ThreadPoolExecutor) -> None:
        """Settle pending cells in order (start, or record as blocked / not run) while there is room; a cell
        waits while a cell it depends on is pending or running. Scans again after settling one, since a
        dependency later in the order (another seed wave) may just have been settled."""
        while pending and len(in_flight) < jobs:
            unsettled = {c.id for c in pending} | {c.id for c, _ in in_flight.values()}
            cell = next((c for c in pending if not unsettled.intersection(c.after)), None)
            if cell is None:
                return  # every pending cell waits for a running one
            pending.remove(cell)
            prefix = f"[{len(todo) - len(pending)}/{len(todo)}] {cell.id}"
            record = records.setdefault(cell.id, {})
            waiting = [d for d in cell.after if not by_id[d].finished()]
            if waiting:
                record.update(status="blocked", error=f"waits for unfinished {', '.join(waiting)}")
                echo(f"{prefix}: blocked, waits for {', '.join(waiting)}")
            elif (reason := _clear_unfinished(cell, record)) is not None:
                record.update(status="failed", error=reason)
                echo(f"{prefix}: not run: {reason}")
            else:
                log = spec.results / "logs" / (cell.id.replace("/", "__") + ".log")
                echo(f"{prefix}: running ({progress()}; log {log})")
                record.update(status="running", command=cell.command_line(), log=str(log),
                              attempts=record.get("attempts", 0) + 1, started=time.strftime("%Y-%m-%d %H:%M:%S"))
                in_flight[pool.submit(run_cell, cell, log, env=env, running=procs)] = (cell, prefix)
            write_json(records_path, records, indent=1, sort_keys=True)

    def finish(future: Future) -> None:
        cell, prefix = in_flight.pop(future)
        record = records[cell.id]
        record.update(future.result())
        if record["status"] == "done":
            metrics = json.loads((Path(cell.output_dir) / FINISHED_MARKER).read_text())
            score = (metrics.get(spec.select) or {}).get("score")
            shown = f"{spec.select} dev score {score:.4f}" if score is not None else "no dev score"
            echo(f"{prefix}: done in {_hms(record['wall_s'])}, {shown} ({progress()})")
        else:
            echo(f"{prefix}: FAILED in {_hms(record['wall_s'])}: {record['error']}")
        write_json(records_path, records, indent=1, sort_keys=True)
        write_reports(spec, cells, records)

    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="study-cell")
    try:
        start_ready(pool)
        while in_flight:
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for future in done:
                finish(future)
            start_ready(pool)
        assert not pending, f"cells left unsettled: {[c.id for c in pending]}"  # the spec rejects cycles
    except KeyboardInterrupt as err:
        for proc in list(procs.values()):
            proc.terminate()
        for future, (cell, prefix) in list(in_flight.items()):
            try:
                result = future.result(timeout=60)
            except Exception as exc:  # noqa: BLE001  (the cell's thread died with the interrupt)
                result = {"status": "failed", "error": repr(exc)}
            records[cell.id].update(result, status="failed", error=f"interrupted ({err or 'Ctrl-C'})")
            echo(f"{prefix}: stopped (interrupted)")
        in_flight.clear()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        write_json(records_path, records, indent=1, sort_keys=True)
        write_reports(spec, cells, records)
        lock.unlink(missing_ok=True)
    unfinished = [c.id for c in chosen if not c.finished()]
    echo(f"study finished in {_hms(time.time() - started)}: {len(chosen) - len(unfinished)}/{len(chosen)} "
         f"selected cells done" + (f"; not done: {', '.join(unfinished)} (rerun to retry)" if unfinished else "")
         + f"\n  {spec.results / 'summary.md'}")
    return 1 if unfinished else 0
