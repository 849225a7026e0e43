"""torchrun worker: models loaded partition by partition under ZeRO-3 (scaledkd.zero3_load) hold exactly the
weights of a plain load. argv: OUT_JSON FOLDER:TASK:NUM_LABELS:DTYPE ...  Rank 0 writes, per model,
{"partitioned": the partitioned loader ran (not transformers' fallback), "max_abs_diff": over every gathered
parameter and buffer, "dtypes": the parameters' dtypes of both loads, "logits_diff": forward through a DeepSpeed
engine against the plain model}."""
from __future__ import annotations

import json
import logging
import sys

import deepspeed
import torch

from scaledkd import ds_config, models
from scaledkd.config import TrainConfig
from scaledkd.engine import dist, ds


class _Seen(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.partitioned = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.partitioned += record.getMessage().startswith("partitioned load: ") and "read as" in record.getMessage()


def main(out: str, specs: list[str]) -> None:
    dist.init(120)
    seen = _Seen()
    logging.getLogger("scaledkd").addHandler(seen)
    logging.getLogger("scaledkd").setLevel(logging.INFO)
    report = {}
    for spec in specs:
        folder, task, num_labels, dtype_name = spec.split(":")
        # The teacher's DeepSpeed config carries the run's precision (zero.Init casts to it), as in a run.
        cfg = ds_config.teacher_ds_config(ds_config.read_ds_config("ds_configs/teacher_zero3.json"),
                                          TrainConfig(batch_size=2, precision=dtype_name), dist.world_size())
        dtype = {"fp32": None, "bf16": torch.bfloat16}[dtype_name]
        before = seen.partitioned
        with ds.load_context(cfg):
            sharded = models.load_pretrained(folder, task, int(num_labels), dtype)
        partitioned = seen.partitioned == before + 1 and all(hasattr(p, "ds_id") for p in sharded.parameters())
        with ds.load_context(None):
            plain = models.load_pretrained(folder, task, int(num_labels), dtype)
        dtypes = [sorted({str(p.dtype) for p in model.parameters()}) for model in (sharded, plain)]
        diff = 0.0
        reference = dict(plain.named_parameters())
        for name, param in sharded.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                diff = max(diff, (param.detach().float() - reference[name].detach().float()).abs().max().item())
        buffers = dict(plain.named_buffers())
        for name, buf in sharded.named_buffers():
            diff = max(diff, (buf.float() - buffers[name].float()).abs().max().item())
        engine = ds.initialize(models.freeze(sharded), cfg)
        engine.eval()
        torch.manual_seed(0)
        ids = torch.randint(5, 900, (2, 9))
        with torch.no_grad():
            logits_diff = (engine(input_ids=ids).logits.float() - plain(input_ids=ids).logits.float()).abs().max().item()
        report[spec] = {"partitioned": partitioned, "max_abs_diff": diff, "dtypes": dtypes, "logits_diff": logits_diff}
    if dist.is_main():
        with open(out, "w") as f:
            json.dump(report, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
