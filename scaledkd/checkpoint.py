"""Resumable state: DeepSpeed checkpoints (sharded per ZeRO stage) plus scaledkd's own loop state and every
rank's RNG state, and consolidation of any checkpoint to a full student state dict on one process.

A checkpoint is written so that a kill at any moment leaves either the previous complete checkpoint or the new
complete one, never a half-written one that a resume would trust:

1. every rank writes its DeepSpeed shards (without DeepSpeed's ``latest``) and its RNG state into a temporary
   folder ``checkpoints/.step_<N>.partial``;
2. after a barrier, every rank flushes its own files to disk and hashes them, and rank 0 writes
   ``manifest.json`` listing each file with its size and sha256;
3. rank 0 renames the folder to ``checkpoints/step_<N>`` and only then replaces ``checkpoints/latest``
   (temporary file + rename);
4. with ``keep``, older complete checkpoints beyond the newest ``keep`` are deleted, after the new one is
   complete.

Loading checks the manifest; a checkpoint that fails the check is skipped with a warning naming it, and the
previous complete one is used. The folders must be on a file system every rank sees (the usual shared run
folder); DeepSpeed's node-local-storage mode is not supported.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .engine import dist
from .files import sha256_file, write_text_atomic

log = logging.getLogger("scaledkd")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT = "scaledkd-checkpoint/1"
TAG_RE = re.compile(r"step_(\d+)")
_PARTIAL = ".partial"  # .step_<N>.partial: a checkpoint being written
_DELETING = ".deleting"  # .step_<N>.deleting: an old checkpoint being removed by retention


class CheckpointError(ValueError):
    """A checkpoint (or a resume target) that cannot be used; the message names the folder and why."""


class NoCheckpoint(FileNotFoundError):
    """No complete checkpoint where one was asked for; the message names the folder."""


class DiskFull(OSError):
    """No space left on the device while writing a checkpoint or an export; the message names the folder, and
    what was being written was removed (the previous checkpoint or export is untouched)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


FULL_BELOW = 1 << 20  # bytes free under which a failed write is put down to a full disk


def free_bytes(path: Path) -> int | None:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(err: BaseException, folder: Path) -> bool:
    """Whether a failed write into ``folder`` ran out of space: ENOSPC/EDQUOT anywhere in the exception chain, the
    words a library uses for it, or (for the errors C++ writers raise without an errno, such as torch.save's
    ``basic_ios::clear: iostream error``) less than :data:`FULL_BELOW` bytes left on the device."""
    seen: BaseException | None = err
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(seen) for words in ("No space left", "StorageFull", "Disk quota exceeded")):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(err, (OSError, RuntimeError)):
        return False
    free = free_bytes(folder)
    return free is not None and free < FULL_BELOW


def format_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


# ------------------------------------------------------------------------------------------ RNG state


def _rng_state() -> dict[str, Any]:
    """Every RNG of this process as tensors, ints, floats and lists only (loadable with ``weights_only=True``)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------ files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory
    finally:
        os.close(fd)


def _hash_and_sync(path: Path) -> str:
    """sha256 of ``path``, and its data flushed to disk (fsync works on a read-only descriptor)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
        os.fsync(f.fileno())
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


_RANKED = re.compile(r"(?:^|_)(?:zero_pp_rank_|rng_rank)(\d+)(?:_|\.)")


def _writer(name: str) -> int:
    """The rank that wrote a checkpoint file: the rank in its name (ZeRO shards, RNG), else rank 0."""
    match = _RANKED.search(Path(name).name)
    return int(match.group(1)) if match else 0


