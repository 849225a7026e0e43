"""Peak CPU memory of chunked vs unchunked token divergences (forward + backward) for decoder-LM logits.

Each (mode, kind, B, V) configuration runs in a fresh subprocess, so one run's allocator state cannot
leak into the next. The worker allocates the ``[B, L, V]`` student and teacher logits (and the mask),
records ``ru_maxrss`` as its baseline, runs ``token_divergence(...).backward()`` once, and reports the
growth of ``ru_maxrss``: the extra peak memory of the loss, its intermediates and the ``[B, L, V]``
gradient it produces, excluding the inputs every implementation needs.

"unchunked" is ``chunk_size=None`` (one plain-autograd pass over all masked tokens, i.e. what a naive
implementation does); "chunked" is the default custom-autograd path with ``--chunk-size`` tokens per chunk.

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
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("bfloat16", "float16", "float32")


def _maxrss_mib() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def worker(args: argparse.Namespace) -> None:
    """Run one configuration and print a JSON line with its peak-memory growth."""
    import torch

    sys.path.insert(0, str(REPO))
    from scaledkd.losses.divergence import token_divergence

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.seq_len, args.vocab)
    student = torch.randn(shape, dtype=dtype).mul_(2).requires_grad_()  # [B, L, V]
    teacher = torch.randn(shape, dtype=dtype).mul_(2)  # [B, L, V]
    mask = torch.ones(shape[:2], dtype=torch.bool)  # [B, L]: every token counts (worst case)
    # Warm the allocator and op dispatch on a tiny problem so one-off costs do not count as peak memory.
    tiny = torch.randn(1, 2, 8, dtype=dtype, requires_grad=True)
    token_divergence(tiny, tiny.detach(), torch.ones(1, 2, dtype=torch.bool), args.kind, chunk_size=1).backward()
    baseline = _maxrss_mib()

    chunk_size = None if args.mode == "unchunked" else args.chunk_size
    start = time.perf_counter()
    loss = token_divergence(student, teacher, mask, args.kind, chunk_size=chunk_size)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _maxrss_mib() - baseline
    print(json.dumps({"peak_mib": round(peak, 1), "seconds": round(seconds, 2), "loss": loss.item()}))


def run_one(args: argparse.Namespace, mode: str, kind: str, batch: int, vocab: int) -> dict:
    cmd = [
        sys.executable, __file__, "--worker",
        "--mode", mode, "--kind", kind, "--batch", str(batch), "--vocab", str(vocab),
        "--seq-len", str(args.seq_len), "--chunk-size", str(args.chunk_size),
        "--dtype", args.dtype, "--threads", str(args.threads),
    ]  # fmt: skip
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
    p.add_argument("--merge", action="store_true",
                   help="keep the existing results of configurations not measured in this invocation")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "chunked_logit_memory",
                   help="output path without suffix; .md and .json are written")  # fmt: skip
    # Worker-only arguments (one configuration per subprocess).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("chunked", "unchunked"), help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.batch, args.vocab = args.batch[0], args.vocab[0]
        worker(args)
        return

    import torch

    command = "python " + shlex.join([os.path.relpath(__file__, REPO), *sys.argv[1:]])
    bytes_per = torch.finfo(getattr(torch, args.dtype)).bits // 8
    rows = []
    header = (
        f"| kind | B | L | V | input logits (MiB, each) | unchunked peak (MiB) | chunked peak (MiB) "
        f"| chunked / unchunked | unchunked s | chunked s |"
    )
    print(header)
    print("|" + "---|" * 10)
    for vocab in args.vocab:
        for batch in args.batch:
            for kind in args.kinds:
                input_mib = batch * args.seq_len * vocab * bytes_per / 2**20
                limit = args.unchunked_max_input_mib
                if limit is not None and input_mib > limit:
                    # Measured: the unchunked peak is ~16.5x (forward KL) to ~24.5x (JSD) one bf16 input.
                    naive = {"error": f"skipped (est. >= {16.5 * input_mib / 1024:.0f} GiB)"}
                else:
                    naive = run_one(args, "unchunked", kind, batch, vocab)
                chunked = run_one(args, "chunked", kind, batch, vocab)
                ratio = (
                    chunked["peak_mib"] / naive["peak_mib"] if "error" not in naive and "error" not in chunked else None
                )
                row = {
                    "kind": kind, "batch": batch, "seq_len": args.seq_len, "vocab": vocab,
                    "input_mib_each": round(batch * args.seq_len * vocab * bytes_per / 2**20, 1),
                    "unchunked": naive, "chunked": chunked, "ratio": None if ratio is None else round(ratio, 3),
                }  # fmt: skip
                rows.append(row)
                fmt = lambda r, key: str(r.get(key, r.get("error")))  # noqa: E731
                print(
                    f"| {kind} | {batch} | {args.seq_len} | {vocab} | {row['input_mib_each']} "
                    f"| {fmt(naive, 'peak_mib')} | {fmt(chunked, 'peak_mib')} "
                    f"| {row['ratio']} | {fmt(naive, 'seconds')} | {fmt(chunked, 'seconds')} |",
                    flush=True,
                )

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
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "measure": "ru_maxrss growth over the baseline taken after allocating inputs; fresh subprocess per run",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = [
        "# Chunked vs unchunked logit divergence: peak CPU memory (forward + backward)",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in commands),
        "",
        f"torch {meta['torch']}, {meta['machine']}, {args.threads} threads; logits dtype {args.dtype}; "
        f"chunk_size {args.chunk_size}; every token masked in.",
        "Peak = growth of `ru_maxrss` over a baseline taken after the student/teacher logits were allocated, "
        "each configuration in a fresh subprocess; it includes the `[B, L, V]` gradient of the student logits.",
        "",
        header,
        "|" + "---|" * 10,
    ]
    for r in rows:
        n, c = r["unchunked"], r["chunked"]
        lines.append(
            f"| {r['kind']} | {r['batch']} | {r['seq_len']} | {r['vocab']} | {r['input_mib_each']} "
            f"| {n.get('peak_mib', n.get('error'))} | {c.get('peak_mib', c.get('error'))} | {r['ratio']} "
            f"| {n.get('seconds', '-')} | {c.get('seconds', '-')} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
