"""Peak CPU memory and step time of ``attn_kl``: the plain reference (``block_size: null``) vs the blocked kernel.

Each (path, L) configuration runs in a fresh subprocess, so one run's allocator state cannot leak into the next.
The worker builds the real ``attn_kl`` loss for a BERT-base teacher (768 wide, 12 heads, d = 64) and a MiniLM-like
student (384 wide, 12 heads, d = 32), allocates their tapped ``[B, L, D]`` Q and K (the student's requiring grad;
batch row 1 padded to 3/4 of L), records ``ru_maxrss`` as its baseline, then runs forward + backward ``--reps``
times. Peak = growth of ``ru_maxrss`` over the baseline: the loss's intermediates, what autograd keeps and the
gradients of the student's Q and K, excluding the inputs every implementation needs. Time = the median
forward + backward wall-clock seconds, and the process CPU seconds per step (less sensitive to other load).

Example (the run recorded in benchmarks/results/attention_memory.md)::

    nice python benchmarks/attention_memory.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from peak_rss import maxrss_mib  # benchmarks/ is on sys.path: these run as scripts

REPO = Path(__file__).resolve().parents[1]
PATHS = ("reference", "blocked")


def worker(args: argparse.Namespace) -> None:
    """Run one configuration and print a JSON line with its peak-memory growth and step times."""
    import torch
    from transformers import BertConfig

    sys.path.insert(0, str(REPO))
    from scaledkd.losses import LossBatch, LossSetup, ModelOutputs, build_loss
    from scaledkd.taps import Captures

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = BertConfig(hidden_size=768, num_attention_heads=12, num_hidden_layers=1)
    student = BertConfig(hidden_size=384, num_attention_heads=12, num_hidden_layers=1)
    block_size = None if args.path == "reference" else args.block_size
    loss = build_loss("attn_kl", LossSetup(student, teacher, None, "classification", "attn_kl"),
                      {"block_size": block_size})

    def outputs(width: int, grad: bool, B: int, L: int) -> ModelOutputs:
        qk = {kind: {1: torch.randn(B, L, width).requires_grad_(grad)} for kind in "qk"}  # [B, L, D]
        return ModelOutputs(None, Captures(**qk))

    def mask(B: int, L: int) -> LossBatch:
        m = torch.ones(B, L, dtype=torch.long)
        m[1, 3 * L // 4:] = 0
        return LossBatch(attention_mask=m)

    # Warm op dispatch and the allocator on a tiny problem so one-off costs do not count as peak memory.
    loss(outputs(384, True, 2, 16), outputs(768, False, 2, 16), mask(2, 16)).backward()
    s, t = outputs(384, True, args.batch, args.seq_len), outputs(768, False, args.batch, args.seq_len)
    batch = mask(args.batch, args.seq_len)
    baseline = maxrss_mib()
    walls, cpus = [], []
    for _ in range(args.reps):
        for x in s.captures.q[1], s.captures.k[1]:
            x.grad = None
        wall, cpu = time.perf_counter(), time.process_time()
        value = loss(s, t, batch)
        value.backward()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    print(json.dumps({
        "peak_mib": round(maxrss_mib() - baseline, 1), "seconds": round(statistics.median(walls), 4),
        "cpu_seconds": round(statistics.median(cpus), 4), "loss": value.item(),
    }))


def run_one(args: argparse.Namespace, path: str, seq_len: int) -> dict:
    reps = max(1, round(args.reps * 256 / seq_len))  # fewer repetitions for the long (slow) sequences
    cmd = [sys.executable, __file__, "--worker", "--path", path, "--seq-len", str(seq_len),
           "--batch", str(args.batch), "--block-size", str(args.block_size), "--threads", str(args.threads),
           "--reps", str(reps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "reps": reps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, nargs="+", default=[256, 512, 1024], help="sequence lengths L")
    p.add_argument("--batch", type=int, default=8, help="batch size B")
    p.add_argument("--block-size", type=int, default=128, help="query rows per block of the blocked path")
    p.add_argument("--reps", type=int, default=6, help="forward+backward repetitions at L = 256 (scaled by 256/L)")
    # One thread by default: on a shared, loaded machine OpenMP workers spin-wait on each other and inflate both
    # paths' times by amounts that change from run to run; a single thread compares the two paths' work.
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed per configuration")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "attention_memory",
                   help="output path without suffix; .md and .json are written")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.seq_len = args.seq_len[0]
        worker(args)
        return

    import torch

    command = "python " + shlex.join([os.path.relpath(__file__, REPO), *sys.argv[1:]])
    header = ("| L | [B, H, L, L] fp32 map (MiB) | reference peak (MiB) | blocked peak (MiB) | blocked / reference "
              "| reference s | blocked s | reference CPU s | blocked CPU s |")
    rows = []
    print(header)
    print("|" + "---|" * 9)
    for seq_len in args.seq_len:
        ref, blk = (run_one(args, path, seq_len) for path in PATHS)
        ok = "error" not in ref and "error" not in blk
        if ok and abs(ref["loss"] - blk["loss"]) > 1e-5 * abs(ref["loss"]):
            raise SystemExit(f"L={seq_len}: the two paths disagree: {ref['loss']} vs {blk['loss']}")
        row = {"seq_len": seq_len, "map_mib": round(args.batch * 12 * seq_len**2 * 4 / 2**20, 1),
               "reference": ref, "blocked": blk,
               "ratio": round(blk["peak_mib"] / ref["peak_mib"], 3) if ok else None}
        rows.append(row)
        line = _line(row)
        print(line, flush=True)

    meta = {
        "command": command, "batch": args.batch, "block_size": args.block_size, "threads": args.threads,
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "measure": "ru_maxrss growth over the baseline taken after allocating the captures; fresh subprocess per run",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = [
        "# attn_kl: plain reference vs blocked kernel, peak CPU memory and step time (forward + backward)",
        "",
        f"Command: `{command}`",
        "",
        (f"torch {meta['torch']}, {meta['machine']}, torch threads: {args.threads} (default 1: on a shared machine "
         f"OpenMP spin-waits make multi-thread times vary run to run); B = {args.batch}; teacher 768 wide / 12 "
         f"heads (d = 64), student 384 wide / 12 heads (d = 32), one layer pair; blocked path with block_size "
         f"{args.block_size}; batch row 1 padded to 3/4 of L."),
        ("Peak = growth of `ru_maxrss` over a baseline taken after the tapped Q/K were allocated, each configuration "
         "in a fresh subprocess; it includes the gradients of the student's Q and K. Seconds = median wall-clock "
         "forward + backward (the machine is shared, so also the process CPU seconds per step)."),
        "",
        header,
        "|" + "---|" * 9,
        *(_line(r) for r in rows),
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


def _line(row: dict) -> str:
    ref, blk = row["reference"], row["blocked"]
    def get(r: dict, key: str) -> str:
        return str(r.get(key, r.get("error", "-")))

    return (f"| {row['seq_len']} | {row['map_mib']} | {get(ref, 'peak_mib')} | {get(blk, 'peak_mib')} | {row['ratio']} "
            f"| {get(ref, 'seconds')} | {get(blk, 'seconds')} | {get(ref, 'cpu_seconds')} "
            f"| {get(blk, 'cpu_seconds')} |")


if __name__ == "__main__":
    main()
