"""torchrun worker: under ZeRO-3 the position taps (rotary ``(cos, sin)``, MPNet's relative bias) and the
attention scores head_qk rebuilds from them equal an unsharded copy's. argv: model folder, task, output JSON
({"partitioned", "captures", "max_abs_diff"}, written by rank 0)."""
from __future__ import annotations

import json
import sys

import torch

from scaledkd import ds_config, models
from scaledkd.config import TrainConfig
from scaledkd.engine import dist, ds
from scaledkd.engine.module import TeacherRunner
from scaledkd.losses.attention import head_qk, qk_taps, scores


def main(path: str, task: str, out: str) -> None:
    dist.init(120)
    train = TrainConfig(batch_size=2)
    cfg = ds_config.teacher_ds_config(ds_config.read_ds_config("ds_configs/teacher_zero3.json"), train,
                                     dist.world_size())
    with ds.load_context(cfg):
        sharded = models.freeze(models.load_pretrained(path, task, 2))
    partitioned = all(hasattr(p, "ds_id") for p in sharded.parameters())
    engine = ds.initialize(sharded, cfg)
    with ds.load_context(None):
        plain = models.freeze(models.load_pretrained(path, task, 2))
    n = plain.config.num_hidden_layers
    taps = qk_taps(range(1, n + 1), plain.config)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(3, 90, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    batch["attention_mask"][1, 5:] = 0
    a = TeacherRunner(engine, taps)(batch)
    b = TeacherRunner(plain, taps)(batch)
    diffs = []
    for layer in range(1, n + 1):
        for x, y in zip(head_qk(a.captures, layer, plain.config), head_qk(b.captures, layer, plain.config)):
            diffs.append(0.0 if x is None and y is None else (x - y).abs().max().item())
        sa, sb = scores(*head_qk(a.captures, layer, plain.config)), scores(*head_qk(b.captures, layer, plain.config))
        diffs.append((sa - sb).abs().max().item())
    if dist.is_main():
        with open(out, "w") as f:
            json.dump({"partitioned": partitioned, "captures": len(a.captures), "max_abs_diff": max(diffs)}, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
