"""Peak CPU memory of chunked vs unchunked token divergences (forward + backward) for decoder-LM logits.

Each (mode, kind, B, V) configuration runs in a fresh subprocess, so one run's allocator state cannot
leak into the next. The worker allocates the ``[B, L, V]`` student and teacher logits (and the mask),
records ``ru_maxrss`` as its baseline, runs ``token_divergence(...).backward()`` once, and reports the
growth of ``ru_maxrss``: the extra peak memory of the loss, its intermediates and the ``[B, L, V]``
gradient it produces, excluding the inputs every implementation needs.

"unchunked" is ``chunk_size=None`` (one plain-autograd pass over all masked tokens, i.e. what a naive
implementation does); "chunked" is the default custom-autograd path with ``--chunk-size`` tokens per chunk.

With ``--hidden-size D`` every mode starts where a causal LM's head does: final hidden states ``[B, L, D]`` of
both models and their ``Linear(D, V)`` heads are the inputs (allocated before the baseline), so the logits, their
gradient and the head's weight gradient all count. The modes then are "unchunked" and "chunked" (the head applied
to all positions, then ``token_divergence``) and "head" (``head_token_divergence``: the heads applied chunk by
chunk, no ``[B, L, V]`` tensor). The head-path runs recorded in benchmarks/results/head_logit_memory.md::

    nice python benchmarks/chunked_logit_memory.py --hidden-size 256 --batch 1 --vocab 128000 --seq-len 2048 \
        --kinds forward_kl --modes unchunked chunked head --out benchmarks/results/head_logit_memory

Example (the runs recorded in benchmarks/results/chunked_logit_memory.md: B = 1, 2, then B = 3, 4 merged in, with
the unchunked runs whose single input exceeds 500 MiB skipped: their peak, linear in B, would not fit in RAM)::

    python benchmarks/chunked_logit_memory.py --batch 1 2 --vocab 32000 128000 --seq-len 1024
    python benchmarks/chunked_logit_memory.py --batch 3 4 --vocab 32000 128000 --seq-len 1024 \
        --unchunked-max-input-mib 500 --merge
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from peak_rss import maxrss_mib  # benchmarks/ is on sys.path: these run as scripts

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("bfloat16", "float16", "float32")
MODES = ("unchunked", "chunked", "head")


def worker(args: argparse.Namespace) -> None:
    """Run one configuration and print a JSON line with its peak-memory growth."""
    import torch

    sys.path.insert(0, str(REPO))
    from scaledkd.losses.divergence import token_divergence

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    if args.hidden_size is not None:
        head_worker(args, dtype)
        return
    shape = (args.batch, args.seq_len, args.vocab)
    student = torch.randn(shape, dtype=dtype).mul_(2).requires_grad_()  # [B, L, V]
    teacher = torch.randn(shape, dtype=dtype).mul_(2)  # [B, L, V]
    mask = torch.ones(shape[:2], dtype=torch.bool)  # [B, L]: every token counts (worst case)
    # Warm the allocator and op dispatch on a tiny problem so one-off costs do not count as peak memory.
    tiny = torch.randn(1, 2, 8, dtype=dtype, requires_grad=True)
    token_divergence(tiny, tiny.detach(), torch.ones(1, 2, dtype=torch.bool), args.kind, chunk_size=1).backward()
    baseline = maxrss_mib()

    chunk_size = None if args.mode == "unchunked" else args.chunk_size
    start = time.perf_counter()
    loss = token_divergence(student, teacher, mask, args.kind, chunk_size=chunk_size)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = maxrss_mib() - baseline
    print(json.dumps({"peak_mib": round(peak, 1), "seconds": round(seconds, 2), "loss": loss.item()}))


def head_worker(args: argparse.Namespace, dtype) -> None:
    """``--hidden-size`` runs: from final hidden states and heads to the loss and every gradient."""
    import torch
    from torch import nn

    from scaledkd.losses.divergence import token_divergence
    from scaledkd.losses.head import OutputHead, head_token_divergence

    b, length, d, vocab = args.batch, args.seq_len, args.hidden_size, args.vocab
    s_head = nn.Linear(d, vocab, bias=False, dtype=dtype)
    t_head = nn.Linear(d, vocab, bias=False, dtype=dtype).requires_grad_(False)
    h_s = torch.randn(b, length, d, dtype=dtype).requires_grad_()  # [B, L, D]
    h_t = torch.randn(b, length, d, dtype=dtype)  # [B, L, D]
    mask = torch.ones(b, length, dtype=torch.bool)  # every token counts (worst case)

    def loss_of(h_s, h_t, mask, mode, chunk_size):
        if mode == "head":
            return head_token_divergence(h_s, OutputHead(s_head), mask, teacher_hidden=h_t,
                                         teacher_head=OutputHead(t_head), kind=args.kind, chunk_size=chunk_size)
        with torch.no_grad():
            t_logits = t_head(h_t)  # [B, L, V]
        return token_divergence(s_head(h_s), t_logits, mask, args.kind,
                                chunk_size=None if mode == "unchunked" else chunk_size)

    # Warm up on a tiny slice (one-off allocator and dispatch costs are not the loss's peak).
    loss_of(h_s[:, :2], h_t[:, :2], mask[:, :2], args.mode, 1).backward()
    s_head.weight.grad, h_s.grad = None, None
    baseline = maxrss_mib()
    start = time.perf_counter()
    loss = loss_of(h_s, h_t, mask, args.mode, args.chunk_size)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = maxrss_mib() - baseline
    print(json.dumps({"peak_mib": round(peak, 1), "seconds": round(seconds, 2), "loss": loss.item()}))


def run_one(args: argparse.Namespace, mode: str, kind: str, batch: int, vocab: int) -> dict:
    cmd = [
        sys.executable, __file__, "--worker",
        "--mode", mode, "--kind", kind, "--batch", str(batch), "--vocab", str(vocab),
        "--seq-len", str(args.seq_len), "--chunk-size", str(args.chunk_size),
        "--dtype", args.dtype, "--threads", str(args.threads),
    ]  # fmt: skip
    if args.hidden_size is not None:
        cmd += ["--hidden-size", str(args.hidden_size)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 3, 4], help="batch sizes B")
    p.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_000], help="vocabulary sizes V")
    p.add_argument("--seq-len", type=int, default=1024, help="sequence length L")
    p.add_argument("--kinds", nargs="+", default=["forward_kl", "jsd"], help="divergence kinds to measure")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk for the chunked path")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of both models' logits")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1), help="torch intra-op threads")
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed per configuration")
    p.add_argument("--unchunked-max-input-mib", type=float, default=None,
                   help="skip the unchunked run when one input logits tensor is larger (its peak is ~16-25x that)")
    p.add_argument("--hidden-size", type=int, default=None,
                   help="start from final hidden states [B, L, D] and Linear(D, V) heads (enables mode 'head')")
    p.add_argument("--modes", nargs="+", default=["unchunked", "chunked"], choices=MODES,
                   help="implementations to measure ('head' needs --hidden-size)")
    p.add_argument("--merge", action="store_true",
                   help="keep the existing results of configurations not measured in this invocation")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "chunked_logit_memory",
                   help="output path without suffix; .md and .json are written")  # fmt: skip
    # Worker-only arguments (one configuration per subprocess).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.batch, args.vocab = args.batch[0], args.vocab[0]
        worker(args)
        return

    import torch

    command = "python " + shlex.join([os.path.relpath(__file__, REPO), *sys.argv[1:]])
    if "head" in args.modes and args.hidden_size is None:
        p.error("mode 'head' needs --hidden-size")
    bytes_per = torch.finfo(getattr(torch, args.dtype)).bits // 8
    rows = []
    print(_header(args.modes))
    print("|" + "---|" * _columns(args.modes))
    for vocab in args.vocab:
        for batch in args.batch:
            for kind in args.kinds:
                input_mib = batch * args.seq_len * vocab * bytes_per / 2**20
                row = {
                    "kind": kind, "batch": batch, "seq_len": args.seq_len, "vocab": vocab,
                    "input_mib_each": round(input_mib, 1),
                }  # fmt: skip
                for mode in args.modes:
                    limit = args.unchunked_max_input_mib
                    if mode == "unchunked" and limit is not None and input_mib > limit:
                        # Measured: the unchunked peak is ~16.5x (forward KL) to ~24.5x (JSD) one bf16 input.
                        row[mode] = {"error": f"skipped (est. >= {16.5 * input_mib / 1024:.0f} GiB)"}
                    else:
                        row[mode] = run_one(args, mode, kind, batch, vocab)
                naive = row.get("unchunked", {"error": "not run"})
                for mode, key in (("chunked", "ratio"), ("head", "head_ratio")):
                    if mode in row:
                        ok = "error" not in naive and "error" not in row[mode]
                        row[key] = round(row[mode]["peak_mib"] / naive["peak_mib"], 3) if ok else None
                rows.append(row)
                print(_line(row, args.modes), flush=True)

    previous = args.out.with_suffix(".json")
    commands = [command]
    if args.merge and previous.is_file():
        old = json.loads(previous.read_text())
        done = {(r["kind"], r["batch"], r["seq_len"], r["vocab"]) for r in rows}
        rows += [r for r in old["results"] if (r["kind"], r["batch"], r["seq_len"], r["vocab"]) not in done]
        rows.sort(key=lambda r: (r["vocab"], r["batch"], r["kind"]))
        commands = old["meta"].get("commands", [old["meta"]["command"]]) + commands
    meta = {
        "command": command,
        "commands": commands,
        "dtype": args.dtype,
        "chunk_size": args.chunk_size,
        "hidden_size": args.hidden_size,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "measure": "ru_maxrss growth over the baseline taken after allocating inputs; fresh subprocess per run",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    modes = [m for m in MODES if any(m in r for r in rows)]
    if args.hidden_size is None:
        title = "# Chunked vs unchunked logit divergence: peak CPU memory (forward + backward)"
        inputs = ("Peak = growth of `ru_maxrss` over a baseline taken after the student/teacher logits were allocated, "
                  "each configuration in a fresh subprocess; it includes the `[B, L, V]` gradient of the student logits.")
    else:
        title = "# Logit divergence from final hidden states and heads: peak CPU memory (forward + backward)"
        inputs = (f"Inputs: final hidden states `[B, L, D = {args.hidden_size}]` of both models and their "
                  "`Linear(D, V)` heads, allocated before the baseline. Peak = growth of `ru_maxrss` over that "
                  "baseline, each configuration in a fresh subprocess: the logits (unchunked, chunked), the loss's "
                  "intermediates and every gradient (hidden states, head weight). `head` never forms `[B, L, V]`.")
    lines = [
        title,
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in commands),
        "",
        f"torch {meta['torch']}, {meta['machine']}, {args.threads} threads; logits dtype {args.dtype}; "
        f"chunk_size {args.chunk_size}; every token masked in.",
        inputs,
        "",
        _header(modes),
        "|" + "---|" * _columns(modes),
    ]
    lines += [_line(r, modes) for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


def _columns(modes: list[str]) -> int:
    return 5 + len(modes) + sum(m != "unchunked" for m in modes) + len(modes)


def _header(modes: list[str]) -> str:
    peaks = [f"{m} peak (MiB)" for m in modes]
    ratios = [f"{m} / unchunked" for m in modes if m != "unchunked"]
    times = [f"{m} s" for m in modes]
    return "| " + " | ".join(["kind", "B", "L", "V", "logits (MiB, each)", *peaks, *ratios, *times]) + " |"


def _line(row: dict, modes: list[str]) -> str:
    res = [row.get(m, {}) for m in modes]
    peaks = [str(r.get("peak_mib", r.get("error", "-"))) for r in res]
    ratios = [str(row.get({"chunked": "ratio", "head": "head_ratio"}[m])) for m in modes if m != "unchunked"]
    times = [str(r.get("seconds", "-")) for r in res]
    cells = [row["kind"], row["batch"], row["seq_len"], row["vocab"], row["input_mib_each"], *peaks, *ratios, *times]
    return "| " + " | ".join(map(str, cells)) + " |"


if __name__ == "__main__":
    main()
