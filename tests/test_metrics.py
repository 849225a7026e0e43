"""GLUE metrics: numpy maths against independent references, the evaluate module loaded by path offline."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scaledkd.metrics import METRIC_MODULE, compute_metrics, load_metric, primary_metric_names
from scaledkd.metrics import glue

GLUE_TASKS = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte",
              "wnli", "hans"]
CUSTOM = ["accuracy", "f1", "matthews_correlation", "pearson_spearman"]
REPO = Path(__file__).resolve().parents[1]


# ---------- independent references (loops and textbook formulas, not the vectorised code under test) ----------

def ref_mcc(pred: np.ndarray, ref: np.ndarray) -> float:
    """Gorodkin's R_K as the correlation of one-hot indicator matrices: cov(X, Y) / sqrt(cov(X, X) cov(Y, Y))."""
    labels = sorted(set(pred.tolist()) | set(ref.tolist()))
    x = np.array([[float(p == k) for k in labels] for p in pred])
    y = np.array([[float(r == k) for k in labels] for r in ref])
    x -= x.mean(0)
    y -= y.mean(0)
    cxy, cxx, cyy = (x * y).sum(), (x * x).sum(), (y * y).sum()
    return 0.0 if cxx * cyy == 0 else cxy / math.sqrt(cxx * cyy)


def ref_f1(pred: np.ndarray, ref: np.ndarray) -> float:
    """Harmonic mean of precision and recall of label 1, counted with a loop."""
    tp = fp = fn = 0
    for p, r in zip(pred.tolist(), ref.tolist()):
        tp += p == 1 and r == 1
        fp += p == 1 and r != 1
        fn += p != 1 and r == 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ---------- hand-worked values ----------

@pytest.mark.parametrize("task", ["cola", "matthews_correlation"])
def test_mcc_known_values(task: str) -> None:
    y = [0, 1, 1, 0, 1, 0, 0, 1]
    assert compute_metrics(task, y, y)["matthews_correlation"] == 1.0
    assert compute_metrics(task, [1 - v for v in y], y)["matthews_correlation"] == pytest.approx(-1.0)
    # a constant predictor (common early in CoLA training) is 0.0, as in scikit-learn, not nan
    assert compute_metrics(task, [1] * 8, y)["matthews_correlation"] == 0.0
    # tp=6, tn=3, fp=1, fn=2: (6*3 - 1*2) / sqrt(7*8*4*5)
    pred = [1] * 6 + [0] * 3 + [1] + [0] * 2
    ref = [1] * 6 + [0] * 3 + [0] + [1] * 2
    assert compute_metrics(task, pred, ref)["matthews_correlation"] == pytest.approx(16 / math.sqrt(1120))


def test_mcc_multiclass_known_value() -> None:
    # confusion trace 3 of 6, all marginals 2: (3*6 - 12) / sqrt((36 - 12)(36 - 12)) = 0.25
    pred = np.array([0, 1, 1, 2, 2, 0])
    ref = np.array([0, 0, 1, 1, 2, 2])
    assert glue.matthews_corrcoef(pred, ref) == pytest.approx(0.25)
    assert compute_metrics("matthews_correlation", pred, ref)["matthews_correlation"] == pytest.approx(0.25)


