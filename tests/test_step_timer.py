"""The step-time split's CUDA extras: peak memory per window and model FLOPs utilisation (MFU).

No GPU runs here, so the CUDA branch is driven through ``torch.cuda``'s own query functions replaced by fixed
answers; the arithmetic is checked against numbers worked out by hand."""
from __future__ import annotations

import pytest
import torch

from scaledkd.engine import step


def test_flops_per_token_counts_student_training_and_teacher_forward():
    assert step.step_flops_per_token(student_params=10, teacher_params=5) == 6 * 10 + 2 * 5
    assert step.step_flops_per_token(student_params=10, teacher_params=0) == 60  # a cached teacher costs nothing


def test_mfu_is_achieved_over_peak():
    # 6e9 FLOPs per token x 10,000 tokens in 2 s = 3e13 FLOP/s on a 989 TFLOP/s device.
    assert step.mfu(6e9, 10_000, 2.0, 989e12) == pytest.approx(3e13 / 989e12)


def test_cpu_windows_report_neither_peak_memory_nor_mfu():
    timer = step.PhaseTimer(flops_per_token=1e6)
    timer.start()
    timer.tokens += 100
    timer.mark("teacher")
    out = timer.take(1, 0.5)
    assert "peak_mem_gib" not in out and "mfu" not in out and out["tokens"] == 100


def test_cuda_windows_report_peak_memory_and_mfu(monkeypatch):
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(cuda, "get_device_capability", lambda *a, **k: (9, 0))
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a, **k: 3 * 2**30)
    resets = []
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda *a, **k: resets.append(1))
    timer = step.PhaseTimer(flops_per_token=6e9)
    timer.start()
    timer.tokens += 10_000
    out = timer.take(1, 2.0)
    assert out["peak_mem_gib"] == 3.0 and resets == [1]
    assert out["mfu"] == pytest.approx(6e9 * 10_000 / 2.0 / 989e12)
    # A device whose peak is not in the table gets no MFU rather than a guessed one.
    monkeypatch.setattr(cuda, "get_device_capability", lambda *a, **k: (7, 5))
    timer = step.PhaseTimer(flops_per_token=6e9)
    assert "mfu" not in timer.take(1, 1.0)