def _own_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the files this rank wrote, each flushed to disk by its writer."""
    rank = dist.rank()
    return {rel: {"size": (folder / rel).stat().st_size, "sha256": _hash_and_sync(folder / rel)}
            for rel in _files(folder) if _writer(rel) == rank}


def _write_manifest(folder: Path, tag: str, step: int) -> None:
    """Every rank hashes and flushes its own files; rank 0 writes the manifest of all of them (collective)."""
    entries = _own_entries(folder)
    if dist.world_size() > 1:
        import torch.distributed as torch_dist

        gathered: list[Any] = [None] * dist.world_size()
        torch_dist.all_gather_object(gathered, entries)
    else:
        gathered = [entries]
    if not dist.is_main():
        return
    files = {}
    for part in gathered:
        files.update(part)
    manifest = {"format": FORMAT, "tag": tag, "step": step, "world_size": dist.world_size(),
                "saved_at": time.time(), "files": dict(sorted(files.items()))}
    write_text_atomic(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    _fsync_dir(folder)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a checkpoint folder, or None if it has none (or not a readable one of ours)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    if not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def problem(folder: Path, checksums: bool = True) -> str | None:
    """Why ``folder`` is not a complete checkpoint (None when it is): manifest, every file, sizes, checksums."""
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder" if not folder.exists() else "not a folder"
    if not (folder / MANIFEST).is_file():
        return (f"no {MANIFEST} (its save was interrupted, or it is not a scaledkd checkpoint)")
    manifest = read_manifest(folder)
    if manifest is None:
        return f"{MANIFEST} is unreadable or not a scaledkd checkpoint manifest"
    files = manifest["files"]
    if not any(name.endswith("model_states.pt") for name in files):
        return f"{MANIFEST} lists no DeepSpeed model states"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{name} is {size} bytes, the manifest says {entry.get('size')}"
    if checksums:
        for name, entry in files.items():
            if sha256_file(folder / name) != entry.get("sha256"):
                return f"{name} does not match its sha256 in {MANIFEST}"
    return None


# ------------------------------------------------------------------------------------------ save


def _step_of(name: str) -> int | None:
    match = TAG_RE.fullmatch(name)
    return int(match.group(1)) if match else None


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder: renamed out of sight first, so a kill midway leaves no broken ``step_<N>``."""
    doomed = folder.with_name(f".{folder.name}{_DELETING}")
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save(engine, run_dir: Path, step: int, loop_state: dict[str, Any], *, keep: int | None = None,
         data_state: dict[str, Any] | None = None) -> Path:
    """Save a complete, verified checkpoint ``<run>/checkpoints/step_<N>`` (collective: every rank writes).

    Args:
        data_state: this rank's own data position (a streamed corpus: :meth:`StreamBatches.state_dict
            <scaledkd.engine.batches.StreamBatches.state_dict>`), written as ``data_rank<r>.json``; None for
            data whose position the loop state's micro-batch count gives.
        keep: keep the newest ``keep`` complete checkpoints (this one included) and delete older ones once this
            one is complete; None keeps every checkpoint.
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be at least 1 (or None to keep every checkpoint), got {keep}")
    root = Path(run_dir) / CHECKPOINTS
    tag = f"step_{step}"
    partial_tag = f".{tag}{_PARTIAL}"
    staging = root / partial_tag
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        for leftover in [*root.glob(f".step_*{_PARTIAL}"), *root.glob(f".step_*{_DELETING}")]:
            if leftover.is_dir() and _step_of(leftover.name[1:].rsplit(".", 1)[0]) is not None:
                shutil.rmtree(leftover, ignore_errors=True)  # what a killed save or deletion left behind
    dist.barrier()
    try:
        engine.save_checkpoint(str(root), tag=partial_tag, client_state={"scaledkd": loop_state}, save_latest=False)
        torch.save(_rng_state(), staging / f"rng_rank{dist.rank()}.pt")
        if data_state is not None:
            (staging / f"data_rank{dist.rank()}.json").write_text(json.dumps(data_state))
        dist.barrier()  # every rank has written its files
        _write_manifest(staging, tag, step)  # each rank flushes and hashes its own; rank 0 writes the manifest
        if dist.is_main():
            final = root / tag
            if final.exists():  # the same step saved before (a run resumed from an earlier checkpoint)
                _remove(final)
            staging.rename(final)
            _fsync_dir(root)
            write_text_atomic(root / LATEST, tag)
            _fsync_dir(root)
    except Exception as err:
        if not is_disk_full(err, root):
            raise
        free = free_bytes(root)
        shutil.rmtree(staging, ignore_errors=True)  # never looked complete (no manifest); gives the space back
        previous = _latest_name(root)
        kept = (f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint")
        raise DiskFull(f"no space left on device while writing checkpoint {tag} in {root} ({format_bytes(free)} "
                       f"free); {kept} and nothing half-written was kept: free some space (or lower "
                       "train.keep_checkpoints) and run the same command with train.resume=auto") from err
    if dist.is_main() and keep is not None:
        _retain(root, tag, keep)
    dist.barrier()
    return root / tag


def _latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def _retain(root: Path, newest: str, keep: int) -> None:
    """Delete complete checkpoints beyond the newest ``keep``; ``newest`` (just written) is never deleted.

    Only ``step_<N>`` folders with a scaledkd manifest are candidates. Those with a step above the newest one
    (left by an abandoned trajectory after a resume from an earlier checkpoint) go first.
    """
    current = _step_of(newest)
    ours = []
    for folder in root.iterdir():
        step = _step_of(folder.name)
        if step is None or folder.name == newest or not folder.is_dir() or read_manifest(folder) is None:
            continue
        ours.append((step <= current, step, folder))
    ours.sort(key=lambda item: (item[0], item[1]), reverse=True)
    kept = 1
    for _, _, folder in ours:
        if problem(folder, checksums=False) is not None:
            continue  # an incomplete one is neither counted nor deleted (a resume skips it)
        if kept < keep:
            kept += 1
            continue
        log.info("checkpoint retention (keep %d): deleting %s", keep, folder)
        _remove(folder)


# ------------------------------------------------------------------------------------------ resolve / load


def _candidates(root: Path) -> list[str]:
    """Tags to try in order: the one ``latest`` names, then older ``step_<N>`` (all of them without ``latest``)."""
    named = None
    latest = root / LATEST
    if latest.is_file():
        named = latest.read_text().strip() or None
    steps = sorted((s, p.name) for p in root.iterdir() if p.is_dir() and (s := _step_of(p.name)) is not None)
    if named is not None:
        limit = _step_of(named)
        older = [name for s, name in reversed(steps) if name != named and (limit is None or s < limit)]
        return [named, *older]
    return [name for _, name in reversed(steps)]


def _newest_complete(root: Path, checksums: bool) -> tuple[Path, str]:
    if not root.is_dir():
        raise NoCheckpoint(f"no checkpoint in {root} (the folder does not exist)")
    tags = _candidates(root)
    if not tags:
        raise NoCheckpoint(f"no checkpoint in {root}")
    skipped = []
    for tag in tags:
        why = problem(root / tag, checksums=checksums)
        if why is None:
            for name, reason in skipped:
                log.warning("checkpoint %s is incomplete (%s); skipped, using %s", root / name, reason, root / tag)
            return root, tag
        skipped.append((tag, why))
    details = "; ".join(f"{tag}: {why}" for tag, why in skipped)
    raise NoCheckpoint(f"no complete checkpoint in {root} ({details})")


def _resolve_here(run_dir: Path, resume: str, checksums: bool, what: str) -> tuple[Path, str]:
    if resume == LATEST:
        return _newest_complete(Path(run_dir) / CHECKPOINTS, checksums)
    path = Path(resume)
    if not path.exists() and _step_of(resume) is not None:
        path = Path(run_dir) / CHECKPOINTS / resume  # a bare tag: step_<N> of this run
    if not path.exists():
        raise NoCheckpoint(f"{what}={resume!r}: no such checkpoint folder ({path})")
    if not path.is_dir():
        raise CheckpointError(f"{what}={resume!r}: {path} is a file, not a checkpoint folder")
    if not (path / MANIFEST).exists():
        if (path / CHECKPOINTS).is_dir():  # a run folder: its newest complete checkpoint
            return _newest_complete(path / CHECKPOINTS, checksums)
        if (path / LATEST).is_file() or any(_step_of(p.name) is not None for p in path.iterdir() if p.is_dir()):
            return _newest_complete(path, checksums)  # a run's checkpoints folder
    why = problem(path, checksums=checksums)
    if why is not None:
        raise CheckpointError(f"{what}={resume!r}: {path} is not a complete scaledkd checkpoint: {why}")
    return path.parent, path.name


def resolve(run_dir: Path, resume: str, *, checksums: bool = True, what: str = "train.resume") -> tuple[Path, str]:
    """``latest``, a tag ``step_<N>``, a checkpoint folder, a run folder or its ``checkpoints`` folder ->
    (checkpoints root, tag) of a complete checkpoint.

    ``latest`` (and a run folder) take the newest complete checkpoint: one whose manifest, file sizes and (with
    ``checksums``) sha256 sums check out; incomplete ones are skipped with a warning naming them. A checkpoint
    named directly must be complete. With several ranks, rank 0 decides and tells the others (collective).
    ``what`` names the setting in messages (``train.resume``, ``--checkpoint``).

    Raises:
        NoCheckpoint: nothing complete to resume from (a ``FileNotFoundError``).
        CheckpointError: the named folder is not a complete checkpoint (a ``ValueError``).
    """
    if dist.world_size() <= 1:
        return _resolve_here(run_dir, resume, checksums, what)
    answer: Any
    if dist.is_main():
        try:
            root, tag = _resolve_here(run_dir, resume, checksums, what)
            answer = ("ok", str(root), tag)
        except (NoCheckpoint, CheckpointError) as err:
            answer = (type(err).__name__, str(err), None)
    else:
        answer = None
    answer = dist.broadcast_object(answer)
    if answer[0] == "ok":
        return Path(answer[1]), answer[2]
    raise (NoCheckpoint if answer[0] == "NoCheckpoint" else CheckpointError)(answer[1])


def _safe_globals() -> list[Any]:
    """The only non-container types a DeepSpeed checkpoint of ours holds (allow-listed for ``weights_only``)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _load_weights_only(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` that unpickles only tensors, plain containers and :func:`_safe_globals`: a crafted checkpoint
    is refused with :class:`CheckpointError` before any of its code can run."""
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "Unsupported" in ln or "WeightsUnpickler" in ln), lines[0] if lines else "")
            raise CheckpointError(f"{path} holds objects a scaledkd checkpoint never contains ({why[:300]}); refused "
                                  "to unpickle it (only tensors and plain data are loaded)") from None


class _WeightsOnlyEngine:
    """DeepSpeed's checkpoint engine with its ``load`` (``weights_only=False``) replaced by
    :func:`_load_weights_only`; everything else is the wrapped engine's."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return _load_weights_only(path, map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def verify_pickles(folder: Path) -> None:
    """Unpickle every ``*.pt`` of a checkpoint with ``weights_only=True`` (raises :class:`CheckpointError` on a
    crafted one): a check before code that would unpickle them freely (DeepSpeed's ``zero_to_fp32``)."""
    for path in sorted(Path(folder).glob("*.pt")):
        _load_weights_only(path, "cpu")


def load(engine, root: Path, tag: str) -> dict[str, Any]:
    """Load a checkpoint into ``engine``; returns scaledkd's loop state and restores this rank's RNG.

    The manifest and file sizes are checked first (checksums are checked by :func:`resolve`). Every file, ours and
    DeepSpeed's, is unpickled with ``weights_only=True`` (DeepSpeed's loader is swapped for the duration), so an
    untrusted checkpoint cannot run code.
    """
    folder = Path(root) / tag
    why = problem(folder, checksums=False)
    if why is not None:
        raise CheckpointError(f"cannot resume from {folder}: {why}")
    original = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyEngine(original)
    try:
        _, client = engine.load_checkpoint(str(root), tag=tag)
    except (AssertionError, OSError, EOFError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"cannot resume from {folder}: DeepSpeed could not load it ({err})") from err
    finally:
        engine.checkpoint_engine = original
    if client is None or "scaledkd" not in client:
        raise CheckpointError(f"cannot resume from {folder}: DeepSpeed found no scaledkd loop state in it")
    rng = folder / f"rng_rank{dist.rank()}.pt"
    if rng.is_file():
        _set_rng_state(_load_weights_only(rng, "cpu"))
    else:
        manifest = read_manifest(folder) or {}
        log.warning("%s has no RNG state for rank %d (it was written by %s ranks); random draws after the resume "
                    "differ from an uninterrupted run", folder, dist.rank(), manifest.get("world_size", "?"))
    return client["scaledkd"]


def data_state(root: Path, tag: str) -> dict[str, Any] | None:
    """This rank's data position saved with ``save(..., data_state=...)``, or None when the checkpoint has none."""
    path = Path(root) / tag / f"data_rank{dist.rank()}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"cannot resume from {path.parent}: {path.name} is not valid JSON ({err})") from None


def consolidated_state(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of a checkpoint on one process, whatever world size or ZeRO stage wrote it.

    A ZeRO-0 checkpoint is read with ``weights_only=True``; ZeRO shards are read by DeepSpeed's ``zero_to_fp32``,
    which unpickles them freely, so every file is first checked with ``weights_only=True`` (:func:`verify_pickles`).
    """
    folder = Path(root) / tag
    if list(folder.glob("*zero_pp_rank_*optim_states.pt")) or list(folder.glob("*zero_pp_rank_*model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        verify_pickles(folder)
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)  # DeepSpeed unpickles its files
        if state:
            return state
    files = sorted(folder.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed model states")
    return _load_weights_only(files[0], "cpu")["module"]
