"""The engine's two entry points, for every command and launcher: :func:`run_recipe` runs a config (single or
staged) and :func:`validate_recipe` checks it. Everything else in this package is reached through them. (Not named
``run``: that is the ``engine.run`` module.)

Imports are deferred so that the process environment (``DS_ACCELERATOR``, the rendezvous variables) is set before
DeepSpeed is first imported.
"""
from __future__ import annotations

from typing import Any

from ..config import Config


def run_recipe(cfg: Config) -> dict[str, Any]:
    """Resolve and run ``cfg`` (every stage of a staged recipe, in order); returns its ``metrics.json``."""
    from .dist import prepare_environment

    prepare_environment()
    from .run import run_distillation
    from .stages import run_stages

    return run_stages(cfg) if cfg.stages else run_distillation(cfg)


def validate_recipe(cfg: Config) -> dict[str, Any]:
    """Every check :func:`run_recipe` makes before its first step, without training: the resolved plan as a report."""
    from .run import validate as validate_single
    from .stages import validate_stages

    return validate_stages(cfg) if cfg.stages else validate_single(cfg)
