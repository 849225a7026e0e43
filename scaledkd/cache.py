"""The teacher-output cache: run the teacher once over the training rows, store what the losses read, and train
from the stored outputs without ever loading the teacher.

``scaledkd cache RECIPE teacher.cache=DIR`` (:func:`build_cache`) runs the recipe's teacher over every row of the
prepared training split (the rows a run trains on, in their order) and stores, per row, exactly what the recipe's
losses read from the teacher: its logits (``[C]`` per row, when a loss reads them; for a causal LM the ``k``
largest per token, ids and values, ``[n_i, k]``) and its tapped hidden states / Q / K / V, each ``[n_i, D]`` for the
row's ``n_i`` real tokens (unpadded; a packed causal-LM row is all real tokens). A run with ``teacher.cache: DIR`` then
never loads the teacher: :class:`CachedTeacher` stands in for the :class:`~scaledkd.engine.module.TeacherRunner`
and rebuilds, for each micro-batch (its rows named by the batch's ``example_ids``), the padded
:class:`~scaledkd.losses.ModelOutputs` the live teacher would return. Padding positions hold zeros; every loss
masks them (padded keys leave the softmax, padded queries and tokens leave the means).

``DIR`` holds ``scaledkd_cache.json`` (the manifest, written last) and ``shard_NNNNN.safetensors`` files of
consecutive rows. In a shard, each tap (``hidden.3``, ``q.2``, ...) is one ``[T, D]`` tensor (its rows' tokens
concatenated), ``offsets [n + 1]`` int64 says where each row starts, and ``logits`` is ``[n, C]`` (causal LMs:
``logits.topk_values`` / ``logits.topk_ids`` ``[T, k]`` per token instead). Shards are
memory-mapped when read: every rank opens them, and no rank reads the whole cache into memory.

The manifest's key is what the stored outputs depend on: the teacher's weight files (sha256) and config, the
task head and precision, the tokenizer's files, the tokenisation settings, the training examples (a hash of
their text) and the taps. A run whose key differs, or that reads a tap the cache lacks, is refused with a message
naming what changed. Recipes whose teacher sees inputs drawn during training (``train.mixup``, ``data.on_policy``),
streamed data, and causal-LM logit losses over the whole vocabulary (the cache holds the top ``k``; ``lm_kd`` needs
``top_k <= k``) are refused with the reason.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data, models
from .config import Config, ConfigError
from .files import sha256_file, write_json
from .inputs import EXAMPLE_IDS, MODEL_INPUTS, model_inputs
from .losses import ModelOutputs
from .taps import Captures, Tap, TapManager

log = logging.getLogger("scaledkd")

FORMAT = 1
MANIFEST = "scaledkd_cache.json"
SHARD_BYTES = 512 * 2**20  # rows are buffered in memory until a shard holds this much, then written
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model",
                   "chat_template.jinja")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TOPK_VALUES, TOPK_IDS = "logits.topk_values", "logits.topk_ids"  # causal LMs: per token, [T, k] each


class StaleCache(ConfigError):
    """``teacher.cache`` names a cache built for other inputs, another teacher or other taps."""


# ------------------------------------------------------------------------------------------ the key


def tap_name(tap: Tap) -> str:
    """The tensor name of a tap in a shard: ``hidden.3``, ``q.2``."""
    return f"{tap.kind}.{tap.layer}"


def _per_token(value, batch: int) -> torch.Tensor:
    """A tap's capture as one ``[B, L, D]`` tensor: rotary ``(cos, sin)`` (each ``[B or 1, L, d]``, shared by the
    rows when their positions are) side by side, one copy per row."""
    if isinstance(value, tuple):
        value = torch.cat(value, dim=-1)
    return value.expand(batch, *value.shape[1:])


def teacher_reads(plan) -> tuple[list[Tap], bool]:
    """What the recipe's losses read from the teacher: its taps (sorted) and whether any reads its logits."""
    taps: set[Tap] = set()
    for lp in plan.losses:
        taps |= lp.teacher_taps
    logits = any({"teacher", "logits"} <= lp.needs for lp in plan.losses)
    return sorted(taps), logits


