"""Multi-stage recipes: each stage of ``stages:`` is one ordinary run (:func:`run_distillation`) of a derived
:class:`Config` in ``<output_dir>/stage_<i>_<name>/``.

Chains: the student stages form one chain (the first builds the student from the ``student`` section, each later
one loads the previous student stage's export); ``trains: teacher`` stages train a copy of the current teacher with
no teacher, and with ``becomes_teacher`` their export is the teacher of later stages. ``stage:<name>`` in model
paths means that stage's export, in loss parameters its folder (:class:`~scaledkd.config.StageConfig`).

Re-running a recipe skips finished stages (their ``metrics.json`` exists). With ``train.resume=latest`` the first
unfinished stage resumes from its latest checkpoint (or restarts when it has none); without it an interrupted
stage is an error, as for single runs. ``<output_dir>/metrics.json`` (a summary) is written only once every stage
finished, so it marks the whole recipe as finished.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from .. import checkpoint
from ..build import RunDirError, check_run_dir, resolve
from ..config import (
    STAGE_REF,
    Config,
    ConfigError,
    DataConfig,
    LossConfig,
    StageConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    merge_section,
)
from ..files import FINISHED_MARKER, write_json, write_text_atomic
from . import dist, rundir
from .run import run_distillation

log = logging.getLogger("scaledkd")

MODEL_FIELDS = ("path", "from_model")  # stage-override keys that name a model


def stage_dir(cfg: Config, index: int) -> Path:
    """``<output_dir>/stage_<i>_<name>`` for the 0-based stage ``index`` (i counts from 1)."""
    return Path(cfg.output_dir) / f"stage_{index + 1}_{cfg.stages[index].name}"


def _resolve(node: Any, folders: dict[str, Path], suffix: str = "") -> Any:
    """``stage:<name>`` strings in ``node`` -> ``<that stage's folder><suffix>``."""
    if isinstance(node, str) and node.startswith(STAGE_REF):
        return str(folders[node[len(STAGE_REF):]]) + suffix
    if isinstance(node, dict):
        return {k: _resolve(v, folders, suffix) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, folders, suffix) for v in node]
    return node


def _model_overrides(overrides: dict[str, Any], exports: dict[str, str]) -> dict[str, Any]:
    return {k: (exports[v[len(STAGE_REF):]] if k in MODEL_FIELDS and isinstance(v, str) and v.startswith(STAGE_REF)
                else v) for k, v in overrides.items()}


def stage_configs(cfg: Config, plan: bool = False) -> list[Config]:
    """The run config of every stage, in order.

    Args:
        cfg: a recipe with ``stages``.
        plan: for checking a recipe before earlier stages ran: an export that does not exist yet is replaced by
            the model it will be trained from (same architecture), so every stage can be validated up front.
    """
    if not cfg.stages:
        raise ConfigError("the recipe has no stages")
    teacher = cfg.teacher
    origin: StudentConfig | None = None  # the spec the student chain was last built from (planning)
    previous: Path | None = None  # the previous student stage's folder
    folders: dict[str, Path] = {}
    exports: dict[str, str] = {}  # stage name -> its export (or, planning, the model standing in for it)
    out = []
    for i, stage in enumerate(cfg.stages):
        where = f"stages[{stage.name}]"
        folder = stage_dir(cfg, i)
        data = merge_section(DataConfig, cfg.data, stage.data, f"{where}.data")
        train = dataclasses.replace(merge_section(TrainConfig, cfg.train, stage.train, f"{where}.train"), resume=None)
        losses = [LossConfig(name=lc.name, weight=lc.weight, mapping=lc.mapping,
                             params=_resolve(dict(lc.params), folders))
                  for lc in (stage.losses or cfg.losses)]
        overrides = _model_overrides(stage.student, exports)
        if stage.trains == "teacher":
            base = StudentConfig(init="pretrained", path=teacher.path, gguf_file=teacher.gguf_file,
                                 ds_config=cfg.student.ds_config,
                                 gradient_checkpointing=cfg.student.gradient_checkpointing)
            student = merge_section(StudentConfig, base, overrides, f"{where}.student")
            stage_teacher = None
        else:
            if previous is not None and "init" not in overrides:
                export = previous / "student"
                if plan and not export.is_dir():
                    base = origin
                else:
                    base = dataclasses.replace(cfg.student, init="pretrained", path=str(export), gguf_file=None)
            else:
                base = cfg.student
                if base.init != "pretrained" and not base.from_model and teacher is not None:
                    base = dataclasses.replace(base, from_model=teacher.path, gguf_file=teacher.gguf_file)
            student = merge_section(StudentConfig, base, overrides, f"{where}.student")
            if previous is None or "init" in overrides:
                origin = student
            stage_teacher = None
            if stage.use_teacher:
                stage_teacher = merge_section(TeacherConfig, teacher, _model_overrides(stage.teacher, exports),
                                              f"{where}.teacher")
            previous = folder
        stage_cfg = Config(output_dir=str(folder), student=student, data=data, losses=losses, teacher=stage_teacher,
                           train=train, overwrite=False, plugins=list(cfg.plugins), recipe_path=cfg.recipe_path)
        out.append(stage_cfg)
        folders[stage.name] = folder
        export = folder / "student"
        if plan and not export.is_dir():  # what the stage trains from: the same architecture as its export
            exports[stage.name] = student.path if student.init == "pretrained" else (student.from_model or "")
        else:
            exports[stage.name] = str(export)
        if stage.becomes_teacher:
            teacher = TeacherConfig(path=exports[stage.name], ds_config=teacher.ds_config)
    return out


