"""benchmarks/step_cost.py: its packed rows, its target verdicts, and a --quick run end to end on a tiny teacher."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "step_cost.py"


def _bench():
    spec = importlib.util.spec_from_file_location("step_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packed_rows_are_exactly_l_tokens_without_padding(tiny_assets, tmp_path):
    from scaledkd import models

    teacher, glue = tiny_assets
    bench = _bench()
    names = bench.write_packed_data(str(teacher), "6-block", 24, 6, str(glue), tmp_path)
    records = [json.loads(line) for line in (tmp_path / names["train_file"]).read_text().splitlines()]
    assert len(records) == 6
    tokenizer = models.load_tokenizer(str(teacher))
    for r in records:
        assert len(tokenizer(r["text"])["input_ids"]) > 24  # so truncation at max_length=24 leaves no padding
        assert r["label"] in (0, 1)
    assert len({r["text"] for r in records}) == 6  # consecutive sentences, not one row repeated


def _result(rows, extra=()):
    return {"rows": rows, "extra_memory": list(extra), "skipped": []}


def test_targets_pass_miss_and_missing():
    bench = _bench()
    rows = [
        {"teacher": "6-block", "length": 256, "config": "full_ild", "ratio_to_floor": 1.10,
         "peak_ratio_to_logits_kd": 1.30},
        {"teacher": "6-block", "length": 512, "config": "full_ild", "ratio_to_floor": 1.40},
        {"teacher": "6-block", "length": 256, "config": "logits_kd_cached", "ratio_to_live_minus_teacher": 1.02},
    ]
    extra = [{"config": "logits_kd", "length": 1024, "batch": 8, "peak_rss_mib": 1000.0},
             {"config": "attn_kl", "length": 1024, "batch": 8, "peak_rss_mib": 1100.0}]
    verdicts = {t["target"]: t for t in bench.targets(_result(rows, extra))}
    assert verdicts["full_ild step <= 1.15x floor at L=256"]["verdict"] == "PASS"
    assert verdicts["full_ild step <= 1.25x floor at L=512"]["verdict"] == "MISS"
    assert verdicts["full_ild peak RSS <= 1.15x logits_kd's at L=256"]["verdict"] == "MISS"
    assert verdicts["attn_kl peak RSS <= 1.2x logits_kd's at L=1024, batch 8"]["measured"] == pytest.approx(1.1)
    cached = "logits_kd_cached step <= 1.05x (live step - teacher forward) at L=256, 6-block teacher"
    assert verdicts[cached]["verdict"] == "PASS"
    missing = verdicts["attn_kl step <= 1.1x floor at L=256"]
    assert missing["verdict"] == "n/a" and "not measured" in missing["why"]
    assert len(verdicts) == 13


@pytest.mark.slow
def test_quick_run_writes_every_row(tiny_assets, tmp_path):
    """The whole harness on a tiny random BERT (subprocesses for memory, caches and timing): every configuration
    has a row with a positive finite time, ratio and peak; the cached rows when the cache exists."""
    teacher, glue = tiny_assets
    out = tmp_path / "step_cost"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--teacher", str(teacher), "--data-dir", str(glue),
           "--lengths", "16", "--steps", "2", "--families", "logits_kd", "attn_kl", "cache", "--long-memory", "16:1",
           "--teacher12", "none", "--out", str(out)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    has_cache = importlib.util.find_spec("scaledkd.cache") is not None
    expected = ["floor", "logits_kd", "attn_kl"] + (["full_ild", "logits_kd_cached", "full_ild_cached"]
                                                    if has_cache else [])
    assert sorted(r["config"] for r in result["rows"]) == sorted(expected)
    assert set(result["configs"]) == set(expected)
    for r in result["rows"]:
        assert "timing_error" not in r and "memory_error" not in r, r
        for key in ("median_ms", "ratio_to_floor", "peak_rss_mib", "peak_ratio_to_logits_kd"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["config"], key, r[key])
        assert len(r["samples_ms"]) == 2
        if r["cached"]:
            assert math.isfinite(r["ratio_to_live_minus_teacher"]) and r["ratio_to_live_minus_teacher"] > 0
    assert next(r for r in result["rows"] if r["config"] == "floor")["ratio_to_floor"] == 1.0
    assert [e["config"] for e in result["extra_memory"]] == ["logits_kd", "attn_kl"]
    assert all(e["peak_rss_mib"] > 0 for e in result["extra_memory"])
    assert {t["verdict"] for t in result["targets"]} == {"n/a"}  # the targets are at L = 256 and up
    if not has_cache:
        assert any("scaledkd.cache" in s for s in result["skipped"])
    prov = result["provenance"]
    assert prov["threads"] == 2 and prov["torch"] and prov["git_commit"] and "--quick" in prov["command"]
    md = out.with_suffix(".md").read_text()
    for name in expected:
        assert f"| {name} |" in md