def logit_top_k(plan) -> int | None:
    """Causal LMs: the most teacher logits per token any loss compares (what the cache must hold at least)."""
    ks = [lp.teacher_top_k for lp in plan.losses
          if {"teacher", "logits"} <= lp.needs and lp.teacher_top_k is not None]
    return max(ks) if plan.task == "causal_lm" and ks else None


def check_cacheable(plan) -> None:
    """Refuse a recipe whose teacher outputs cannot be computed ahead of training.

    Raises:
        ConfigError: no teacher, mixup, on-policy or streamed data, a causal-LM logit loss over the whole
            vocabulary, or no loss reading the teacher (the reason named).
    """
    cfg = plan.cfg
    if cfg.teacher is None:
        raise ConfigError("teacher.cache needs a teacher; this recipe has teacher: null")
    if cfg.data.on_policy is not None:
        raise ConfigError("teacher.cache cannot serve data.on_policy: the teacher scores the student's own "
                          "continuations, sampled anew at every step; drop teacher.cache (or data.on_policy)")
    if cfg.data.streaming:
        raise ConfigError("teacher.cache cannot serve data.streaming: streamed rows have no fixed place in a "
                          "training split to store their outputs under; drop teacher.cache (or data.streaming)")
    if plan.task == "causal_lm":
        for lp in plan.losses:
            if {"teacher", "logits"} <= lp.needs and lp.teacher_top_k is None:
                raise ConfigError(f"teacher.cache stores a causal-LM teacher's top-k logits per token, but loss "
                                  f"{lp.key!r} compares the whole vocabulary; set its params.top_k (e.g. 64)")
    if cfg.train.mixup:
        raise ConfigError("teacher.cache cannot serve train.mixup=true: the teacher must see the student's mixed "
                          "inputs, drawn anew at every step, so its outputs cannot be computed ahead; drop "
                          "teacher.cache (or train.mixup)")
    taps, logits = teacher_reads(plan)
    pair_maps = sorted({t.layer for t in taps if t.kind == "bias"})
    if pair_maps:
        # Per-token tensors are stored per row unpadded; a relative-position bias is [H, L, L] per row, which would
        # make the cache grow with L^2 and costs the teacher only an embedding lookup to recompute.
        raise ConfigError(f"teacher.cache does not store attention-score biases (teacher {plan.teacher_config.model_type}"
                          f" adds a relative-position bias [B, H, L, L] at blocks {pair_maps}, read by this recipe's "
                          "attention losses); run the attention losses with the live teacher (drop teacher.cache)")
    if not taps and not logits:
        raise ConfigError("teacher.cache: no loss of this recipe reads the teacher's logits or layers; there is "
                          "nothing to cache")