def test_f1_and_accuracy_known_values() -> None:
    # tp=1, fp=1, fn=1, tn=1 -> F1 = 2/(2+1+1) = 0.5, accuracy 0.5; score = mean
    out = compute_metrics("mrpc", [1, 1, 0, 0], [1, 0, 1, 0])
    assert out == {"accuracy": 0.5, "f1": 0.5, "score": 0.5}
    out = compute_metrics("qqp", [1, 0, 1], [1, 1, 1])  # precision 1, recall 2/3
    assert out["accuracy"] == pytest.approx(2 / 3) and out["f1"] == pytest.approx(0.8)
    assert out["score"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert compute_metrics("f1", [0, 0, 0], [0, 0, 0])["f1"] == 0.0  # no positives at all: 0.0 as scikit-learn
    assert compute_metrics("f1", [1, 1], [1, 1])["f1"] == 1.0


def test_spearman_ties_use_average_ranks() -> None:
    assert glue.average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert glue.average_ranks(np.array([5.0, 5.0, 5.0])).tolist() == [2.0, 2.0, 2.0]
    # x ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: centred dot 4.5 / sqrt(4.5 * 5)
    out = compute_metrics("stsb", [0.1, 0.7, 0.7, 0.9], [1.0, 2.0, 3.0, 4.0])
    assert out["spearmanr"] == pytest.approx(4.5 / math.sqrt(22.5))
    # rank correlation is invariant to monotone transforms, Pearson is not
    x = np.linspace(0.0, 3.0, 20)
    out = compute_metrics("pearson_spearman", np.exp(x), x)
    assert out["spearmanr"] == pytest.approx(1.0) and out["pearson"] < 0.95
    assert out["score"] == pytest.approx((out["pearson"] + out["spearmanr"]) / 2)


def test_constant_regression_input_gives_nan() -> None:
    out = compute_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert math.isnan(out["pearson"]) and math.isnan(out["spearmanr"]) and math.isnan(out["score"])


# ---------- random inputs against independent references ----------

@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_classification_metrics_match_references(rng: np.random.Generator, n_classes: int) -> None:
    for n in (1, 7, 500):
        ref = rng.integers(0, n_classes, n)
        pred = np.where(rng.random(n) < 0.6, ref, rng.integers(0, n_classes, n))
        assert compute_metrics("accuracy", pred, ref)["accuracy"] == pytest.approx(
            sum(int(p == r) for p, r in zip(pred, ref)) / n)
        assert compute_metrics("matthews_correlation", pred, ref)["matthews_correlation"] == pytest.approx(
            ref_mcc(pred, ref), abs=1e-12)
        if n_classes == 2:
            assert compute_metrics("f1", pred, ref)["f1"] == pytest.approx(ref_f1(pred, ref), abs=1e-12)


def test_classification_metrics_match_sklearn(rng: np.random.Generator) -> None:
    skm = pytest.importorskip("sklearn.metrics")
    ref = rng.integers(0, 3, 2000)
    pred = np.where(rng.random(2000) < 0.5, ref, rng.integers(0, 3, 2000))
    assert glue.matthews_corrcoef(pred, ref) == pytest.approx(skm.matthews_corrcoef(ref, pred), abs=1e-12)
    ref2, pred2 = ref % 2, pred % 2
    assert glue.matthews_corrcoef(pred2, ref2) == pytest.approx(skm.matthews_corrcoef(ref2, pred2), abs=1e-12)
    assert glue.f1_binary(pred2, ref2) == pytest.approx(skm.f1_score(ref2, pred2), abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_scipy(rng: np.random.Generator, ties: bool) -> None:
    stats = pytest.importorskip("scipy.stats")
    for n in (3, 50, 1000):
        ref = rng.normal(size=n) * 5.0
        pred = ref + rng.normal(size=n) * 3.0
        if ties:  # STS-B gold scores come in fifths; round both sides to force many ties
            ref, pred = np.round(ref), np.round(pred)
        out = compute_metrics("stsb", pred, ref)
        assert out["pearson"] == pytest.approx(stats.pearsonr(pred, ref)[0], abs=1e-12)
        assert out["spearmanr"] == pytest.approx(stats.spearmanr(pred, ref)[0], abs=1e-12)
        assert glue.average_ranks(pred).tolist() == stats.rankdata(pred).tolist()


def test_regression_inputs_keep_float64() -> None:
    # evaluate's format="numpy" would silently hand the module float32 columns (an error of ~1e-8 here)
    rng = np.random.default_rng(7)
    ref = rng.normal(size=3) * 5.0
    pred = ref + rng.normal(size=3) * 3.0
    out = compute_metrics("stsb", pred, ref)
    assert out["pearson"] == glue.pearson(pred, ref)
    assert out["pearson"] != glue.pearson(pred.astype(np.float32), ref.astype(np.float32))


def test_accepts_torch_tensors_including_bf16() -> None:
    torch = pytest.importorskip("torch")
    logits = torch.tensor([[2.0, 0.1], [0.3, 1.0], [0.0, -1.0]])
    out = compute_metrics("sst2", logits.argmax(-1), torch.tensor([0, 1, 1]))
    assert out["accuracy"] == pytest.approx(2 / 3)
    out = compute_metrics("stsb", torch.tensor([0.5, 1.5, 3.0], dtype=torch.bfloat16), torch.tensor([1.0, 2.0, 3.0]))
    assert out["spearmanr"] == pytest.approx(1.0)


# ---------- the evaluate module and the package API ----------

def test_results_are_python_floats_with_the_declared_names() -> None:
    for task in GLUE_TASKS + CUSTOM:
        regression = task in glue.REGRESSION_CONFIGS
        pred, ref = ([0.5, 1.0, 2.0, 1.5], [1.0, 1.5, 2.5, 2.0]) if regression else ([0, 1, 1, 0], [0, 1, 0, 0])
        out = compute_metrics(task, pred, ref)
        assert list(out) == [*primary_metric_names(task), "score"]
        assert all(type(v) is float for v in out.values()), out
        raw = load_metric(task).compute(predictions=pred, references=ref)
        assert all(type(v) is float for v in raw.values()), raw


def test_primary_metric_names_and_score_follow_glue() -> None:
    assert primary_metric_names("cola") == ("matthews_correlation",)
    assert primary_metric_names("stsb") == ("pearson", "spearmanr")
    assert primary_metric_names("mrpc") == primary_metric_names("qqp") == ("accuracy", "f1")
    for task in ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans"):
        assert primary_metric_names(task) == ("accuracy",)
    assert compute_metrics("cola", [1, 0, 1, 0], [1, 0, 0, 0])["score"] == pytest.approx(1 / math.sqrt(3))


def test_unknown_config_name_lists_valid_names() -> None:
    for call in (lambda: load_metric("sst-2"), lambda: compute_metrics("sst-2", [1], [1]),
                 lambda: primary_metric_names("sst-2")):
        with pytest.raises(ValueError, match=r"'sst-2'.*valid config names: cola, sst2, mrpc") as err:
            call()
        assert all(name in str(err.value) for name in GLUE_TASKS + CUSTOM)
    import evaluate  # the module itself refuses too, including evaluate's default config name

    with pytest.raises(ValueError, match=r"unknown GLUE metric config 'default'.*pearson_spearman"):
        evaluate.load(str(METRIC_MODULE))


def test_bad_inputs_are_errors_not_silent_truncation() -> None:
    with pytest.raises(ValueError, match="class ids"):  # evaluate's int64 cast would turn 0.7 into class 0
        compute_metrics("sst2", [0.7, 1.0], [0, 1])
    assert compute_metrics("sst2", [0.0, 1.0], [0, 1])["accuracy"] == 1.0  # integral floats are fine
    with pytest.raises(ValueError, match="1-D"):
        compute_metrics("mnli", np.zeros((4, 3)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="Mismatch"):
        compute_metrics("rte", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="labels in"):
        compute_metrics("f1", [0, 2], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics("cola", [], [])


def test_loads_offline_with_network_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    metric = load_metric("rte")  # not the lru-cached instance: a fresh evaluate.load
    assert metric.config_name == "rte"
    assert metric.compute(predictions=[1, 0, 1], references=[1, 0, 0]) == {"accuracy": pytest.approx(2 / 3)}


def test_cold_cache_load_is_lazy_and_leaves_the_package_untouched(tmp_path: Path) -> None:
    """In a fresh process with an empty HF_HOME and HF_HUB_OFFLINE=1: importing scaledkd.metrics does not import
    evaluate (seconds of transformers imports); the first load copies glue.py into the cache, never beside it."""
    script = f"""
import json, sys, time
import scaledkd.metrics as M
lazy = "evaluate" not in sys.modules
t = time.perf_counter()
out = M.compute_metrics("mrpc", [1, 0, 1], [1, 1, 1])
print(json.dumps({{"lazy": lazy, "out": out, "seconds": time.perf_counter() - t}}))
"""
    before = sorted(p.name for p in METRIC_MODULE.parent.iterdir())
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("HF_MODULES_CACHE", None)
    env.pop("HF_METRICS_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["lazy"]
    assert res["out"]["f1"] == pytest.approx(0.8)
    assert sorted(p.name for p in METRIC_MODULE.parent.iterdir()) == before
    assert list((tmp_path / "hf" / "modules").rglob("glue.py")), "evaluate did not cache the module copy"
    assert not list((tmp_path / "hf" / "metrics").rglob("*.arrow")), "predictions went to disk despite keep_in_memory"
