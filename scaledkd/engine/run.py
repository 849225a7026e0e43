"""One run, top to bottom: config -> models -> losses -> taps -> engines -> loop -> evaluation -> export.

The same function serves every launcher (none, torchrun, deepspeed, accelerate, srun): ranks come from the
environment, and every collective (ZeRO-3 forwards, checkpoint shards, consolidation) is reached by all ranks.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import __version__, arch, checkpoint, data, evaluation, models
from ..config import Config, ConfigError, LossConfig
from ..export import gather_student_state, save_student
from ..losses import LossSetup, build_loss
from ..mixup import EmbeddingMixup
from . import accel, dist, ds
from .module import DistillModule, TeacherRunner, model_inputs

log = logging.getLogger("scaledkd")

FINISHED_MARKER = "metrics.json"


class RunDirError(ValueError):
    """The output folder cannot be used as asked (finished run, foreign files)."""


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN/inf; the message names the step and the term."""


# ------------------------------------------------------------------------------------------ run folder


def refuse_finished(run_dir: Path, cfg: Config, what: str = "run") -> None:
    """A finished ``what`` (its ``FINISHED_MARKER``) in ``run_dir`` is kept unless ``overwrite=true``."""
    if (run_dir / FINISHED_MARKER).exists() and not cfg.overwrite:
        raise RunDirError(
            f"output_dir {str(run_dir)!r} already holds a finished {what} ({FINISHED_MARKER}); pass overwrite=true "
            "to replace it (the old run is moved aside first) or choose another output_dir"
        )


