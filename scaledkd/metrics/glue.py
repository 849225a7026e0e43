"""GLUE metrics as an `evaluate` module, loadable by file path with no network access.

``evaluate.load("/abs/path/to/glue.py", config_name="cola")`` copies this single file into the dynamic-modules
cache (~/.cache/huggingface/modules) and imports it from there, so the file must stay self-contained: no
relative imports, and no library imports beyond numpy, datasets and evaluate (evaluate checks every top-level
import of the script before loading it). The maths is plain numpy so that results do not depend on which
scikit-learn or scipy is installed; the conventions for degenerate inputs follow scikit-learn/scipy, as the
hub's ``glue`` metric does (MCC and F1 are 0.0 when undefined; a correlation with a constant input is nan).

Config names are the GLUE tasks plus four generic names for custom (CSV/JSONL) tasks; ``TASK_METRICS`` maps each
to the metrics it reports and is the single source of truth used by ``scaledkd.metrics``.
"""
from __future__ import annotations

import datasets
import evaluate
import numpy as np

# config name -> metrics it reports, in report order. HANS predictions must already be mapped to its two labels
# (MNLI neutral and contradiction -> non-entailment) before they reach the metric.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "hans": ("accuracy",),
    # custom tasks
    "accuracy": ("accuracy",),
    "f1": ("f1",),
    "matthews_correlation": ("matthews_correlation",),
    "pearson_spearman": ("pearson", "spearmanr"),
}
# configs whose predictions and references are real numbers (regression); the rest take integer class ids
REGRESSION_CONFIGS = frozenset({"stsb", "pearson_spearman"})

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""

_DESCRIPTION = """\
GLUE dev-set metrics for scaledkd: accuracy, binary F1 (positive label 1), Matthews correlation (binary or
multiclass), Pearson and Spearman correlation (average ranks for ties). Config name = GLUE task or a generic
metric name for custom tasks.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: class ids (int), or real scores for stsb / pearson_spearman.
    references: gold class ids (int), or gold real scores for stsb / pearson_spearman.
Returns: a dict of Python floats, by config name:
    cola, matthews_correlation: {"matthews_correlation"} in [-1, 1]
    sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, hans, accuracy: {"accuracy"} in [0, 1]
    mrpc, qqp: {"accuracy", "f1"} in [0, 1]
    f1: {"f1"} in [0, 1]
    stsb, pearson_spearman: {"pearson", "spearmanr"} in [-1, 1] (nan if either input is constant)
Examples:
    >>> metric = evaluate.load("/path/to/scaledkd/metrics/glue.py", config_name="mrpc")
    >>> metric.compute(predictions=[1, 0, 1], references=[1, 1, 1])
    {'accuracy': 0.6666666666666666, 'f1': 0.8}
"""


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float(np.mean(predictions == references))


def f1_binary(predictions: np.ndarray, references: np.ndarray) -> float:
    """F1 of the positive class (label 1); 0.0 when there is no positive prediction nor positive reference."""
    labels = np.union1d(predictions, references)
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"binary F1 takes labels in {{0, 1}}; got labels {labels.tolist()}")
    tp = int(np.sum((predictions == 1) & (references == 1)))
    fp = int(np.sum((predictions == 1) & (references != 1)))
    fn = int(np.sum((predictions != 1) & (references == 1)))
    denom = 2 * tp + fp + fn
    return 2.0 * tp / denom if denom else 0.0


def matthews_corrcoef(predictions: np.ndarray, references: np.ndarray) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K; the usual phi coefficient for two).

    With confusion matrix C (rows true, columns predicted), t = row sums, p = column sums, c = trace,
    s = total: (c*s - t.p) / sqrt((s^2 - p.p) (s^2 - t.t)). 0.0 when the denominator is 0, e.g. a constant
    predictor, as scikit-learn does.
    """
    labels, idx = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    n_cls, n = len(labels), len(references)
    conf = np.bincount(idx[:n] * n_cls + idx[n:], minlength=n_cls * n_cls).reshape(n_cls, n_cls)
    conf = conf.astype(np.float64)  # products below overflow int64 for a few million examples
    t, p = conf.sum(axis=1), conf.sum(axis=0)
    c, s = np.trace(conf), conf.sum()
    cov_tp = c * s - t @ p
    cov_pp = s * s - p @ p
    cov_tt = s * s - t @ t
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / np.sqrt(cov_pp * cov_tt))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; nan if either input is constant or holds a nan."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc @ xc) * (yc @ yc))
    if not denom > 0:  # also catches nan
        return float("nan")
    return float(np.clip((xc @ yc) / denom, -1.0, 1.0))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (scipy.stats.rankdata(method="average"))."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts_run = np.concatenate([[True], xs[1:] != xs[:-1]])
    run_id = np.cumsum(starts_run) - 1
    starts = np.flatnonzero(starts_run)
    ends = np.append(starts[1:], len(x))  # exclusive
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = ((starts + ends - 1) / 2.0 + 1.0)[run_id]
    return ranks


def spearmanr(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation = Pearson correlation of average ranks; nan if an input is constant or holds a nan."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if np.isnan(x).any() or np.isnan(y).any():
        return float("nan")
    return pearson(average_ranks(x), average_ranks(y))


_METRIC_FNS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews_correlation": matthews_corrcoef,
    "pearson": pearson,
    "spearmanr": spearmanr,
}


class ScaledkdGlue(evaluate.Metric):
    """GLUE metrics; the config name picks the task. (The class name gives evaluate's cache folder,
    ~/.cache/huggingface/metrics/scaledkd_glue, so it never shares files with the hub's ``glue`` metric.)"""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in TASK_METRICS:
            raise ValueError(
                f"unknown GLUE metric config {self.config_name!r}; valid config names: {', '.join(TASK_METRICS)}"
            )
        dtype = "float64" if self.config_name in REGRESSION_CONFIGS else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}
            ),
            reference_urls=["https://gluebenchmark.com/"],
        )

    def _compute(self, predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        # Inputs arrive as Python lists: evaluate's format="numpy" would hand float64 columns over as float32
        # (datasets' numpy formatter casts every float column to float32 whatever the declared feature).
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(references) == 0:
            raise ValueError(f"{self.config_name}: no predictions to score")
        return {name: _METRIC_FNS[name](predictions, references) for name in TASK_METRICS[self.config_name]}
