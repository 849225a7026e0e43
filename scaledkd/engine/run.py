"""One run, top to bottom: plan -> run folder -> data -> models -> losses -> taps -> engines -> loop -> evaluation
-> export.

The same function serves every launcher (none, torchrun, deepspeed, accelerate, srun): ranks come from the
environment, and every collective (ZeRO-3 forwards, checkpoint shards, consolidation) is reached by all ranks.
The config was resolved into a :class:`~scaledkd.build.RunPlan` before anything here runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import __version__, checkpoint, data, evaluation, models
from ..build import RunPlan, resolve
from ..cache import CachedTeacher, TeacherCache
from ..config import Config, LossConfig
from ..errors import Preempted
from ..export import gather_student_state, save_student
from ..files import FINISHED_MARKER, write_json, write_text_atomic
from ..inputs import eval_batches as _eval_batches
from ..inputs import model_inputs, to_device
from ..mixup import EmbeddingMixup
from ..onpolicy import OnPolicy
from ..resume import record_changes
from ..trackers import Trackers
from . import accel, dist, rundir
from .batches import ShardedBatches, StreamBatches
from .budget import Budget, holdout_split, plan_budget
from .early_stopping import STATE_KEY as EARLY_STOPPING
from .early_stopping import EarlyStopping
from .module import DistillModule, TeacherRunner
from .signals import StopRequests
from .step import PhaseTimer, distill_step, step_flops_per_token

log = logging.getLogger("scaledkd")


def eval_batches(dataset, batch_size: int, collate):
    """Dev batches on this rank's device."""
    return _eval_batches(dataset, batch_size, collate, dist.device())


# ------------------------------------------------------------------------------------------ setup


@dataclass
class Run:
    """A run ready to train: its plan, folder, data, engines and loop settings.

    Attributes:
        plan: the resolved plan (config, task, sources, DeepSpeed configs, losses).
        run_dir: the run folder.
        replaced: where ``overwrite=true`` moved the previous run (put back if this run fails), else None.
        tokenizer, train_set, dev_set, collate: tokenised splits and their collator.
        engine: the student's DeepSpeed engine around the :class:`DistillModule`.
        teacher: the teacher's runner (forward with taps), or its outputs read from ``teacher.cache``; None without
            a teacher.
        teacher_model: the teacher (or its ZeRO-3 engine), for evaluation and timing; None when training from a
            teacher cache.
        batches: the training micro-batches; total_steps: optimiser steps of the run.
        mixup: CR-ILD's embedding mixup, when ``train.mixup``.
        timer: the step-time split of this process (:class:`PhaseTimer`).
        on_policy: ``data.on_policy``'s batch transformation (student continuations), None when off.
        budget: how ``total_steps`` was decided (:func:`~scaledkd.engine.budget.plan_budget`).
        early_stopping: ``train.early_stopping``'s holdout scorer and rule, None when off.
    """

    plan: RunPlan
    run_dir: Path
    replaced: Path | None
    tokenizer: Any
    train_set: Any
    dev_set: Any
    collate: Any
    engine: Any
    teacher: TeacherRunner | CachedTeacher | None
    teacher_model: Any
    batches: ShardedBatches | StreamBatches
    total_steps: int
    mixup: EmbeddingMixup | None
    timer: PhaseTimer = field(default_factory=PhaseTimer)  # where the step time went, per window and for the run
    on_policy: OnPolicy | None = None
    budget: Budget | None = None
    early_stopping: EarlyStopping | None = None

    @property
    def cfg(self) -> Config:
        return self.plan.cfg

    @property
    def task(self) -> str:
        return self.plan.task

    @property
    def spec(self) -> data.TaskSpec:
        return self.plan.spec