def validate_stages(cfg: Config) -> dict[str, Any]:
    """``scaledkd validate`` for a staged recipe: the recipe's folder, then every stage's plan (as each stage
    resolves it before it runs; a stage's folder is the stage runner's to judge)."""
    check_run_dir(cfg, "staged run")
    report = []
    for stage, stage_cfg in zip(cfg.stages, stage_configs(cfg, plan=True), strict=True):
        try:
            checked = resolve(stage_cfg, check_output=False).summary()
        except (ConfigError, ValueError) as err:
            raise type(err)(f"stage {stage.name!r}: {err}") from err
        report.append({"name": stage.name, "trains": stage.trains, "output_dir": stage_cfg.output_dir,
                       "teacher": stage_cfg.teacher.path if stage_cfg.teacher else None, **checked})
    return {"stages": report}


# ------------------------------------------------------------------------------------------ running


def _prepare_root(cfg: Config) -> tuple[Path, Path | None]:
    """Check/create ``output_dir`` (rank 0 acts): a finished recipe is refused unless ``overwrite``, which moves
    the old folder aside until the new run finishes (and back if it fails)."""
    root, aside = rundir.prepare(cfg, "staged run")  # an unfinished root is continued, not refused
    if dist.is_main():
        write_text_atomic(root / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    dist.barrier()
    return root, aside


def _same_config(folder: Path, stage_cfg: Config) -> list[str]:
    """Keys whose value differs between a finished stage's saved config and the recipe's now."""
    saved_file = folder / "config.yaml"
    if not saved_file.is_file():
        return []
    saved = yaml.safe_load(saved_file.read_text())
    now = yaml.safe_load(yaml.safe_dump(stage_cfg.to_dict(), sort_keys=False))
    ignore = {"train.resume", "overwrite"}
    diffs = []
    for section in sorted(set(saved) | set(now)):
        a, b = saved.get(section), now.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(section)
    return [d for d in diffs if d not in ignore]


def run_stages(cfg: Config) -> dict[str, Any]:
    """Run (or continue) every stage in order; returns the summary written to ``<output_dir>/metrics.json``."""
    dist.init(cfg.train.dist_timeout_s)
    if cfg.train.resume not in (None, "latest", "auto"):
        raise ConfigError(f"train.resume={cfg.train.resume!r}: a staged run resumes with train.resume=latest or "
                          "auto (its first unfinished stage continues from that stage's latest checkpoint)")
    root, aside = _prepare_root(cfg)
    try:
        summary = _run_all(cfg, root)
    except BaseException:
        rundir.restore(root, aside)
        raise
    rundir.drop_replaced(aside)
    return summary


def _run_all(cfg: Config, root: Path) -> dict[str, Any]:
    configs = stage_configs(cfg)
    results = []
    for i, (stage, stage_cfg) in enumerate(zip(cfg.stages, configs, strict=True)):
        folder = Path(stage_cfg.output_dir)
        label = f"stage {i + 1}/{len(configs)} {stage.name!r}"
        partial = None
        if (folder / FINISHED_MARKER).exists():
            changed = _same_config(folder, stage_cfg)
            if changed:
                log.warning("%s finished earlier with a different config (%s); keeping it (overwrite=true reruns "
                            "every stage)", label, ", ".join(changed))
            log.info("%s already finished in %s; skipped", label, folder)
            results.append((stage, json.loads((folder / FINISHED_MARKER).read_text())))
            continue
        if folder.exists() and any(folder.iterdir()):
            if not cfg.train.resume:
                raise RunDirError(
                    f"{label} in {str(folder)!r} was interrupted; continue it with train.resume=latest (finished "
                    "stages are skipped), or pass overwrite=true to rerun every stage"
                )
            if (folder / checkpoint.CHECKPOINTS / "latest").is_file():
                stage_cfg.train.resume = "latest"
                log.info("%s: resuming from its latest checkpoint", label)
            else:  # nothing to resume from: the stage restarts; its partial folder is kept aside until it finished
                partial = rundir.move_aside(folder) if dist.is_main() else None
                dist.barrier()
                log.info("%s: no checkpoint to resume from; restarting the stage", label)
        log.info("%s: %s -> %s", label, "teacher" if stage.trains == "teacher" else "student", folder)
        results.append((stage, run_distillation(stage_cfg)))
        rundir.drop_replaced(partial)
    summary = _summary(cfg, configs, results)
    if dist.is_main():
        write_json(root / FINISHED_MARKER, summary)
    dist.barrier()
    return summary


def _summary(cfg: Config, configs: list[Config], results: list[tuple[StageConfig, dict[str, Any]]]
             ) -> dict[str, Any]:
    """The last student stage's metrics (what the recipe produced) plus one entry per stage."""
    students = [m for stage, m in results if stage.trains == "student"] or [results[-1][1]]
    summary = dict(students[-1])
    summary["stages"] = [
        {"name": stage.name, "trains": stage.trains, "output_dir": c.output_dir, "steps": m.get("steps"),
         "final": m.get("final"), "best": m.get("best"), "exported": m.get("exported"),
         "export_dir": m.get("export_dir")}
        for (stage, m), c in zip(results, configs, strict=True)
    ]
    summary["total_steps"] = sum(m.get("steps") or 0 for _, m in results)
    return summary
