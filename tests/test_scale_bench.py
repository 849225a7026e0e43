"""benchmarks/scale.py scaled down (issue 13): a ~98 M-parameter Llama teacher (0.37 GiB fp32, safetensors shards)
distilled on 2 gloo ranks with the teacher and the student under ZeRO-3. The ranks' sampled RSS shows that no rank
loads more than its share of the teacher, and the forward-KL loss falls."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.tiny import REPO, SHARED_DATA

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]
TINYSTORIES = SHARED_DATA / "lm" / "tinystories_subset.txt"


@pytest.mark.skipif(not TINYSTORIES.is_file(), reason=f"shared LM text not found at {TINYSTORIES}")
def test_a_partitioned_100m_teacher_loads_its_share_per_rank_and_the_loss_falls(tmp_path):
    results = tmp_path / "scale.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--size", "100m", "--nproc", "2", "--length", "128",
           "--batch", "2", "--steps", "6", "--student-layers", "2", "--eval-docs", "4", "--shard", "100MB",
           "--interval", "0.1", "--label", "test-100m", "--work", str(tmp_path / "work"), "--results", str(results),
           "--override", "train.lr=1e-3", "--env", "MALLOC_MMAP_THRESHOLD_=1048576"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # MALLOC_MMAP_THRESHOLD_ as in the committed table: glibc's dynamic threshold otherwise keeps freed
    # multi-MiB tensors in the heap, which RSS counts (benchmarks/results/scale_1b.md).
    record = json.loads(results.read_text())[-1]
    share = record["teacher_params"] * 4 / 2**30 / 2
    for rank in ("0", "1"):
        # The issue's bound is 1.3 x share; transformers' own ZeRO-3 loader passes ~2 x share through each rank.
        assert record["teacher_load_gib"][rank] <= 1.3 * share, (rank, record["teacher_load_gib"], share)
    losses = record["losses"]
    assert len(losses) >= 4, losses
    assert sum(losses[-2:]) < sum(losses[:2]), losses  # noisy per step on random data: compare pairs
    assert (tmp_path / "scale.md").read_text().count("test-100m") >= 2  # both tables carry the run