def _weight_decay_groups(module: torch.nn.Module, cfg: Config) -> list[dict[str, Any]]:
    decay, no_decay, proj = [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("losses.") and cfg.train.projection_lr is not None:
            proj.append(p)
        elif p.dim() < 2 or "norm" in name.lower():
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if proj:
        groups.append({"params": proj, "weight_decay": cfg.train.weight_decay, "lr": cfg.train.projection_lr})
    return [g for g in groups if g["params"]]


def warmup_linear(total_steps: int, warmup_ratio: float):
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def validate(cfg: Config) -> dict[str, Any]:
    """``scaledkd validate``: the run plan of ``cfg`` (every check ``distill`` makes before its first step)."""
    return resolve(cfg).summary()


def setup(plan: RunPlan) -> Run:
    """Build a run from its plan: folder, data, engines (teacher, then student), losses, optimiser.

    If anything fails once ``overwrite=true`` moved an old run aside, the old run is put back.
    """
    cfg = plan.cfg
    dist.init(cfg.train.dist_timeout_s)
    run_dir, replaced = rundir.prepare(cfg)
    try:
        return _setup(plan, run_dir, replaced)
    except BaseException:
        rundir.restore(run_dir, replaced)
        raise


def _setup(plan: RunPlan, run_dir: Path, replaced: Path | None) -> Run:
    cfg, task = plan.cfg, plan.task
    _seed_everything(cfg.train.seed)
    set_tf32(cfg.train.tf32)

    # Data (every rank reads; it is small next to the models).
    tokenizer = models.load_tokenizer(plan.tokenizer_source)
    causal_lm = task == "causal_lm"
    train_split, dev_split = (data.prepare_split(cfg.data, tokenizer, split, cfg.train.seed, causal_lm=causal_lm,
                                                 examples=plan.examples.get(split)) for split in ("train", "dev"))
    train_set, dev_set, collate = train_split.rows, dev_split.rows, train_split.collate
    if causal_lm:
        log.info("data.task='lm': %s train rows, %d held-out rows of up to %d tokens (packing=%s)",
                 "streamed" if cfg.data.streaming else len(train_set), len(dev_set), cfg.data.max_length,
                 cfg.data.packing)

    # Engines: DeepSpeed directly or through Accelerate's plugins (train.backend), one config per model.
    engines = accel.engine_factory(cfg.train, student=plan.ds_student, teacher=plan.ds_teacher)

    # Teacher: its own DeepSpeed config; partitioned at load time under ZeRO-3.
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
    teacher_model, teacher_engine = None, None
    cache = TeacherCache.open(cfg.teacher.cache, train_set) if cfg.teacher is not None and cfg.teacher.cache else None
    if plan.teacher_path is not None and cache is None:  # a teacher cache stands in for the teacher: never loaded
        with engines.load_context("teacher"):
            teacher_model = models.freeze(models.load_pretrained(plan.teacher_path, task, plan.spec.num_labels, dtype))
        if plan.teacher_zero3:
            teacher_engine = engines.initialize("teacher", teacher_model)
            teacher_engine.eval()
        else:
            teacher_engine = teacher_model.to(dist.device())

    # Student: built rank-locally (its kept blocks read from the source's files), partitioned by its engine.
    torch.manual_seed(cfg.train.seed)  # the same fresh heads/projections on every rank
    with engines.load_context("student" if cfg.student.init == "pretrained" else None):
        student = models.build_student(cfg.student, plan.teacher_path, task, plan.spec.num_labels)
    if cfg.student.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    losses, weights = plan.build_losses()
    if causal_lm and cfg.data.packing and any("qkv" in lp.needs for lp in plan.losses):
        log.warning("packed rows: attention/relation losses compare scores over each row's whole causal prefix, "
                    "across document boundaries the models do not attend over; data.packing=false makes them exact")
    if cfg.student.freeze:
        student.requires_grad_(False)  # only the losses' own modules (TED filters, heads) train
    for loss in losses.values():
        loss.load_artifacts()  # e.g. TED's stage-I filters, loaded before the engine partitions them
    mixup = EmbeddingMixup(cfg.train.mixup_alpha, cfg.train.seed) if cfg.train.mixup else None
    module = DistillModule(student, losses, weights, mixup=mixup)
    teacher = (TeacherRunner(teacher_engine, module.teacher_taps(), mixup=mixup, head=module.teacher_head())
               if teacher_engine is not None else None)
    if cache is not None:
        teacher = CachedTeacher(cache, module.teacher_taps(), dist.device())

    # Budget: the steps train.max_steps / epochs / min_steps give on the rows trained on (engine/budget.py).
    early_stopping = None
    if cfg.data.streaming:  # build.resolve made sure train.max_steps is set
        budget = plan_budget(cfg.train, None, dist.world_size())
        batches = StreamBatches(train_set, cfg.train.batch_size, collate, budget.steps * cfg.train.grad_accum)
    else:
        budget = plan_budget(cfg.train, len(train_set), dist.world_size())
        trained_rows = None
        if cfg.train.early_stopping is not None:  # a seeded share of the training rows, never trained on
            trained_rows, held = holdout_split(len(train_set), cfg.train)
            early_stopping = EarlyStopping(cfg.train.early_stopping, train_set.select(held), cfg.train.batch_size,
                                           collate, task, plan.spec.name,
                                           floor=min(cfg.train.min_steps or 0, budget.steps))
        batches = ShardedBatches(train_set, cfg.train.batch_size, cfg.train.seed, collate, rows=trained_rows)
    total_steps = budget.steps
    if dist.is_main():
        log.info("budget: %s", budget.describe())
    optimizer = torch.optim.AdamW(_weight_decay_groups(module, cfg), lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total_steps, cfg.train.warmup_ratio))
    engine = engines.initialize("student", module, optimizer=optimizer, lr_scheduler=scheduler)
    run = Run(plan=plan, run_dir=run_dir, replaced=replaced, tokenizer=tokenizer, train_set=train_set,
              dev_set=dev_set, collate=collate, engine=engine, teacher=teacher, teacher_model=teacher_engine,
              batches=batches, total_steps=total_steps, mixup=mixup, budget=budget, early_stopping=early_stopping)
    run.timer.flops_per_token = step_flops_per_token(
        models.count_parameters(student), models.count_parameters(teacher_engine) if teacher_engine is not None else 0)
    if cfg.data.on_policy is not None:
        run.on_policy = OnPolicy(cfg.data.on_policy, engine, tokenizer, cfg.data.max_length, cfg.train.seed)
    if dist.is_main():
        if plan.resume_from is not None:
            record_changes(run_dir, cfg, plan.resume_from)  # allowed changes, before config.yaml shows the new values
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        init_dir = run_dir / "student_init"
        init_dir.mkdir(exist_ok=True)
        student.config.save_pretrained(init_dir)
        tokenizer.save_pretrained(init_dir)
        write_json(init_dir / "run_info.json", {"task": task, "student_source": plan.student_source})
    dist.barrier()
    return run


