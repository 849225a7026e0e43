"""torchrun worker: a teacher partitioned at load time under ZeRO-3 gives the same tap captures as an
unsharded copy. Writes {"partitioned", "captures", "max_abs_diff"} to argv[2] from rank 0."""
from __future__ import annotations

import json
import sys

import torch

from scaledkd import ds_config, models
from scaledkd.config import TrainConfig
from scaledkd.engine import dist, ds
from scaledkd.engine.module import TeacherRunner
from scaledkd.taps import Tap


def main(path: str, out: str) -> None:
    dist.init(120)
    train = TrainConfig(batch_size=2)
    cfg = ds_config.teacher_ds_config(ds_config.read_ds_config("ds_configs/teacher_zero3.json"), train,
                                     dist.world_size())
    with ds.load_context(cfg):
        sharded = models.freeze(models.load_pretrained(path, "classification", 2))
    partitioned = all(hasattr(p, "ds_id") for p in sharded.parameters())
    engine = ds.initialize(sharded, cfg)
    with ds.load_context(None):
        plain = models.freeze(models.load_pretrained(path, "classification", 2))
    taps = {Tap("hidden", 0), Tap("hidden", 2), Tap("hidden", 4), Tap("q", 4), Tap("k", 4), Tap("v", 1)}
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 2000, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    batch["attention_mask"][1, 5:] = 0
    a = TeacherRunner(engine, taps)(batch)
    b = TeacherRunner(plain, taps)(batch)
    diffs = [(a.captures.get(t) - b.captures.get(t)).abs().max().item() for t in sorted(taps)]
    diffs.append((a.logits - b.logits).abs().max().item())
    if dist.is_main():
        with open(out, "w") as f:
            json.dump({"partitioned": partitioned, "captures": len(a.captures), "max_abs_diff": max(diffs)}, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
