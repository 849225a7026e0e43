"""Attention KL between a lower-initialised student and its teacher at initialisation, computed without scaledkd.

A student built from the teacher's blocks 1..N_s computes, before training, exactly those blocks' attention maps
(same weights, same input), so the KL that ``attn_kl`` starts from under a mapping can be read off the teacher's
own eager attention probabilities (``output_attentions`` of transformers). This checks the loss's sign, scale and
padding handling against an independent implementation, and shows what a mapping asks of the student:
``uniform`` (student i <-> teacher 2i for 3 of 6 blocks) against the blocks the student was copied from (KL 0).

    python benchmarks/quality/attention_kl_at_init.py <fine-tuned teacher folder> <GLUE pair TSV> [--rows 64]

The TSV is a GLUE sentence-pair file with the sentences in columns 8 and 9 (STS-B's layout).
"""
from __future__ import annotations

import argparse
import csv

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def row_kl(p_t: torch.Tensor, p_s: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over real query rows and heads of ``sum_k p_t log(p_t / p_s)`` over real keys; ``p [B, H, L, L]``."""
    kl = (p_t * (p_t.clamp_min(1e-30).log() - p_s.clamp_min(1e-30).log()))
    kl = kl.masked_fill(~mask[:, None, None, :], 0).sum(-1)  # [B, H, L]
    rows = mask[:, None, :].expand_as(kl)
    return float(kl[rows].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher")
    parser.add_argument("tsv")
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(args.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher, attn_implementation="eager").eval()
    with open(args.tsv) as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:args.rows + 1]
    enc = tok([r[7] for r in rows], [r[8] for r in rows], padding=True, truncation=True, max_length=128,
              return_tensors="pt")
    with torch.no_grad():
        att = teacher(**enc, output_attentions=True).attentions  # per block [B, H, L, L]
    mask = enc["attention_mask"].bool()
    for name, pairs in {"uniform (1-2, 2-4, 3-6)": [(1, 2), (2, 4), (3, 6)],
                        "copied blocks (1-1, 2-2, 3-3)": [(1, 1), (2, 2), (3, 3)]}.items():
        values = [row_kl(att[t - 1], att[s - 1], mask) for s, t in pairs]
        print(f"lower init, {name}: per pair {[round(v, 3) for v in values]}, sum {sum(values):.3f}")


if __name__ == "__main__":
    main()