def set_tf32(enabled: bool) -> None:
    """``train.tf32``: TF32 tensor cores for fp32 matrix products on CUDA (no effect without a GPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    if enabled and torch.cuda.is_available():
        log.info("train.tf32: fp32 matrix products use TF32 tensor cores")


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ evaluation


def evaluate(run: Run, model=None) -> dict[str, float]:
    """Dev scores of the student (or ``model``): GLUE metrics, held-out perplexity for causal LMs, or agreement
    with the teacher when task-agnostic."""
    module = run.engine.module
    model = model if model is not None else module.student
    batches = eval_batches(run.dev_set, run.cfg.train.batch_size, run.collate)
    if run.task == "causal_lm":
        return evaluation.perplexity(model, batches)
    if run.task == "agnostic":
        if run.teacher_model is None:
            return {}
        return evaluation.agreement(model, run.teacher_model, batches)
    return evaluation.evaluate_task(model, batches, run.task, run.spec.name)


# ------------------------------------------------------------------------------------------ the loop


class _Log:
    """``log.jsonl`` (rank 0), and the same records to the run's trackers: step records as they are, evaluations
    under ``eval/``, the teacher's scores under ``teacher/``."""

    def __init__(self, path: Path, trackers: Trackers | None = None) -> None:
        self.path = path
        self.trackers = trackers

    def write(self, record: dict[str, Any]) -> None:
        if dist.is_main():
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.trackers is None:
            return
        event = record.get("event")
        if event is None and "step" in record:
            self.trackers.log(record, record["step"])
        elif event == "eval":
            self.trackers.log(record, record["step"], "eval/")
        elif event == "teacher_eval":
            self.trackers.log(record, 0, "teacher/")
        elif event == "holdout":
            self.trackers.log(record, record["step"], "holdout/")


