"""The short human summary printed at the end of a run (the same numbers are in metrics.json)."""
from __future__ import annotations

from typing import Any

from .config import Config
from .engine import dist


def _fmt(scores: dict[str, Any] | None) -> str:
    if not scores:
        return "-"
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float) and k != "step")


def print_summary(cfg: Config, metrics: dict[str, Any]) -> None:
    if not dist.is_main():
        return
    size, speed = metrics["size"], metrics["speed"]
    lines = ["", "=" * 72, f"scaledkd: {cfg.data.task} run finished in {metrics['steps']} steps -> {metrics.get('export_dir')}"]
    if "teacher_params" in size:
        lines.append(f"  size     student {size['student_params'] / 1e6:.1f} M params vs teacher "
                     f"{size['teacher_params'] / 1e6:.1f} M ({size['compression']:.2f}x smaller)")
        lines.append(f"  speed    forward on {speed['probe_batch']} tokens: student {speed['student_forward_s'] * 1e3:.0f} ms "
                     f"vs teacher {speed['teacher_forward_s'] * 1e3:.0f} ms ({speed['speedup']:.2f}x faster)")
    else:
        lines.append(f"  size     student {size['student_params'] / 1e6:.1f} M params; forward "
                     f"{speed['student_forward_s'] * 1e3:.0f} ms on {speed['probe_batch']}")
    if speed.get("step_ms"):
        ms = speed["step_ms"]
        lines.append(f"  step     {sum(ms.values()):.0f} ms per optimiser step: teacher {ms['teacher']:.0f}, student + "
                     f"losses {ms['student']:.0f}, backward {ms['backward']:.0f}, optimiser {ms['optimizer']:.0f}; "
                     f"{speed['tokens_per_s']:,.0f} tokens/s")
    if metrics.get("teacher"):
        lines.append(f"  teacher  dev: {_fmt(metrics['teacher'])}")
    history = metrics.get("history") or []
    if history and history[0]["step"] == 0 and len(history) > 1:
        lines.append(f"  before   step 0: {_fmt(history[0])}")
    lines.append(f"  final    dev: {_fmt(metrics['final'])}")
    if metrics.get("best"):
        lines.append(f"  best     dev (step {metrics['best']['step']}): {_fmt(metrics['best'])}")
    for name, block in (metrics.get("extra") or {}).items():
        lines.append(f"  {name:8s} {_fmt(block)}")
    lines.append(f"  exported {metrics['exported']} student")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)
