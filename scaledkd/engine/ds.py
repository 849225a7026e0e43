"""DeepSpeed configs and engines: one config for the student (training) and its own for the teacher (inference).

``"auto"`` values in the shipped JSONs are filled here from the recipe (batch sizes, clipping, precision), so a
recipe and its DeepSpeed JSON never disagree.
"""
from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from typing import Any

from ..config import ConfigError, TrainConfig, resolve_resource
from . import dist


def read_ds_config(path: str, recipe_path: str | None = None) -> dict[str, Any]:
    resolved = resolve_resource(path, recipe_path)
    try:
        return json.loads(resolved.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {str(resolved)!r} is not valid JSON: {err}") from None


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _fill(node: dict[str, Any], key: str, value: Any) -> None:
    if node.get(key, "auto") == "auto":
        node[key] = value


def _precision(cfg: dict[str, Any], precision: str) -> None:
    for name in ("bf16", "fp16"):
        section = cfg.setdefault(name, {})
        _fill(section, "enabled", precision == name)


def student_ds_config(raw: dict[str, Any], train: TrainConfig) -> dict[str, Any]:
    cfg = copy.deepcopy(raw)
    _fill(cfg, "train_micro_batch_size_per_gpu", train.batch_size)
    _fill(cfg, "gradient_accumulation_steps", train.grad_accum)
    _fill(cfg, "train_batch_size", train.batch_size * train.grad_accum * dist.world_size())
    _fill(cfg, "gradient_clipping", train.grad_clip)
    _precision(cfg, train.precision)
    cfg.setdefault("steps_per_print", 10**9)  # scaledkd logs; keep DeepSpeed's own step log quiet
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ConfigError(
            "student DeepSpeed config: remove 'optimizer'/'scheduler'; scaledkd builds them from train.lr, "
            "train.weight_decay and train.warmup_ratio so projections and per-group settings are included"
        )
    if cfg.get("zero_optimization", {}).get("offload_optimizer"):
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)  # a client torch optimizer with offload
    stage = zero_stage(cfg)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"student DeepSpeed config: zero_optimization.stage={stage}; valid: 0, 1, 2, 3")
    return cfg


def teacher_ds_config(raw: dict[str, Any], train: TrainConfig) -> dict[str, Any]:
    cfg = copy.deepcopy(raw)
    stage = zero_stage(cfg)
    if stage not in (0, 3):
        raise ConfigError(
            f"teacher DeepSpeed config: zero_optimization.stage={stage}; a frozen teacher is either replicated "
            "(stage 0) or partitioned for inference (stage 3) — stages 1/2 shard optimizer state it does not have"
        )
    _fill(cfg, "train_micro_batch_size_per_gpu", train.batch_size)
    _fill(cfg, "gradient_accumulation_steps", 1)
    _fill(cfg, "train_batch_size", train.batch_size * dist.world_size())
    _precision(cfg, train.precision)
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


@contextlib.contextmanager
def load_context(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """Partition at load time under ZeRO-3, and only for the model loaded inside this block.

    transformers partitions every ``from_pretrained`` while a stage-3 ``HfDeepSpeedConfig`` is alive, and a
    partitioned load needs all ranks. Keeping the config alive only around one model's load lets the teacher and
    the student use different stages, and keeps rank-local loads (student built from teacher layers, export)
    from deadlocking.
    """
    if ds_config is None or zero_stage(ds_config) != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (weakly referenced by transformers while alive)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep


def initialize(model, ds_config: dict[str, Any], optimizer=None, lr_scheduler=None):
    """``deepspeed.initialize`` with scaledkd's process group; returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config,
        dist_init_required=False,
    )
    return engine