def train(run: Run) -> dict[str, Any]:
    """The training loop with its log and trackers; returns what :func:`finish` exports and records."""
    cfg = run.cfg
    trackers = Trackers(cfg.train.report_to, run.run_dir, run.run_dir.name, cfg.to_dict(), dist.is_main())
    try:
        return _train(run, _Log(run.run_dir / "log.jsonl", trackers))
    finally:
        trackers.finish()


def _train(run: Run, logfile: _Log) -> dict[str, Any]:
    cfg, engine = run.cfg, run.engine
    total_steps = run.total_steps
    state = {"step": 0, "micro": 0, "best": None, "history": []}
    if run.plan.resume_from is not None:
        root, tag = run.plan.resume_from
        state = checkpoint.load(engine, root, tag)
        run.batches.load_state_dict(checkpoint.data_state(root, tag))  # a stream's place on this rank
        log.info("resumed from %s at step %d", root / tag, state["step"])
        logfile.write({"event": "resumed", "step": state["step"], "checkpoint": str(root / tag)})

    teacher_score = None
    if run.task == "agnostic" and state["step"] == 0:
        _record_eval(state, 0, evaluate(run), logfile)  # the copied student's agreement before distillation
    if run.task != "agnostic" and run.teacher_model is not None:
        teacher_score = evaluate(run, model=run.teacher_model)
        logfile.write({"event": "teacher_eval", **teacher_score})

    bar = None
    if dist.is_main() and cfg.train.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc="distill" if run.teacher else "train",
                   unit="step", dynamic_ncols=True)
    keep = cfg.train.keep_checkpoints or None
    with StopRequests() as stops:
        step, best_state = _loop(run, state, logfile, bar, stops, keep)
    if bar is not None:
        bar.close()

    last = state["history"][-1] if state["history"] else None
    if last is not None and last["step"] == step:  # an early stop at an evaluation: the student has not moved since
        final = {k: v for k, v in last.items() if k != "step"}
    else:  # every rank alike (a collective under ZeRO-3): each holds the same history
        final = evaluate(run)
        _record_eval(state, step, final, logfile)
    if step > 0 and not (run.run_dir / checkpoint.CHECKPOINTS / f"step_{step}").is_dir():
        checkpoint.save(engine, run.run_dir, step, state, keep=keep,
                        data_state=run.batches.state_dict())  # the end: `scaledkd export` works afterwards
    final_state = gather_student_state(engine.module)
    exported = "final"
    if cfg.train.export == "best" and state["best"] and state["best"]["step"] != step and best_state is not None:
        final_state, exported = best_state, f"best (step {state['best']['step']})"
    return {"state": state, "final": final, "teacher": teacher_score, "student_state": final_state,
            "exported": exported, "steps": step}


