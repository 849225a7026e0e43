"""GLUE and custom-task metrics, served by the evaluate module in ``glue.py`` loaded by file path (no hub access).

``evaluate`` is imported on the first call of any function here, not when this package is imported: it pulls
in transformers' pipelines and costs ~3-7 s, which commands that never score anything should not pay.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import evaluate

METRIC_MODULE = Path(__file__).with_name("glue.py")


def _task_metrics() -> dict[str, tuple[str, ...]]:
    from scaledkd.metrics.glue import TASK_METRICS

    return TASK_METRICS


def primary_metric_names(task: str) -> tuple[str, ...]:
    """The metrics a task reports, e.g. ``("accuracy", "f1")`` for mrpc; their mean is the task's ``score``.

    Raises:
        ValueError: unknown task, with the valid names.
    """
    table = _task_metrics()
    if task not in table:
        raise ValueError(f"unknown GLUE metric config {task!r}; valid config names: {', '.join(table)}")
    return table[task]


def load_metric(task: str) -> evaluate.EvaluationModule:
    """Load the metric for ``task`` (a GLUE task or accuracy/f1/matthews_correlation/pearson_spearman) offline.

    Predictions are kept in memory rather than in evaluate's Arrow cache files, so concurrent ranks and jobs
    never contend for ``~/.cache/huggingface/metrics``. evaluate still copies ``glue.py`` into its modules cache
    (``HF_MODULES_CACHE``, default ~/.cache/huggingface/modules) and creates an empty folder under
    ``HF_METRICS_CACHE``; point those variables at a writable place when home is read-only.
    Nothing is written next to this package, so a read-only install works.
    """
    import evaluate

    primary_metric_names(task)  # fail fast, before evaluate copies the module into its cache
    return evaluate.load(str(METRIC_MODULE), config_name=task, keep_in_memory=True)


@functools.lru_cache(maxsize=None)
def _cached_metric(task: str) -> evaluate.EvaluationModule:
    return load_metric(task)


def _as_1d(values: Sequence | np.ndarray, task: str, what: str) -> np.ndarray:
    """[N] numpy array; classification tasks refuse non-integral floats, which evaluate would silently truncate
    (0.7 -> class 0) when casting to its int64 feature."""
    if hasattr(values, "detach"):  # a torch tensor, possibly on GPU and in bf16 (which numpy lacks)
        values = values.detach().cpu()
        values = (values.double() if values.is_floating_point() else values).numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{task}: {what} must be 1-D [N], got shape {arr.shape} (for logits pass logits.argmax(-1))")
    from scaledkd.metrics.glue import REGRESSION_CONFIGS

    if task not in REGRESSION_CONFIGS and arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        bad = arr[arr != np.round(arr)][0]
        raise ValueError(f"{task}: {what} must be class ids, got non-integral values such as {bad}")
    return arr


def compute_metrics(
    task: str, predictions: Sequence | np.ndarray, references: Sequence | np.ndarray
) -> dict[str, float]:
    """Score predictions against references; adds ``"score"``, the value that picks the best checkpoint.

    ``score`` is the mean of the task's metrics (GLUE convention): stsb -> mean of pearson and spearmanr,
    mrpc/qqp -> mean of accuracy and f1, other tasks -> their single metric.

    Args:
        task: a GLUE task or a custom-task metric name (see ``primary_metric_names``).
        predictions: [N] class ids, or real scores for stsb/pearson_spearman (e.g. ``logits.argmax(-1)``).
        references: [N] gold labels of the same kind.

    Returns:
        ``{metric: float, ..., "score": float}``.
    """
    names = primary_metric_names(task)
    predictions, references = _as_1d(predictions, task, "predictions"), _as_1d(references, task, "references")
    raw = _cached_metric(task).compute(predictions=predictions, references=references)
    result = {k: float(v) for k, v in raw.items()}
    result["score"] = float(np.mean([result[name] for name in names]))
    return result


__all__ = ["METRIC_MODULE", "compute_metrics", "load_metric", "primary_metric_names"]
