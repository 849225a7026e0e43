"""torchrun worker: a ZeRO-3 student's on-policy rows equal the greedy continuations of an unsharded copy, with
its weights gathered for generation and with them kept sharded (ranks forwarding in step). Each rank generates
from its own batch. Writes {"rows", "mismatches", "lm_kd"} per mode to argv[2] + ".rank<r>.json"."""
from __future__ import annotations

import dataclasses
import json
import sys

import deepspeed
import torch
from transformers import AutoModelForCausalLM

from scaledkd.build import resolve
from scaledkd.config import load_config
from scaledkd.engine import dist
from scaledkd.engine import run as run_mod
from scaledkd.engine.step import distill_step
from scaledkd.onpolicy import prompt_span


def greedy(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == eos:
                break
    return ids[len(prompt):]


def main(recipe: str, out: str) -> None:
    run = run_mod.setup(resolve(load_config(recipe)))
    student = run.engine.module.student
    cfg, eos = run.on_policy.cfg, run.tokenizer.eos_token_id
    report = {}
    for gather in (True, False):
        run.on_policy.cfg = dataclasses.replace(cfg, gather_zero3=gather)
        batch = next(run.batches(0))
        mixed = run.on_policy(batch, 0)
        with deepspeed.zero.GatheredParameters(list(student.parameters())):  # a collective: every rank
            state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        plain = AutoModelForCausalLM.from_config(student.config)
        plain.load_state_dict(state)
        plain.eval()
        mismatches = 0
        for r in range(batch["input_ids"].shape[0]):
            ids = batch["input_ids"][r].tolist()
            s, e = prompt_span(ids, batch["loss_mask"][r].tolist(), batch["position_ids"][r].tolist(), len(ids), eos,
                               cfg.prefix_tokens, run.on_policy.max_prompt)
            cont = greedy(plain, ids[s:e], cfg.max_new_tokens, eos)
            mismatches += mixed["input_ids"][r, :e - s + len(cont)].tolist() != ids[s:e] + cont
        terms = distill_step(run.engine, run.teacher, mixed)  # and the engine trains on after generating
        report["gather" if gather else "sharded"] = {
            "rows": batch["input_ids"].shape[0], "mismatches": mismatches, "lm_kd": terms["lm_kd"],
            "first_row": batch["input_ids"][0].tolist()}
    with open(f"{out}.rank{dist.rank()}.json", "w") as f:
        json.dump(report, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
