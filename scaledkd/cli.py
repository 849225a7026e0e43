"""``scaledkd`` command line: thin subcommands, each a plain function over the library.

    scaledkd distill [RECIPE] [key.sub=value ...]   distil (the embedded default recipe when RECIPE is omitted)
    scaledkd finetune RECIPE [overrides]            train the student on the task alone (no teacher)
    scaledkd validate RECIPE [overrides]            check config, models and data without training
    scaledkd eval MODEL_DIR --task T --data-dir D   dev metrics of an exported model, as JSON
    scaledkd export RUN_DIR OUT_DIR                 consolidate a run's checkpoint into a Hugging Face folder
    scaledkd losses                                 list the registered losses
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("scaledkd")


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _recipe_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _load(items: list[str], *, need_recipe: bool):
    from .config import load_config

    recipe, overrides = _recipe_and_overrides(items)
    if recipe is None and need_recipe:
        raise SystemExit("error: a RECIPE (YAML file) is required")
    return load_config(recipe, overrides)


def cmd_distill(args: argparse.Namespace) -> int:
    from .engine.dist import prepare_environment

    prepare_environment()
    from .engine.run import run_distillation
    from .summary import print_summary

    cfg = _load(args.items, need_recipe=False)
    metrics = run_distillation(cfg)
    print_summary(cfg, metrics)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .engine.dist import prepare_environment

    prepare_environment()
    from .engine.run import run_distillation
    from .summary import print_summary

    cfg = _load(args.items, need_recipe=True)
    if cfg.teacher is not None:
        log.info("finetune: ignoring the recipe's teacher (%s); the student trains on the task alone", cfg.teacher.path)
        cfg.teacher = None
    metrics = run_distillation(cfg)
    print_summary(cfg, metrics)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .engine.run import validate

    cfg = _load(args.items, need_recipe=True)
    report = validate(cfg)
    print(json.dumps({"ok": True, **report}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import data, models
    from .config import DataConfig
    from .engine.run import eval_batches, task_kind
    from .evaluation import evaluate_task

    data_cfg = DataConfig(task=args.task, data_dir=args.data_dir, max_length=args.max_length,
                          max_eval_samples=args.max_samples)
    spec = data.task_spec(data_cfg)
    kind = task_kind(spec)
    if kind == "agnostic":
        raise SystemExit(f"error: --task {args.task} has no labels to evaluate; give a GLUE task")
    model = models.load_pretrained(args.model_dir, kind, spec.num_labels)
    tokenizer = models.load_tokenizer(args.model_dir)
    dev = data.tokenize_dataset(data.load_examples(data_cfg, "dev", args.seed), tokenizer, args.max_length)
    scores = evaluate_task(model, eval_batches(dev, args.batch_size, data.make_collator(tokenizer)), kind, spec.name)
    print(json.dumps({"model": args.model_dir, "task": args.task, "examples": len(dev), **scores}, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    out = export_run(Path(args.run_dir), Path(args.out_dir), args.checkpoint)
    print(json.dumps({"exported": str(out)}, indent=2))
    return 0


def cmd_losses(args: argparse.Namespace) -> int:
    from . import losses

    for name in losses.LOSSES.names():
        cls = losses.LOSSES.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:16s} needs={sorted(cls.needs)}  {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaledkd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    overrides_help = "RECIPE (YAML) followed by key.sub=value overrides, e.g. train.max_steps=100"
    p = sub.add_parser("distill", help="distil a student (embedded default recipe without RECIPE)")
    p.add_argument("items", nargs="*", metavar="[RECIPE] [OVERRIDE]", help=overrides_help)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("finetune", help="train the student on the task alone (teacher fine-tuning, baselines)")
    p.add_argument("items", nargs="+", metavar="RECIPE [OVERRIDE]", help=overrides_help)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("validate", help="check a recipe's config, models and data without training")
    p.add_argument("items", nargs="+", metavar="RECIPE [OVERRIDE]", help=overrides_help)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("eval", help="dev metrics of an exported model, printed as JSON")
    p.add_argument("model_dir")
    p.add_argument("--task", required=True, help="GLUE task name (sst2, rte, stsb, ...)")
    p.add_argument("--data-dir", default=None, help="GLUE folder (default $SCALEDKD_DATA_DIR)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="consolidate a run's checkpoint (any ZeRO stage/world size) to an HF folder")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--checkpoint", default="latest", help="checkpoint tag (step_N) or 'latest'")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("losses", help="list the registered losses")
    p.set_defaults(func=cmd_losses)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher appends --local_rank=N after the subcommand's arguments.
    argv = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    args = build_parser().parse_args(argv)
    _setup_logging()
    from .config import ConfigError
    from .data import DataError
    from .engine.run import NonFiniteLoss, RunDirError

    try:
        return args.func(args)
    except (ConfigError, DataError, RunDirError, NonFiniteLoss, FileNotFoundError) as err:
        print(f"scaledkd: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # invalid values found while building models/losses
        print(f"scaledkd: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