def prepare_run_dir(cfg: Config) -> Path:
    """Create/validate the run folder (rank 0 acts, everyone waits). Never damages what is there."""
    run_dir = Path(cfg.output_dir)
    if dist.is_main():
        refuse_finished(run_dir, cfg)
        if run_dir.exists() and any(run_dir.iterdir()) and not cfg.train.resume:
            if not cfg.overwrite:
                raise RunDirError(
                    f"output_dir {str(run_dir)!r} is not empty; resume an interrupted run with train.resume=latest, "
                    "pass overwrite=true (the old contents are moved aside), or choose another output_dir"
                )
            move_aside(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return run_dir


def move_aside(run_dir: Path) -> Path:
    """``overwrite=true``: rename the previous run; :func:`finish` deletes it once the new run has finished."""
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(aside)
    log.warning("overwrite=true: moved the previous run in %s to %s; it is deleted once this run finishes",
                run_dir, aside)
    return aside


def task_kind(spec: data.TaskSpec) -> models.TaskKind:
    if spec.name == "lm":
        return "causal_lm"
    if spec.num_labels == 0:
        return "agnostic"
    return "regression" if spec.is_regression else "classification"


# ------------------------------------------------------------------------------------------ batches


class ShardedBatches:
    """Seeded, rank-sharded micro-batches; the same (seed, epoch, position) always gives the same batch.

    Every rank gets the same number of micro-batches (the remainder of an epoch is dropped) so collectives
    stay in step; resuming skips the micro-batches already consumed.
    """

    def __init__(self, dataset, batch_size: int, seed: int, collate) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.collate = collate
        self.per_epoch = len(dataset) // (batch_size * dist.world_size())
        if self.per_epoch == 0:
            raise ConfigError(
                f"the training set has {len(dataset)} examples, fewer than one global batch "
                f"({batch_size} x {dist.world_size()} ranks); lower train.batch_size"
            )

    def __call__(self, epoch: int, skip: int = 0):
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
        mine = order[dist.rank():: dist.world_size()]
        for i in range(skip, self.per_epoch):
            idx = mine[i * self.batch_size:(i + 1) * self.batch_size].tolist()
            yield to_device(self.collate([self.dataset[j] for j in idx]))


def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dev = dist.device()
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def eval_batches(dataset, batch_size: int, collate):
    for i in range(0, len(dataset), batch_size):
        yield to_device(collate([dataset[j] for j in range(i, min(len(dataset), i + batch_size))]))


# ------------------------------------------------------------------------------------------ the step


def distill_step(engine, teacher: TeacherRunner | None, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """One micro-batch: teacher forward, student forward + losses, backward, (boundary) optimiser step.

    Loss terms are averaged across ranks before anything else so every rank agrees on a non-finite value and
    stops together, before the bad gradient reaches the weights. Returns ``{"loss": total, term: value}``.
    """
    t_out = teacher(batch) if teacher is not None else None
    total, terms = engine(batch, t_out)
    names = ["loss", *terms]
    values = dist.mean_across_ranks(torch.stack([total.detach().float(), *(v.detach().float() for v in terms.values())]))
    if not torch.isfinite(values).all():
        bad = [f"{n}={v}" for n, v in zip(names, values.tolist()) if not math.isfinite(v)]
        raise NonFiniteLoss(
            f"non-finite loss at step {engine.global_steps + 1} (micro-batch {engine.micro_steps + 1}): "
            f"{', '.join(bad)}; nothing was updated with it"
        )
    engine.backward(total)
    engine.step()
    return dict(zip(names, values.tolist()))


# ------------------------------------------------------------------------------------------ setup


@dataclass
class Run:
    cfg: Config
    run_dir: Path
    spec: data.TaskSpec
    task: models.TaskKind
    tokenizer: Any
    train_set: Any
    dev_set: Any
    collate: Any
    engine: Any
    teacher: TeacherRunner | None
    teacher_model: Any
    student_source: str
    history: list[dict[str, Any]] = field(default_factory=list)


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


def build_losses(cfg: Config, student_config, teacher_config, task: str) -> tuple[dict, dict]:
    for plugin in cfg.plugins:
        importlib.import_module(plugin)
    losses, weights = {}, {}
    for i, lc in enumerate(cfg.losses):
        key = lc.name if lc.name not in losses else f"{lc.name}_{i}"
        setup = LossSetup(student_config=student_config, teacher_config=teacher_config, mapping=lc.mapping,
                          task=task, name=lc.name, causal=arch.is_causal(student_config))
        losses[key] = build_loss(lc.name, setup, lc.params)
        weights[key] = lc.weight
        _check_inputs(cfg, key, losses[key])
    return losses, weights


def _check_inputs(cfg: Config, name: str, loss) -> None:
    """Consistency terms need mixed inputs; mixed inputs and supplementary data have no (meaningful) labels."""
    if "clean" in loss.needs and not cfg.train.mixup:
        raise ConfigError(f"loss {name!r} compares mixed and clean inputs; set train.mixup: true")
    if "labels" not in loss.needs:
        return
    if cfg.train.mixup:
        raise ConfigError(f"loss {name!r} reads labels, but train.mixup=true mixes inputs (their labels are not "
                          "mixed); use label-free losses in a mixup stage (attn_kl, hidden_mse, logit_kd, ...)")
    if cfg.data.supplementary is not None:
        raise ConfigError(f"loss {name!r} reads labels, but data.supplementary makes the training inputs unlabeled; "
                          "use label-free (ILD) losses in that stage")


def validate(cfg: Config) -> dict[str, Any]:
    """Check a config against its models and data without training (``scaledkd validate``)."""
    spec = data.task_spec(cfg.data)
    task = task_kind(spec)
    student_source = cfg.student.path if cfg.student.init == "pretrained" else (cfg.student.from_model or cfg.teacher.path)
    s_config = models.load_config(student_source, task, spec.num_labels)
    if cfg.student.init == "teacher_layers":
        layers = models.choose_layers(cfg.student.layers, cfg.student.num_layers, s_config.num_hidden_layers)
        models._set_num_layers(s_config, layers)
    elif cfg.student.init == "config":
        s_config = models.student_from_config(s_config, cfg.student, task).config
    t_config = models.load_config(cfg.teacher.path, task, spec.num_labels) if cfg.teacher else None
    if t_config is not None:
        models.check_vocab_sizes(t_config, s_config)
        models.check_student_tokenizer(models.load_tokenizer(cfg.teacher.path), cfg.teacher.path, student_source)
    losses, _ = build_losses(cfg, s_config, t_config, task)
    for name, loss in losses.items():
        if "teacher" in loss.needs and cfg.teacher is None:
            raise ConfigError(f"loss {name!r} needs a teacher, but teacher is null")
    ds_student = ds.read_ds_config(cfg.student.ds_config, getattr(cfg, "_recipe_path", None))
    ds.student_ds_config(ds_student, cfg.train)
    if cfg.teacher:
        ds.teacher_ds_config(ds.read_ds_config(cfg.teacher.ds_config, getattr(cfg, "_recipe_path", None)), cfg.train)
    n_train = len(data.load_examples(cfg.data, "train", cfg.train.seed))
    n_dev = len(data.load_examples(cfg.data, "dev", cfg.train.seed))
    return {"task": task, "train_examples": n_train, "dev_examples": n_dev, "losses": sorted(losses),
            "student_blocks": s_config.num_hidden_layers,
            "teacher_blocks": t_config.num_hidden_layers if t_config else None}


def setup(cfg: Config) -> Run:
    dist.init(cfg.train.dist_timeout_s)
    run_dir = prepare_run_dir(cfg)
    _seed_everything(cfg.train.seed)
    set_tf32(cfg.train.tf32)
    spec = data.task_spec(cfg.data)
    task = task_kind(spec)
    recipe = getattr(cfg, "_recipe_path", None)

    # Data (every rank reads; it is small next to the models).
    student_source = cfg.student.path if cfg.student.init == "pretrained" else (cfg.student.from_model or cfg.teacher.path)
    tokenizer = models.load_tokenizer(cfg.teacher.path if cfg.teacher else student_source)
    if cfg.teacher:
        models.check_student_tokenizer(tokenizer, cfg.teacher.path, student_source)
    if task == "causal_lm":
        train_set, dev_set = data.lm_datasets(cfg.data, tokenizer, cfg.train.seed)
        collate = data.make_lm_collator(tokenizer)
    else:
        train_set = data.tokenize_dataset(data.load_examples(cfg.data, "train", cfg.train.seed), tokenizer,
                                          cfg.data.max_length)
        dev_set = data.tokenize_dataset(data.load_examples(cfg.data, "dev", cfg.train.seed), tokenizer,
                                        cfg.data.max_length)
        collate = data.make_collator(tokenizer)

    # Engines: DeepSpeed directly or through Accelerate's plugins (train.backend), one config per model.
    t_ds = ds.teacher_ds_config(ds.read_ds_config(cfg.teacher.ds_config, recipe), cfg.train) if cfg.teacher else None
    s_ds = ds.student_ds_config(ds.read_ds_config(cfg.student.ds_config, recipe), cfg.train)
    engines = accel.engine_factory(cfg.train, student=s_ds, teacher=t_ds)

    # Teacher: its own DeepSpeed config; partitioned at load time under ZeRO-3.
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
    teacher_model, teacher_engine = None, None
    if cfg.teacher:
        with engines.load_context("teacher"):
            teacher_model = models.freeze(models.load_pretrained(cfg.teacher.path, task, spec.num_labels, dtype))
        if ds.zero_stage(t_ds) == 3:
            teacher_engine = engines.initialize("teacher", teacher_model)
            teacher_engine.eval()
        else:
            teacher_engine = teacher_model.to(dist.device())

    # Student: built rank-locally (copying teacher blocks needs full weights), partitioned by its engine.
    torch.manual_seed(cfg.train.seed)  # the same fresh heads/projections on every rank
    with engines.load_context("student" if cfg.student.init == "pretrained" else None):
        student = models.build_student(cfg.student, cfg.teacher.path if cfg.teacher else None, task, spec.num_labels)
    if teacher_model is not None:
        models.check_vocab_sizes(teacher_model.config, student.config)
    if task == "causal_lm":
        for who, m in (("teacher", teacher_model), ("student", student)):
            limit = getattr(getattr(m, "config", None), "max_position_embeddings", None)
            if limit and cfg.data.max_length > limit:
                raise ConfigError(f"data.max_length={cfg.data.max_length} exceeds the {who}'s "
                                  f"max_position_embeddings={limit}; lower data.max_length")
    if cfg.student.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    losses, weights = build_losses(cfg, student.config, teacher_model.config if teacher_model else None, task)
    if task == "causal_lm" and cfg.data.packing and any("qkv" in loss.needs for loss in losses.values()):
        log.warning("packed rows: attention/relation losses compare scores over each row's whole causal prefix, "
                    "across document boundaries the models do not attend over; data.packing=false makes them exact")
    if cfg.student.freeze:
        student.requires_grad_(False)  # only the losses' own modules (TED filters, heads) train
    for loss in losses.values():
        if hasattr(loss, "load_artifacts"):
            loss.load_artifacts()  # e.g. TED's stage-I filters, loaded before the engine partitions them
    mixup = EmbeddingMixup(cfg.train.mixup_alpha, cfg.train.seed) if cfg.train.mixup else None
    module = DistillModule(student, losses, weights, mixup=mixup)
    if module.ema is not None and ds.zero_stage(s_ds) == 3:
        raise ConfigError("an EMA student (ema_decay) is not supported with a ZeRO-3 student; drop ema_decay to use "
                          "the clean student forward, or use ZeRO 0/1/2")
    if not any(p.requires_grad for p in module.parameters()):
        raise ConfigError("nothing to train: student.freeze=true and no loss has trainable modules")
    teacher = (TeacherRunner(teacher_engine, module.teacher_taps(), mixup=mixup)
               if teacher_engine is not None else None)

    batches = ShardedBatches(train_set, cfg.train.batch_size, cfg.train.seed, collate)
    total_steps = cfg.train.max_steps or max(1, int(cfg.train.epochs * batches.per_epoch / cfg.train.grad_accum))
    optimizer = torch.optim.AdamW(_weight_decay_groups(module, cfg), lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total_steps, cfg.train.warmup_ratio))
    engine = engines.initialize("student", module, optimizer=optimizer, lr_scheduler=scheduler)
    run = Run(cfg=cfg, run_dir=run_dir, spec=spec, task=task, tokenizer=tokenizer, train_set=train_set,
              dev_set=dev_set, collate=collate, engine=engine, teacher=teacher, teacher_model=teacher_engine,
              student_source=student_source)
    run.batches = batches  # type: ignore[attr-defined]
    run.mixup = mixup  # type: ignore[attr-defined]
    run.total_steps = total_steps  # type: ignore[attr-defined]
    run.ds_configs = {"student": s_ds, "teacher": t_ds}  # type: ignore[attr-defined]
    if dist.is_main():
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        init_dir = run_dir / "student_init"
        init_dir.mkdir(exist_ok=True)
        student.config.save_pretrained(init_dir)
        tokenizer.save_pretrained(init_dir)
        checkpoint.write_json(init_dir / "run_info.json", {"task": task, "student_source": student_source})
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
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if dist.is_main():
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def train(run: Run) -> dict[str, Any]:
    cfg, engine = run.cfg, run.engine
    total_steps: int = run.total_steps  # type: ignore[attr-defined]
    batches: ShardedBatches = run.batches  # type: ignore[attr-defined]
    logfile = _Log(run.run_dir / "log.jsonl")
    state = {"step": 0, "micro": 0, "best": None, "history": []}
    if cfg.train.resume:
        root, tag = checkpoint.resolve(run.run_dir, cfg.train.resume)
        state = checkpoint.load(engine, root, tag)
        log.info("resumed from %s at step %d", root / tag, state["step"])

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
    window: dict[str, float] = {}
    window_n = 0
    tic = time.perf_counter()
    samples_per_step = cfg.train.batch_size * cfg.train.grad_accum * dist.world_size()
    best_state = None
    step = state["step"]
    num_epochs = math.ceil(total_steps * cfg.train.grad_accum / batches.per_epoch)  # ramps: epoch / num_epochs
    mixup = getattr(run, "mixup", None)
    while step < total_steps:
        epoch, skip = divmod(state["micro"], batches.per_epoch)
        for batch in batches(epoch, skip):
            if mixup is not None:
                batch = mixup.prepare(batch, state["micro"], step, epoch / num_epochs)
            terms = distill_step(engine, run.teacher, batch)
            state["micro"] += 1
            for k, v in terms.items():
                window[k] = window.get(k, 0.0) + v
            window_n += 1
            if state["micro"] % cfg.train.grad_accum:
                continue  # inside an accumulation window: DeepSpeed has not stepped yet
            step = state["step"] = step + 1
            if step % cfg.train.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - tic
                record = {"step": step, **{k: v / window_n for k, v in window.items()},
                          "lr": engine.get_lr()[0], "samples_per_s": samples_per_step * cfg.train.log_every / elapsed
                          if step % cfg.train.log_every == 0 else None}
                logfile.write(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s'] or 0:.1f}")
                window, window_n, tic = {}, 0, time.perf_counter()
            if bar is not None:
                bar.update(1)
            is_eval = cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps
            if is_eval:
                scores = evaluate(run)
                _record_eval(state, step, scores, logfile)
                if cfg.train.export == "best" and state["best"] and state["best"]["step"] == step:
                    best_state = gather_student_state(engine.module)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
                checkpoint.save(engine, run.run_dir, step, state)
            if step >= total_steps:
                break
    if bar is not None:
        bar.close()

    final = evaluate(run)
    _record_eval(state, step, final, logfile)
    if cfg.train.save_every:
        checkpoint.save(engine, run.run_dir, step, state)
    final_state = gather_student_state(engine.module)
    exported = "final"
    if cfg.train.export == "best" and state["best"] and state["best"]["step"] != step and best_state is not None:
        final_state, exported = best_state, f"best (step {state['best']['step']})"
    return {"state": state, "final": final, "teacher": teacher_score, "student_state": final_state,
            "exported": exported, "steps": step}


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
        "size": sizes,
        "speed": timing,
        "extra": extra,
    }
    metrics["artifacts"] = [str(path) for path in save_loss_artifacts(run)]
    if dist.is_main():
        provenance = {
            "teacher": cfg.teacher.path if cfg.teacher else None,
            "student_init": {"init": cfg.student.init, "from": run.student_source, "layers": cfg.student.layers,
                             "copied_blocks": getattr(student.config, "scaledkd_init", None)},
            "losses": [{"name": lc.name, "weight": lc.weight, "mapping": _mapping_of(run, i, lc), "params": lc.params}
                       for i, lc in enumerate(cfg.losses)],
            "data": {"task": cfg.data.task, "source": cfg.data.source, "data_dir": cfg.data.data_dir,
                     "train_file": cfg.data.train_file, "max_train_samples": cfg.data.max_train_samples,
                     "label_noise": cfg.data.label_noise, "train_examples": len(run.train_set),
                     "supplementary": dataclasses.asdict(cfg.data.supplementary) if cfg.data.supplementary else None},
            "mixup": {"alpha": cfg.train.mixup_alpha} if cfg.train.mixup else None,
            "seed": cfg.train.seed, "steps": result["steps"], "exported": result["exported"],
            "final": result["final"], "best": result["state"]["best"],
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
        checkpoint.write_json(run.run_dir / FINISHED_MARKER, metrics)
        for aside in run.run_dir.parent.glob(f"{run.run_dir.name}.replaced-*"):
            shutil.rmtree(aside, ignore_errors=True)  # the run it replaced, kept until this one finished
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
        if not hasattr(loss, "artifacts"):
            continue
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
                enc = to_device(dict(enc))
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
    losses = list(run.engine.module.losses.values())
    pairs = getattr(losses[index], "pairs", None)
    return pairs if pairs is not None else lc.mapping


def run_distillation(cfg: Config) -> dict[str, Any]:
    """The whole job: set up, train, evaluate, export. Returns the metrics written to metrics.json."""
    run = setup(cfg)
    result = train(run)
    return finish(run, result)

