"""DeepSpeed JSON configs as data: read, validate and resolve the student's (training) and the teacher's
(inference) config. Pure dictionaries, no DeepSpeed import, so the run plan and the memory planner read the same
resolved configs the engines are built from.

``"auto"`` values in the shipped JSONs are filled here from the recipe (batch sizes, clipping, precision) and, for
the student's ``reduce_bucket_size``, from its width, so a recipe and its DeepSpeed JSON never disagree.
"""
from __future__ import annotations

import copy
import json
from typing import Any

from .config import ConfigError, TrainConfig, resolve_resource

STUDENT_STAGES = (0, 1, 2, 3)
TEACHER_STAGES = (0, 3)  # a frozen teacher has no optimizer state to shard: replicated or partitioned


def read_ds_config(path: str, recipe_path: str | None = None) -> dict[str, Any]:
    """The JSON at ``path`` (looked up beside the cwd, the recipe, the package), as a dict."""
    resolved = resolve_resource(path, recipe_path)
    try:
        data = json.loads(resolved.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {str(resolved)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {str(resolved)!r} must be a JSON object, got {type(data).__name__}")
    return data


def zero_section(ds_config: dict[str, Any]) -> dict[str, Any]:
    return ds_config.get("zero_optimization") or {}


def zero_stage(ds_config: dict[str, Any], who: str = "DeepSpeed config") -> int:
    """``zero_optimization.stage`` as an int; a value that is not a whole number fails naming it."""
    raw = zero_section(ds_config).get("stage", 0)
    try:
        if isinstance(raw, bool):
            raise ValueError
        return int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{who}: zero_optimization.stage={raw!r} is not valid; choose one of 0, 1, 2, 3") from None


def offloaded(ds_config: dict[str, Any], what: str) -> bool:
    """Whether ``offload_<what>`` (``optimizer`` or ``param``) sends that state off the GPU."""
    return (zero_section(ds_config).get(f"offload_{what}") or {}).get("device", "none") not in ("none", None)


def _fill(node: dict[str, Any], key: str, value: Any) -> None:
    if node.get(key, "auto") == "auto":
        node[key] = value


def _precision(cfg: dict[str, Any], precision: str) -> None:
    for name in ("bf16", "fp16"):
        section = cfg.setdefault(name, {})
        _fill(section, "enabled", precision == name)


def student_ds_config(raw: dict[str, Any], train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The student's training config with every ``auto`` filled from ``train`` for ``world_size`` ranks."""
    cfg = copy.deepcopy(raw)
    stage = zero_stage(cfg, "student DeepSpeed config")
    if stage not in STUDENT_STAGES:
        raise ConfigError(f"student DeepSpeed config: zero_optimization.stage={stage}; valid: 0, 1, 2, 3")
    _fill(cfg, "train_micro_batch_size_per_gpu", train.batch_size)
    _fill(cfg, "gradient_accumulation_steps", train.grad_accum)
    _fill(cfg, "train_batch_size", train.batch_size * train.grad_accum * world_size)
    _fill(cfg, "gradient_clipping", train.grad_clip)
    _precision(cfg, train.precision)
    cfg.setdefault("steps_per_print", 10**9)  # scaledkd logs; keep DeepSpeed's own step log quiet
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ConfigError(
            "student DeepSpeed config: remove 'optimizer'/'scheduler'; scaledkd builds them from train.lr, "
            "train.weight_decay and train.warmup_ratio so projections and per-group settings are included"
        )
    if zero_section(cfg).get("offload_optimizer"):
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)  # a client torch optimizer with offload
    return cfg


def fill_bucket_sizes(cfg: dict[str, Any], hidden_size: int) -> dict[str, Any]:
    """``reduce_bucket_size: "auto"`` -> ``hidden_size**2`` elements (what transformers' Trainer fills in).

    DeepSpeed's own default, 5e8 elements, is a buffer of 2 GiB (fp32) on every rank whatever the model: more than
    the whole gradient partition of a student of a few hundred million parameters. A bucket of ``h**2`` elements is
    one weight matrix's worth, large enough to keep reductions efficient. Returns a copy; a number is kept.
    """
    out = copy.deepcopy(cfg)
    zero = out.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("reduce_bucket_size") == "auto":
        zero["reduce_bucket_size"] = int(hidden_size) ** 2
    return out


def teacher_ds_config(raw: dict[str, Any], train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The teacher's inference config: stage 0 (replicated) or 3 (partitioned), no optimizer."""
    cfg = copy.deepcopy(raw)
    stage = zero_stage(cfg, "teacher DeepSpeed config")
    if stage not in TEACHER_STAGES:
        raise ConfigError(
            f"teacher DeepSpeed config: zero_optimization.stage={stage}; a frozen teacher is either replicated "
            "(stage 0) or partitioned for inference (stage 3) — stages 1/2 shard optimizer state it does not have"
        )
    _fill(cfg, "train_micro_batch_size_per_gpu", train.batch_size)
    _fill(cfg, "gradient_accumulation_steps", 1)
    _fill(cfg, "train_batch_size", train.batch_size * world_size)
    _precision(cfg, train.precision)
    cfg.setdefault("steps_per_print", 10**9)
    if stage == 3:
        # A forward-only teacher has nothing to overlap a prefetch with, and DeepSpeed's prefetch re-arms at every
        # sub-module up to stage3_max_live_parameters (1e9 by default): each forward gathered the whole teacher on
        # every rank (measured: +0.8 GiB per rank at 233M, benchmarks/results/scale.md). Each module's shards are
        # fetched when it runs instead; a config that sets the key keeps its value.
        cfg.setdefault("zero_optimization", {}).setdefault("stage3_prefetch_bucket_size", 0)
    return cfg
