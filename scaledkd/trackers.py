"""Experiment trackers (``train.report_to``): Accelerate's tracker classes (TensorBoard, Weights & Biases, MLflow,
trackio, ...) receive every record the run writes to ``log.jsonl``: each loss term, the learning rate, throughput
and the step-time split, and every evaluation's scores. Only rank 0 creates them; on other ranks :class:`Trackers`
does nothing."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .config import ConfigError

TRACKER_DIR = "trackers"


def check_available(names: list[str]) -> None:
    """Every named tracker's package is installed, else a :class:`ConfigError` naming what to install."""
    from accelerate.tracking import get_available_trackers

    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    missing = [name for name in names if name not in available]
    if missing:
        raise ConfigError(f"train.report_to={names}: {missing} not installed (pip install {' '.join(missing)}); "
                          f"installed trackers: {sorted(available)}")


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}


class Trackers:
    """The run's trackers.

    Args:
        names: ``train.report_to``.
        run_dir: trackers that write files write under ``<run_dir>/trackers/<run name>``.
        run_name: the run's name in the trackers (the run folder's name).
        config: the resolved config, stored as the run's hyperparameters (flattened, scalars only).
        enabled: False on every rank but 0.
    """

    def __init__(self, names: list[str], run_dir: Path, run_name: str, config: dict[str, Any], enabled: bool) -> None:
        self.trackers: list[Any] = []
        if not names or not enabled:
            return
        from accelerate import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        PartialState()  # Accelerate's trackers log through its logger, which needs its (process-group aware) state
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if getattr(cls, "requires_logging_directory", False):
                tracker = cls(run_name, logging_dir=str(run_dir / TRACKER_DIR))
            else:
                tracker = cls(run_name)
            tracker.main_process_only = False  # only rank 0 builds trackers; no Accelerate state needed
            tracker.start()
            tracker.store_init_configuration(_hparams(config))
            self.trackers.append(tracker)

    def log(self, record: dict[str, Any], step: int, prefix: str = "") -> None:
        """Every scalar of ``record`` (a ``log.jsonl`` line) at ``step``; ``prefix`` groups evaluation scores."""
        values = {f"{prefix}{k}": v for k, v in _scalars(record).items()}
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[name] = value
        else:
            out[name] = str(value)
    return out
