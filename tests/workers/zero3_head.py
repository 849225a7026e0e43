"""torchrun worker: lm_kd + lm_task from the final hidden states and the heads (head_chunks) train a ZeRO-3 student
against a ZeRO-3 teacher exactly as the full-logits path does, with tied and untied heads, the heads' weights
partitioned (persistence threshold 0) and each rank scoring a different number of tokens (so a different number of
chunks). Writes {"partitioned", "head_form", "losses": {tied: {path: [per-step losses]}}} to argv[1] from rank 0.
"""
from __future__ import annotations

import json
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from scaledkd import ds_config, models
from scaledkd.config import TrainConfig
from scaledkd.engine import dist, ds
from scaledkd.engine.module import DistillModule, TeacherRunner
from scaledkd.losses import LossSetup, build_loss

VOCAB, STEPS = 300, 3


def llama(width: int, layers: int, tied: bool, seed: int):
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=width, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=width // 4,
                                  intermediate_size=2 * width, max_position_embeddings=32, attention_dropout=0.0,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def batch_of(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7 - 4 * rank:] = 0  # rank 0 scores 17 tokens, rank 1 scores 13
    labels = ids.roll(-1, 1).masked_fill(mask == 0, -100)
    labels[:, -1] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(tied: bool, head_chunks: bool, teacher_engine, train: TrainConfig) -> tuple[list[float], bool, bool]:
    student = llama(32, 1, tied, seed=1)
    teacher_config = teacher_engine.module.config
    losses = {
        "lm_kd": build_loss("lm_kd", LossSetup(student.config, teacher_config, None, "causal_lm", "lm_kd", True),
                            {"divergence": "jsd", "temperature": 2.0, "chunk_size": 4, "head_chunks": head_chunks}),
        "lm_task": build_loss("lm_task", LossSetup(student.config, None, None, "causal_lm", "lm_task", True),
                              {"chunk_size": 3, "head_chunks": head_chunks}),
    }
    module = DistillModule(student, losses, {"lm_kd": 1.0, "lm_task": 0.5})
    teacher = TeacherRunner(teacher_engine, module.teacher_taps(), head=module.teacher_head())
    cfg = ds_config.fill_bucket_sizes(ds_config.student_ds_config(ds_config.read_ds_config("ds_configs/zero3.json"),
                                                                  train, dist.world_size()), student.config.hidden_size)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # tiny heads are partitioned too
    engine = ds.initialize(module, cfg, optimizer=torch.optim.AdamW(module.parameters(), lr=1e-2))
    head = student.get_output_embeddings().weight
    partitioned = hasattr(head, "ds_id") and not head.ds_persist
    batch = batch_of(dist.rank())
    values = []
    for _ in range(STEPS):
        total, _ = engine(batch, teacher(batch))
        engine.backward(total)
        engine.step()
        values.append(dist.mean_across_ranks(total.detach().reshape(1)).item())
    return values, partitioned, module.head is not None and teacher.head is not None


def main(out: str) -> None:
    dist.init(120)
    train = TrainConfig(batch_size=2)
    t_cfg = ds_config.teacher_ds_config(ds_config.read_ds_config("ds_configs/teacher_zero3.json"), train,
                                       dist.world_size())
    teacher_engine = ds.initialize(models.freeze(llama(64, 2, True, seed=0)), t_cfg)
    teacher_engine.eval()
    report = {"losses": {}, "partitioned": True, "head_form": True}
    for tied in (False, True):
        report["losses"][str(tied)] = {}
        for head_chunks in (True, False):
            values, partitioned, head_form = run(tied, head_chunks, teacher_engine, train)
            report["losses"][str(tied)]["head" if head_chunks else "logits"] = values
            report["partitioned"] &= partitioned
            if head_chunks:
                report["head_form"] &= head_form
    if dist.is_main():
        with open(out, "w") as f:
            json.dump(report, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