def _loop(run: Run, state: dict[str, Any], logfile: _Log, bar, stops: StopRequests, keep: int | None
          ) -> tuple[int, Any]:
    """Optimiser steps until ``run.total_steps``; checkpoints on schedule and on a stop request (then
    :class:`Preempted`). Returns the last step and the best evaluation's student state (``export: best``)."""
    cfg, engine = run.cfg, run.engine
    total_steps, batches = run.total_steps, run.batches
    window: dict[str, float] = {}
    counts: dict[str, int] = {}  # micro-batches behind each window sum (grad_norm/* exist on logged steps only)
    window_n = 0
    tic = time.perf_counter()
    samples_per_step = cfg.train.batch_size * cfg.train.grad_accum * dist.world_size()
    best_state = None
    step = state["step"]
    num_epochs = math.ceil(total_steps * cfg.train.grad_accum / batches.per_epoch)  # ramps: epoch / num_epochs
    mixup = run.mixup
    timer = run.timer
    last_save = time.monotonic()
    stopper = run.early_stopping

    def log_window(step: int, end: float) -> None:
        """One log record for the steps since the last (mean terms, rates, step-time split); a new window."""
        nonlocal window, counts, window_n, tic
        elapsed = end - tic
        steps_in_window = max(1, window_n // cfg.train.grad_accum)
        phases = timer.take(steps_in_window, elapsed)
        record = {"step": step, **{k: v / counts[k] for k, v in window.items()},
                  "lr": engine.get_lr()[0], "samples_per_s": samples_per_step * steps_in_window / elapsed,
                  "tokens_per_s": phases.pop("tokens") * dist.world_size() / elapsed, **phases}
        if run.on_policy is not None:
            record.update(run.on_policy.take(steps_in_window))
        logfile.write(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s'] or 0:.1f}")
        window, counts, window_n, tic = {}, {}, 0, time.perf_counter()

    while step < total_steps and not (state.get(EARLY_STOPPING) or {}).get("stopped"):
        epoch, skip = divmod(state["micro"], batches.per_epoch)
        for batch in batches(epoch, skip):
            if mixup is not None:
                batch = mixup.prepare(batch, state["micro"], step, epoch / num_epochs)
            if run.on_policy is not None:
                batch = run.on_policy(batch, state["micro"])  # student continuations replace some rows
            logged = (step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps  # this micro-batch's step
            terms = distill_step(engine, run.teacher, batch, timer, grad_norms=cfg.train.log_grad_norms and logged)
            state["micro"] += 1
            for k, v in terms.items():
                window[k] = window.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
            window_n += 1
            if state["micro"] % cfg.train.grad_accum:
                continue  # inside an accumulation window: DeepSpeed has not stepped yet
            step = state["step"] = step + 1
            step_end = time.perf_counter()
            if step % cfg.train.log_every == 0 or step == total_steps:
                log_window(step, step_end)
            if bar is not None:
                bar.update(1)
            is_eval = cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps
            early_stop = False
            if is_eval:
                scores = evaluate(run)
                _record_eval(state, step, scores, logfile)
                if stopper is not None:  # the holdout of the training rows decides, never the dev set
                    early_stop = stopper.check(engine.module.student, step, state, logfile.write)
                if cfg.train.export == "best" and state["best"] and state["best"]["step"] == step:
                    best_state = gather_student_state(engine.module)
            if early_stop and window_n:  # the run ends mid-window: its last steps are logged as a last step is
                log_window(step, step_end)
            on_schedule = bool(cfg.train.save_every and step % cfg.train.save_every == 0)
            on_time = bool(cfg.train.save_every_min and time.monotonic() - last_save >= 60 * cfg.train.save_every_min)
            stop, save = dist.any_across_ranks([stops.requested, on_schedule or on_time])
            if (save or stop) and (step < total_steps or stop):
                checkpoint.save(engine, run.run_dir, step, state, keep=keep, data_state=run.batches.state_dict())
                last_save = time.monotonic()
            if stop:
                logfile.write({"event": "stopped", "step": step, "signal": stops.received or "another rank's"})
                raise Preempted(
                    f"stopped on {stops.received or 'a stop request on another rank'} after step {step} of "
                    f"{total_steps}, with a checkpoint in {run.run_dir / checkpoint.CHECKPOINTS}; run the same command "
                    "with train.resume=auto (or latest) to continue"
                )
            if step >= total_steps or early_stop:
                break
    return step, best_state


def _record_eval(state: dict[str, Any], step: int, scores: dict[str, float], logfile: _Log) -> None:
    if not scores:
        return
    entry = {"step": step, **scores}
    state["history"].append(entry)
    if state["best"] is None or scores.get("score", -math.inf) > state["best"].get("score", -math.inf):
        state["best"] = entry
    logfile.write({"event": "eval", **entry})


# ------------------------------------------------------------------------------------------ finish


def measure_latency(model, batch, repeats: int = 5) -> float:
    """Median forward seconds for ``batch`` (no grad)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model(**model_inputs(batch))
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def finish(run: Run, result: dict[str, Any]) -> dict[str, Any]:
    """Export the student, write metrics.json (the finished-run marker) and return the summary."""
    cfg = run.cfg
    student = run.engine.module.student
    probe = next(eval_batches(run.dev_set, min(32, len(run.dev_set)), run.collate))
    was = student.training
    student.eval()
    timing = {"student_forward_s": measure_latency(student, probe)}
    if run.teacher_model is not None:
        timing["teacher_forward_s"] = measure_latency(run.teacher_model, probe)
        timing["speedup"] = timing["teacher_forward_s"] / timing["student_forward_s"]
    timing["probe_batch"] = list(probe["input_ids"].shape)
    if run.timer.run_steps:
        timing["step_ms"] = run.timer.run_step_ms()
        timing["tokens_per_s"] = run.timer.run_tokens * dist.world_size() / max(1e-9, run.timer.run_seconds)
    student.train(was)
    sizes = {"student_params": models.count_parameters(student)}
    if run.teacher_model is not None:
        sizes["teacher_params"] = models.count_parameters(run.teacher_model)
        sizes["compression"] = sizes["teacher_params"] / sizes["student_params"]
    extra = {}
    if run.task == "agnostic" and run.teacher_model is not None:
        sts = sts_zero_shot(run)
        if sts:
            extra["STS-B"] = sts
    metrics = {
        "task": cfg.data.task,
        "steps": result["steps"],
        "final": result["final"],
        "best": result["state"]["best"],
        "teacher": result["teacher"],
        "exported": result["exported"],
        "selected_metric": "score" if result["final"] else None,
        "history": result["state"]["history"],
        "budget": run.budget.as_dict() if run.budget is not None else None,
        "early_stopping": result["state"].get(EARLY_STOPPING),  # the holdout record, when train.early_stopping
        "size": sizes,
        "speed": timing,
        "extra": extra,
    }
    metrics["artifacts"] = [str(path) for path in save_loss_artifacts(run)]
    if dist.is_main():
        provenance = {
            "teacher": cfg.teacher.source if cfg.teacher else None,
            "student_init": {"init": cfg.student.init, "from": run.plan.student_source, "layers": cfg.student.layers,
                             "copied_blocks": getattr(student.config, "scaledkd_init", None)},
            "losses": [{"name": lc.name, "weight": lc.weight, "mapping": _mapping_of(run, i, lc), "params": lc.params}
                       for i, lc in enumerate(cfg.losses)],
            "data": {"task": cfg.data.task, "source": cfg.data.source, "data_dir": cfg.data.data_dir,
                     "train_file": cfg.data.train_file, "max_train_samples": cfg.data.max_train_samples,
                     "label_noise": cfg.data.label_noise,
                     "train_examples": "streamed" if cfg.data.streaming else len(run.train_set),
                     "dataset": dataclasses.asdict(cfg.data.dataset) if cfg.data.dataset else None,
                     "supplementary": dataclasses.asdict(cfg.data.supplementary) if cfg.data.supplementary else None},
            "mixup": {"alpha": cfg.train.mixup_alpha} if cfg.train.mixup else None,
            "task": run.task, "seed": cfg.train.seed, "steps": result["steps"], "exported": result["exported"],
            "final": result["final"], "best": result["state"]["best"], "teacher_scores": result["teacher"],
        }
        student_cfg = student.config
        if hasattr(student_cfg, "scaledkd_init"):
            del student_cfg.scaledkd_init  # provenance lives in its own file, not in the HF config
        save_student(student, result["student_state"], run.run_dir / "student", run.tokenizer, provenance,
                     yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        metrics["export_dir"] = str(run.run_dir / "student")
        if run.task == "causal_lm":
            prompt = data.lm.sample_prompt(run.dev_set, run.tokenizer)
            metrics["sample"] = evaluation.generate_sample(run.run_dir / "student", prompt)
            print(f"sample from the exported student: {prompt!r} -> {metrics['sample']['completion']!r}", flush=True)
        metrics["scaledkd_version"] = __version__
        write_json(run.run_dir / FINISHED_MARKER, metrics)
    dist.barrier()
    return metrics


def save_loss_artifacts(run: Run) -> list[Path]:
    """Files the losses leave in the run folder (TED's stage-I filters), written before the finished marker.

    A collective under ZeRO-3 (each loss's parameters are gathered on every rank); rank 0 writes.
    """
    import deepspeed
    from safetensors.torch import save_file

    written = []
    for loss in run.engine.module.losses.values():
        params = [p for p in loss.parameters() if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
            files = loss.artifacts() if dist.is_main() else {}
        for name, (tensors, metadata) in files.items():
            save_file(tensors, str(run.run_dir / name), metadata=metadata)
            written.append(run.run_dir / name)
    dist.barrier()
    return written


def _sts_dev_file(cfg: Config) -> Path | None:
    roots = [cfg.data.data_dir, os.environ.get(data.DATA_DIR_ENV)]
    for root in filter(None, roots):
        for candidate in (Path(root) / "STS-B" / "dev.tsv", Path(root) / "glue" / "STS-B" / "dev.tsv"):
            if candidate.is_file():
                return candidate
    return None


def sts_zero_shot(run: Run) -> dict[str, float] | None:
    """Zero-shot STS-B dev Spearman of teacher and student sentence embeddings (cosine of mean-pooled states),
    when the STS-B dev file is found under ``data.data_dir`` or ``$SCALEDKD_DATA_DIR``."""
    path = _sts_dev_file(run.cfg)
    if path is None:
        return None
    rows = data.read_glue_tsv("stsb", path, "dev")
    pairs = [(r["text_a"], r["text_b"]) for r in rows]
    gold = [float(r["label"]) for r in rows]

    def encoder(model):
        def encode(texts: list[str]) -> torch.Tensor:
            out = []
            for i in range(0, len(texts), 64):
                enc = run.tokenizer(texts[i:i + 64], padding=True, truncation=True,
                                    max_length=run.cfg.data.max_length, return_tensors="pt")
                enc = to_device(dict(enc), dist.device())
                hidden = evaluation.last_hidden(model(**model_inputs(enc))).float()
                out.append(evaluation.mean_pool(hidden, enc["attention_mask"]).cpu())
            return torch.cat(out)
        return encode

    student = run.engine.module.student
    was = student.training
    student.eval()
    result = {"teacher_spearman": evaluation.sts_spearman(encoder(run.teacher_model), pairs, gold),
              "student_spearman": evaluation.sts_spearman(encoder(student), pairs, gold)}
    student.train(was)
    result["student_pct_of_teacher"] = 100.0 * result["student_spearman"] / result["teacher_spearman"]
    return result


def _mapping_of(run: Run, index: int, lc: LossConfig):
    pairs = run.plan.losses[index].pairs
    return [list(p) for p in pairs] if pairs is not None else lc.mapping


def run_distillation(cfg: Config) -> dict[str, Any]:
    """The whole job: resolve, set up, train, evaluate, export. Returns the metrics written to metrics.json.

    With ``overwrite=true`` the run it replaces is deleted only after this one finished and exported, and put
    back if it fails.
    """
    run = setup(resolve(cfg))
    try:
        metrics = finish(run, train(run))
    except Preempted:
        raise  # resumable where it is: the run it replaced stays aside until the resumed run finishes
    except BaseException:
        rundir.restore(run.run_dir, run.replaced)
        raise
    rundir.drop_replaced(run.replaced)
    return metrics