def model_folder(path: str) -> Path:
    """The local folder (or single weight file, e.g. a GGUF file) of a model: ``package:``, a folder, a file, or a
    hub id already in the local hub cache."""
    local = Path(models.resolve_model_path(path)).expanduser()
    if local.is_dir() or local.is_file():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(local, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - any failure means: no local copy to hash
        raise ValueError(f"teacher.cache: cannot find the files of teacher {path!r} to hash ({err}); use a local "
                         "model folder") from None


def _texts_digest(examples) -> str:
    """sha256 of the examples' inputs (every column but the labels, which the teacher never sees)."""
    columns = [c for c in examples.column_names if c != "label"]
    digest = hashlib.sha256(json.dumps(columns).encode())
    for chunk in examples.iter(batch_size=4096):
        digest.update(json.dumps([chunk[c] for c in columns], default=str).encode())
    return digest.hexdigest()


def rows_digest(rows) -> dict[str, Any]:
    """Count and sha256 of the tokenised training rows' model inputs: what the teacher's forward reads."""
    columns = [c for c in MODEL_INPUTS if c in rows.column_names]
    digest = hashlib.sha256(json.dumps(columns).encode())
    for chunk in rows.iter(batch_size=4096):
        digest.update(json.dumps([chunk[c] for c in columns]).encode())
    return {"count": len(rows), "sha256": digest.hexdigest()}


def _safetensors_keys(path: Path) -> list[str]:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return [k for k in json.loads(f.read(size)) if k != "__metadata__"]


def fresh_parameters(plan, files: list[Path]) -> list[str]:
    """Teacher parameters its safetensors checkpoint lacks (a task head it was never trained with): the run draws
    them from ``train.seed`` when it loads the teacher, so a cache of such a teacher is keyed on the seed too.
    Empty when the weights are not safetensors files (nothing to compare cheaply)."""
    stored: set[str] = set()
    for path in files:
        if path.name.endswith(".safetensors"):
            stored |= set(_safetensors_keys(path))
    if not stored:
        return []
    with torch.device("meta"):  # names only: no memory, no random numbers
        model = models.auto_class(plan.task).from_config(plan.teacher_config)
    prefix = model.base_model_prefix
    return sorted(name for name, _ in model.named_parameters()
                  if not {name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}"} & stored)


def cache_key(plan) -> dict[str, dict[str, Any]]:
    """What the stored outputs depend on, by component (compared by :func:`stale_reasons`)."""
    cfg = plan.cfg
    folder = model_folder(plan.teacher_path)
    files = [folder] if folder.is_file() else sorted(folder.iterdir())
    weights = {p.name: sha256_file(p) for p in files
               if p.is_file() and (p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json"))}
    if not weights:
        raise ValueError(f"teacher.cache: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {str(folder)!r} to hash")
    fresh = fresh_parameters(plan, [p for p in files if p.name in weights])
    folder = folder.parent if folder.is_file() else folder
    config = folder / "config.json"
    tokenizer_folder = model_folder(plan.tokenizer_source)
    tokenizer_folder = tokenizer_folder.parent if tokenizer_folder.is_file() else tokenizer_folder
    tokenizer = {name: sha256_file(tokenizer_folder / name) for name in TOKENIZER_FILES
                 if (tokenizer_folder / name).is_file()}
    d = cfg.data
    teacher_config = {"config.json": sha256_file(config) if config.is_file() else None, "task": plan.task,
                      "num_labels": plan.spec.num_labels, "train.precision": cfg.train.precision}
    if fresh:
        teacher_config |= {"initialised from train.seed": fresh, "train.seed": cfg.train.seed}
    return {
        "teacher weights": weights,
        "teacher config": teacher_config,
        "tokenizer": tokenizer,
        "tokenisation": {"data.max_length": d.max_length, "data.packing": d.packing, "data.documents": d.documents},
        "training examples": {"count": len(plan.examples["train"]),
                              "text sha256": _texts_digest(plan.examples["train"])},
    }


def data_settings(cfg: Config) -> dict[str, Any]:
    """The settings that choose the training examples: named in a message when the examples changed."""
    d = cfg.data
    return {"data.task": d.task, "data.source": d.source, "data.data_dir": d.data_dir, "data.train_file": d.train_file,
            "data.text_columns": d.text_columns, "data.max_train_samples": d.max_train_samples,
            "data.heldout_fraction": d.heldout_fraction, "train.seed": cfg.train.seed,
            "data.supplementary": dataclasses.asdict(d.supplementary) if d.supplementary else None}


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def stale_reasons(old: Mapping[str, Any], new: Mapping[str, Any], old_settings: Mapping[str, Any] | None = None,
                  new_settings: Mapping[str, Any] | None = None) -> list[str]:
    """What differs between a cache's key and the recipe's, one phrase per component (empty: the same).

    Files name themselves (``teacher weights changed: model.safetensors``); settings show both values.
    """
    reasons = []
    for component in new.keys() | old.keys():
        a, b = old.get(component, {}), new.get(component, {})
        if a == b:
            continue
        parts = []
        for name in sorted(a.keys() | b.keys()):
            if a.get(name) == b.get(name):
                continue
            if name not in a:
                parts.append(f"{name} added")
            elif name not in b:
                parts.append(f"{name} removed")
            elif _is_digest(a[name]) or _is_digest(b[name]):
                parts.append(f"{name} differs")
            else:
                parts.append(f"{name}: {a[name]!r} -> {b[name]!r}")
        if component == "training examples" and old_settings is not None and new_settings is not None:
            parts += [f"{k}: {old_settings.get(k)!r} -> {v!r}" for k, v in new_settings.items()
                      if old_settings.get(k) != v]
        reasons.append(f"{component} changed ({'; '.join(parts)})")
    return sorted(reasons)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a cache folder, None when ``folder`` holds no (finished) cache."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def check_cache(plan) -> None:
    """``teacher.cache`` can serve this run: the recipe is cacheable and the cache matches its key and taps.

    Run by :func:`scaledkd.build.resolve`, so ``validate`` refuses what ``distill`` would. The tokenised rows are
    compared when the run opens the cache (:meth:`TeacherCache.open`).

    Raises:
        ConfigError: the recipe cannot use a cache (:func:`check_cacheable`), or ``teacher.cache`` holds none.
        StaleCache: the cache was built for another teacher, tokenizer, data or taps; the message names what.
    """
    check_cacheable(plan)
    folder = Path(plan.cfg.teacher.cache)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ConfigError(f"teacher.cache={str(folder)!r} holds no teacher cache ({MANIFEST}); build it with "
                          f"`scaledkd cache RECIPE teacher.cache={folder}`")
    problems = _mismatch(manifest, plan)
    if problems:
        raise StaleCache(f"teacher.cache={str(folder)!r} is stale: {'; '.join(problems)}; rebuild it with "
                         "`scaledkd cache RECIPE ... --overwrite`")


def _mismatch(manifest: Mapping[str, Any], plan) -> list[str]:
    if manifest.get("format") != FORMAT:
        return [f"cache format {manifest.get('format')!r} is not this version's {FORMAT}"]
    problems = stale_reasons(manifest["key"], cache_key(plan), manifest.get("data settings"),
                             data_settings(plan.cfg))
    taps, logits = teacher_reads(plan)
    missing = [tap_name(t) for t in taps if tap_name(t) not in manifest["taps"]]
    if missing:
        problems.append(f"taps changed (the recipe reads {', '.join(missing)}, which the cache does not hold; it "
                        f"holds {', '.join(manifest['taps']) or 'none'})")
    stored_k = manifest.get("top_k")
    if plan.task == "causal_lm":
        for lp in plan.losses:
            if {"teacher", "logits"} <= lp.needs and lp.teacher_top_k > (stored_k or 0):
                problems.append(f"top-k changed (loss {lp.key!r} compares the teacher's top {lp.teacher_top_k} "
                                f"logits per token; the cache holds its top {stored_k})")
    elif logits and not manifest["logits"]:
        problems.append("taps changed (the recipe reads the teacher's logits, which the cache does not hold)")
    return problems


# ------------------------------------------------------------------------------------------ reading


_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.int16, torch.bfloat16),
           "I64": (np.int64, None), "I32": (np.int32, None)}


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a copy-on-write memory map: pages are read when a row is touched.

    Read this way, not through ``safetensors.safe_open``, because a batch slices a few rows out of every tap: a
    view of a mapped array costs a Python slice, where ``get_slice`` costs a call into the library per row and tap.
    (The format: 8-byte little-endian header length, a JSON header of dtype/shape/byte range per tensor, then
    the data, each tensor aligned to its element size.)
    """
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        np_dtype, view = _DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            tensor = torch.from_numpy(np.empty(shape, dtype=np_dtype))
        else:
            tensor = torch.from_numpy(np.memmap(path, dtype=np_dtype, mode="c", offset=8 + size + start, shape=shape))
        out[name] = tensor.view(view) if view is not None else tensor
    return out


class TeacherCache:
    """A built cache, memory-mapped: per-row teacher outputs by training-row index."""

    def __init__(self, folder: Path, manifest: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.taps = list(manifest["taps"])
        self.has_logits = bool(manifest["logits"])
        self.top_k = manifest.get("top_k")  # causal LMs: the teacher's top-k logits per token (TOPK_IDS/VALUES)
        self.vocab = manifest.get("vocab")
        self.shards = [mmap_safetensors(self.folder / s["file"]) for s in manifest["shards"]]
        self.offsets = [s["offsets"].tolist() for s in self.shards]
        self.starts = []
        total = 0
        for s in manifest["shards"]:
            self.starts.append(total)
            total += int(s["rows"])
        self.num_rows = total

    @classmethod
    def open(cls, folder: str | Path, rows) -> TeacherCache:
        """Open the cache in ``folder`` for the training ``rows`` of a run, refusing it when those rows are not the
        rows it was built from (:func:`rows_digest`)."""
        manifest = read_manifest(Path(folder))
        if manifest is None:
            raise ConfigError(f"teacher.cache={str(folder)!r} holds no teacher cache ({MANIFEST})")
        want = rows_digest(rows)
        if manifest["rows"] != want:
            raise StaleCache(f"teacher.cache={str(folder)!r} is stale: the tokenised training rows changed "
                             f"({manifest['rows']['count']} cached rows, {want['count']} now, or their tokens "
                             "differ); rebuild it with `scaledkd cache RECIPE ... --overwrite`")
        return cls(folder, manifest)

    def locate(self, ids: Iterable[int]) -> list[tuple[int, int]]:
        """``(shard, row in shard)`` of each training row index."""
        out = []
        for index in ids:
            if not 0 <= index < self.num_rows:
                raise IndexError(f"training row {index} is outside the cache's {self.num_rows} rows")
            shard = bisect.bisect_right(self.starts, index) - 1
            out.append((shard, index - self.starts[shard]))
        return out

    def tokens(self, name: str, where: list[tuple[int, int]]) -> torch.Tensor:
        """The stored tokens of one tap for rows at ``where`` (:meth:`locate`), concatenated: ``[sum n_i, D]``."""
        return torch.cat([self.shards[s][name][self.offsets[s][j]:self.offsets[s][j + 1]] for s, j in where])

    def logits(self, where: list[tuple[int, int]]) -> torch.Tensor:
        """The stored logits of the rows at ``where``: ``[B, C]``."""
        return torch.stack([self.shards[s]["logits"][j] for s, j in where])


class CachedTeacher:
    """Stands in for :class:`~scaledkd.engine.module.TeacherRunner`: ``batch -> ModelOutputs`` from the cache.

    The batch's ``example_ids [B]`` name its rows of the training split. Each tap becomes ``[B, L, D]`` with the
    stored values at the real tokens (``attention_mask``; every position of a batch without one) and zeros
    elsewhere; logits are ``[B, C]``.

    Args:
        cache: the opened cache.
        taps: what the losses read from the teacher (each must be in the cache).
        device: where the outputs go (the batch's device).
    """

    def __init__(self, cache: TeacherCache, taps: Iterable[Tap], device: torch.device | None = None) -> None:
        self.cache = cache
        self.taps = sorted(taps)
        missing = [tap_name(t) for t in self.taps if tap_name(t) not in cache.taps]
        if missing:
            raise StaleCache(f"teacher.cache={str(cache.folder)!r} holds no {', '.join(missing)}")
        self.device = device

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, torch.Tensor]) -> ModelOutputs:
        if EXAMPLE_IDS not in batch:
            raise RuntimeError(f"a batch without {EXAMPLE_IDS!r} cannot be looked up in the teacher cache")
        where = self.cache.locate(batch[EXAMPLE_IDS].tolist())
        device = self.device or batch["input_ids"].device
        B, L = batch["input_ids"].shape
        mask = batch.get("attention_mask")
        # The real tokens, as the build selected them: the attention mask, or every position of unpadded rows.
        real = mask.bool() if mask is not None else torch.ones(B, L, dtype=torch.bool, device=device)
        n_real = int(real.sum())
        captures = Captures()
        for tap in self.taps:
            flat = self.cache.tokens(tap_name(tap), where)
            if flat.shape[0] != n_real:
                raise StaleCache(f"teacher.cache={str(self.cache.folder)!r}: the batch has {n_real} real tokens, the "
                                 f"cache {flat.shape[0]} for its rows; rebuild the cache")
            # Only the real tokens travel to the device; the padding is filled there.
            full = torch.zeros(B, L, flat.shape[-1], dtype=flat.dtype, device=real.device)
            full[real] = flat.to(real.device)
            full = full.to(device)
            getattr(captures, tap.kind)[tap.layer] = tuple(full.chunk(2, dim=-1)) if tap.kind == "rope" else full
        logits = self.cache.logits(where).to(device) if self.cache.has_logits else None
        if self.cache.top_k:
            logits = self._topk_logits(where, real, n_real)
        return ModelOutputs(logits=logits, captures=captures)


    def _topk_logits(self, where: list[tuple[int, int]], real: torch.Tensor, n_real: int) -> torch.Tensor:
        """``[B, L, V]`` teacher logits: the stored top-k values at their ids, ``-inf`` at every other id (so a
        loss's ``top_k <= k`` selects exactly the live teacher's top ids and values), zeros at padding."""
        values = self.cache.tokens(TOPK_VALUES, where).to(real.device)
        ids = self.cache.tokens(TOPK_IDS, where).to(real.device, torch.long)
        if values.shape[0] != n_real:
            raise StaleCache(f"teacher.cache={str(self.cache.folder)!r}: the batch has {n_real} real tokens, the "
                             f"cache {values.shape[0]} for its rows; rebuild the cache")
        rows = torch.full((n_real, self.cache.vocab), float("-inf"), dtype=values.dtype, device=real.device)
        rows.scatter_(1, ids, values)
        logits = torch.zeros(*real.shape, self.cache.vocab, dtype=values.dtype, device=real.device)
        logits[real] = rows
        return logits


# ------------------------------------------------------------------------------------------ building


class _ShardWriter:
    """Buffers rows and writes them as consecutive shards of about :data:`SHARD_BYTES`."""

    def __init__(self, folder: Path, names: list[str], logits: bool, shard_bytes: int) -> None:
        self.folder = folder
        self.names = names
        self.with_logits = logits
        self.shard_bytes = shard_bytes
        self.shards: list[dict[str, Any]] = []
        self.bytes = 0
        self._reset()

    def _reset(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self.lengths: list[int] = []
        self.logit_rows: list[torch.Tensor] = []
        self.pending = 0

    def add(self, lengths: list[int], tokens: dict[str, torch.Tensor], logits: torch.Tensor | None) -> None:
        """One batch of rows: their real-token counts, each tap's ``[sum n_i, D]`` and the logits ``[B, C]``."""
        self.lengths += lengths
        for name, value in tokens.items():
            self.parts[name].append(value.cpu())
            self.pending += value.numel() * value.element_size()
        if self.with_logits:
            self.logit_rows.append(logits.cpu())
            self.pending += logits.numel() * logits.element_size()
        if self.pending >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.lengths:
            return
        tensors = {n: torch.cat(p).contiguous() for n, p in self.parts.items()}
        tensors["offsets"] = torch.tensor([0, *np.cumsum(self.lengths).tolist()], dtype=torch.int64)
        if self.with_logits:
            tensors["logits"] = torch.cat(self.logit_rows).contiguous()
        name = f"shard_{len(self.shards):05d}.safetensors"
        save_file(tensors, str(self.folder / name))
        self.bytes += (self.folder / name).stat().st_size
        self.shards.append({"file": name, "rows": len(self.lengths)})
        self._reset()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def build_cache(cfg: Config, *, batch_size: int | None = None, overwrite: bool = False, top_k: int | None = None,
                shard_bytes: int = SHARD_BYTES) -> dict[str, Any]:
    """``scaledkd cache``: run the teacher over the training rows and write the cache to ``teacher.cache``.

    One process builds the cache (on the GPU when there is one); every rank of later runs reads it. The cache is
    written to a sibling folder and renamed into place when complete, so an interrupted build leaves no
    half-cache behind. An up-to-date cache is kept as it is.

    Args:
        batch_size: rows per teacher forward (default ``train.batch_size``).
        overwrite: replace a stale cache in ``teacher.cache`` (never a folder that holds anything else).
        top_k: causal LMs: the teacher logits kept per token (default: the largest ``top_k`` of the recipe's
            logit losses; at least that).

    Returns:
        A summary: folder, rows, shards, bytes, bytes per row, seconds, and whether it was ``built``.

    Raises:
        ConfigError: no ``teacher.cache``, a recipe that cannot be cached, a folder that is not a cache, or a stale
            cache without ``overwrite``.
    """
    from .build import resolve

    if cfg.teacher is None or not cfg.teacher.cache:
        raise ConfigError("scaledkd cache writes to teacher.cache; set it (e.g. teacher.cache=runs/cache_sst2)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("scaledkd cache runs as one process (it writes one folder); start it without a launcher, "
                          "then train with teacher.cache on any number of ranks")
    dest = Path(cfg.teacher.cache)
    # The plan of the recipe without the cache (the cache is what is being built); the output folder is not used.
    plan = resolve(dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache=None)), world_size=1,
                   check_output=False)
    check_cacheable(plan)
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"teacher.cache={str(dest)!r} is a file, not a folder")
    manifest = read_manifest(dest)
    if dest.is_dir() and any(dest.iterdir()) and manifest is None:
        raise ConfigError(f"teacher.cache={str(dest)!r} is not empty and holds no teacher cache ({MANIFEST}); "
                          "choose another folder")

    t0 = time.perf_counter()
    tokenizer = models.load_tokenizer(plan.tokenizer_source)
    causal_lm = plan.task == "causal_lm"
    need_k = logit_top_k(plan)
    if causal_lm and top_k is not None and need_k is not None and top_k < need_k:
        raise ConfigError(f"--top-k {top_k} keeps fewer teacher logits per token than the recipe compares "
                          f"(top_k={need_k}); use --top-k {need_k} or more")
    top_k = (top_k or need_k) if causal_lm else None
    train = data.prepare_split(cfg.data, tokenizer, "train", cfg.train.seed, causal_lm=causal_lm,
                               examples=plan.examples["train"])
    rows = train.rows
    key, digest = cache_key(plan), rows_digest(rows)
    if manifest is not None:
        problems = _mismatch(manifest, plan)
        if not problems and manifest["rows"] != digest:
            problems = ["the tokenised training rows changed"]
        if not problems:
            log.info("teacher.cache %s is up to date; nothing to build", dest)
            return {"cache": str(dest), "built": False, "rows": digest["count"], "shards": len(manifest["shards"]),
                    "bytes": manifest["bytes"], "bytes_per_row": manifest["bytes"] / max(1, digest["count"])}
        if not overwrite:
            raise StaleCache(f"teacher.cache={str(dest)!r} holds a stale cache: {'; '.join(problems)}; pass "
                             "--overwrite to rebuild it")

    taps, with_logits = teacher_reads(plan)
    names = [tap_name(t) for t in taps]
    with_logits = with_logits and not causal_lm  # a causal LM's are stored per token, as top-k
    stored = names + ([TOPK_VALUES, TOPK_IDS] if top_k else [])
    device = _device()
    fresh = key["teacher config"].get("initialised from train.seed")
    if fresh:
        log.warning("teacher %s: its checkpoint lacks %s; they are drawn from train.seed=%d as a run would draw them, "
                    "and the cache is valid for that seed only", plan.teacher_path, ", ".join(fresh), cfg.train.seed)
    torch.manual_seed(cfg.train.seed)  # as the run seeds itself before it loads the teacher
    teacher = models.freeze(models.load_pretrained(plan.teacher_path, plan.task, plan.spec.num_labels,
                                                   PRECISIONS[cfg.train.precision])).to(device)
    tap_manager = TapManager(teacher, taps, detach=True)
    batch_size = batch_size or cfg.train.batch_size
    work = dest.with_name(f".{dest.name}.building-{os.getpid()}")
    work.mkdir(parents=True)
    try:
        writer = _ShardWriter(work, stored, with_logits, shard_bytes)
        bar = None
        if cfg.train.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows), desc="cache", unit="row", dynamic_ncols=True)
        for start in range(0, len(rows), batch_size):
            batch = train.collate([rows[j] for j in range(start, min(len(rows), start + batch_size))])
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad(), tap_manager.capture() as captures:
                out = teacher(**model_inputs(batch))
            tap_manager.check_complete(captures)
            mask = batch.get("attention_mask")
            real = mask.bool() if mask is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)
            tokens = {tap_name(t): _per_token(captures.get(t), real.shape[0])[real] for t in taps}
            if top_k:
                vocab = out.logits.shape[-1]
                values, ids = out.logits[real].topk(top_k, dim=-1)  # [T, k]
                tokens |= {TOPK_VALUES: values, TOPK_IDS: ids.to(torch.int32)}
            writer.add(real.sum(1).tolist(), tokens, out.logits.detach() if with_logits else None)
            if bar is not None:
                bar.update(real.shape[0])
        writer.flush()
        if bar is not None:
            bar.close()
        tap_manager.remove()
        seconds = time.perf_counter() - t0
        write_json(work / MANIFEST, {
            "format": FORMAT, "key": key, "data settings": data_settings(cfg), "rows": digest, "taps": names,
            "logits": with_logits, "top_k": top_k, "vocab": vocab if top_k else None, "dtype": str(next(teacher.parameters()).dtype).removeprefix("torch."),
            "teacher": plan.teacher_path, "shards": writer.shards, "bytes": writer.bytes,
            "build_seconds": round(seconds, 3),
        })
        _swap_in(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # our own half-written folder, never the user's
        raise
    summary = {"cache": str(dest), "built": True, "rows": len(rows), "shards": len(writer.shards),
               "taps": names, "logits": with_logits, "top_k": top_k, "bytes": writer.bytes,
               "bytes_per_row": writer.bytes / max(1, len(rows)), "seconds": round(seconds, 3)}
    log.info("teacher cache %s: %d rows, %d shard(s), %.1f MiB (%.0f bytes per row), %.1f s", dest, len(rows),
             len(writer.shards), writer.bytes / 2**20, summary["bytes_per_row"], seconds)
    return summary


def _swap_in(work: Path, dest: Path) -> None:
    """Put the finished cache ``work`` at ``dest``; an old cache there is moved aside, then deleted."""
    old = None
    if dest.is_dir():
        if any(dest.iterdir()):
            old = dest.with_name(f".{dest.name}.replaced-{os.getpid()}")
            dest.rename(old)  # only ever a cache: build_cache refused any other non-empty folder
        else:
            dest.rmdir()
    work.rename(dest)
    if old is not None:
        shutil.rmtree(old)
