"""``scaledkd`` command line: thin subcommands, each a plain function over the library.

    scaledkd distill [RECIPE] [key.sub=value ...]   distil (the embedded default recipe when RECIPE is omitted)
    scaledkd finetune RECIPE [overrides]            train the student on the task alone (no teacher)
    scaledkd validate RECIPE [overrides]            check config, models and data without training
    scaledkd eval MODEL_DIR [--task T] --data-dir D dev metrics of an exported model, as JSON
    scaledkd eval MODEL_DIR --task lm --file F      perplexity of an exported causal LM on a text/JSON-lines file
    scaledkd export RUN_DIR OUT_DIR                 consolidate a run's checkpoint into a Hugging Face folder
    scaledkd cache RECIPE teacher.cache=DIR         run the teacher once over the training set and store what the
                                                    losses read (training with teacher.cache then skips the teacher)
    scaledkd losses                                 list the registered losses
    scaledkd plan RECIPE --gpus N --gpu-mem G       per-GPU memory of every teacher/student ZeRO layout
    scaledkd generate RECIPE --out FILE [overrides] the teacher's continuations of the training prompts, as JSON
                                                    lines (sequence-level KD data)
    scaledkd study SPEC [--dry-run] [--only PATTERN] [--jobs N]
                                                    run a grid of recipes (methods x inits x tasks x seeds)
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _recipe_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """The recipe is the one item without ``=``, wherever it stands (launchers put their defaults, such as
    ``train.resume=auto``, first); the overrides keep their order, so a later one wins."""
    recipes = [item for item in items if "=" not in item]
    if len(recipes) > 1:
        raise SystemExit(f"error: one RECIPE at most, got {recipes}; overrides look like key.sub=value")
    return (recipes[0] if recipes else None), [item for item in items if "=" in item]


def _load(items: list[str], *, need_recipe: bool):
    from .config import load_config

    recipe, overrides = _recipe_and_overrides(items)
    if recipe is None and need_recipe:
        raise SystemExit("error: a RECIPE (YAML file) is required")
    return load_config(recipe, overrides)


def _run(cfg) -> int:
    from .engine import run_recipe
    from .summary import print_summary

    print_summary(cfg, run_recipe(cfg))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    return _run(_load(args.items, need_recipe=False))


def cmd_finetune(args: argparse.Namespace) -> int:
    from .build import baseline

    return _run(baseline(_load(args.items, need_recipe=True)))


def cmd_validate(args: argparse.Namespace) -> int:
    from .engine import validate_recipe

    report = validate_recipe(_load(args.items, need_recipe=True))
    print(json.dumps({"ok": True, **report}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_model_dir

    report = evaluate_model_dir(args.model_dir, task=args.task, data_dir=args.data_dir, file=args.file,
                                documents=args.documents, packing=not args.no_packing, batch_size=args.batch_size,
                                max_length=args.max_length, max_samples=args.max_samples, seed=args.seed)
    print(json.dumps(report, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    out = export_run(Path(args.run_dir), Path(args.out_dir), args.checkpoint, overwrite=args.overwrite)
    print(json.dumps({"exported": str(out)}, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .onpolicy import write_teacher_continuations

    summary = write_teacher_continuations(
        _load(args.items, need_recipe=True), args.out, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, prefix_tokens=args.prefix_tokens, batch_size=args.batch_size,
        max_samples=args.max_samples, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .cache import build_cache

    summary = build_cache(_load(args.items, need_recipe=True), batch_size=args.batch_size, overwrite=args.overwrite,
                          top_k=args.top_k)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_losses(args: argparse.Namespace) -> int:
    from . import losses

    for name in losses.LOSSES.names():
        cls = losses.LOSSES.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:16s} needs={sorted(cls.needs)}  {doc}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .study import run_study

    return run_study(args.spec, dry_run=args.dry_run, only=args.only, jobs=args.jobs)


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan import check_arguments, format_plan, make_plan, plan_as_dict

    check_arguments(args.gpus, args.gpu_mem, args.headroom)
    plan = make_plan(_load(args.items, need_recipe=True), args.gpus, args.gpu_mem, args.headroom, device=args.device)
    print(json.dumps(plan_as_dict(plan), indent=2) if args.json else format_plan(plan))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scaledkd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--task", default=None, help="GLUE task name (sst2, rte, stsb, ...) or lm (perplexity); default: "
                   "the task the model was trained on (its scaledkd_config.yaml)")
    p.add_argument("--data-dir", default=None, help="GLUE folder, or the folder --file is relative to "
                                                    "(default $SCALEDKD_DATA_DIR)")
    p.add_argument("--file", default=None, help="--task lm: the text or JSON-lines file to score (all of it)")
    p.add_argument("--documents", default="blank_line",
                   help="--task lm, plain text: blank_line, line, whole or sep:<separator> (data.documents)")
    p.add_argument("--no-packing", action="store_true", help="--task lm: one truncated document per row")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per example; default: the model's training data.max_length, else 128")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=42)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="consolidate a run's checkpoint (any ZeRO stage/world size) to an HF folder")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--checkpoint", default="latest", help="checkpoint tag (step_N) or 'latest'")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds an earlier export (never the run or a folder around it)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="write the teacher's continuations of a recipe's training prompts as "
                       "JSON lines (sequence-level KD data)",
                       description="Sequence-level KD: the recipe's teacher continues every training prompt (a "
                       "[prompt, response] record's prompt, else a document's opening --prefix-tokens tokens) and "
                       "the records {prompt, response} go to --out; train on them with data.train_file=FILE "
                       "data.text_columns=[prompt,response].")
    p.add_argument("items", nargs="+", metavar="RECIPE [OVERRIDE]", help=overrides_help)
    p.add_argument("--out", required=True, help="the JSON-lines file to write")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy")
    p.add_argument("--prefix-tokens", type=_positive_int, default=8,
                   help="prompt of a plain-text document: its opening tokens")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--max-samples", type=_positive_int, default=None, help="a seeded subset of the documents")
    p.add_argument("--seed", type=int, default=None, help="default: the recipe's train.seed")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("cache", help="run the teacher once over the training set and store its outputs in "
                       "teacher.cache", description="Run the recipe's teacher over every training row and store "
                       "exactly what its losses read (logits, tapped hidden states / Q / K / V) in the folder "
                       "teacher.cache, keyed on the teacher's weights, the tokenizer, the data, the tokenisation "
                       "and the taps. A run with the same teacher.cache then reads them and never loads the "
                       "teacher; a stale cache is refused naming what changed.")
    p.add_argument("items", nargs="+", metavar="RECIPE [OVERRIDE]", help=overrides_help)
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="rows per teacher forward (default: train.batch_size)")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild a stale cache in teacher.cache (a folder holding anything else is never touched)")
    p.add_argument("--top-k", type=_positive_int, default=None,
                   help="causal LMs: teacher logits kept per token (default: the largest top_k of the recipe's "
                        "lm_kd losses)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("losses", help="list the registered losses")
    p.set_defaults(func=cmd_losses)

    p = sub.add_parser("plan", help="per-GPU memory of every teacher/student ZeRO layout and the one to use",
                       description="Estimate per-GPU memory of the recipe's teacher (replicated, ZeRO-3, "
                       "ZeRO-3 + offload) and student (ZeRO-0/1/2/3, offload) from the model configs alone (no "
                       "weights are loaded), and recommend the least-sharded layout that fits, with the "
                       "ds_configs/*.json to put in the recipe.")
    p.add_argument("items", nargs="+", metavar="RECIPE [OVERRIDE]", help=overrides_help)
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job, all nodes together")
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB (e.g. 80 for an H100)")
    p.add_argument("--headroom", type=float, default=0.15,
                   help="share of each GPU's memory kept free for the CUDA context, NCCL and fragmentation (0.15)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default) plans GPUs; cpu plans CPU ranks, where --gpu-mem is RAM per rank and buffer "
                        "pages never written are not counted")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("study", help="run a grid of cells (methods x inits x tasks x seeds), resumably, and "
                       "summarise it", description="Run every unfinished cell of SPEC as its own subprocess "
                       "(a finished cell has metrics.json and is skipped; a failed one is retried next time) and "
                       "write results.csv, summary.csv/.md/.png and commands.md to the spec's results folder. "
                       "Spec format: the docstring of scaledkd/study/__init__.py; example: benchmarks/quality/study.yaml.")
    p.add_argument("spec", help="study spec (YAML)")
    p.add_argument("--dry-run", action="store_true", help="list the cells, their status and commands; run nothing")
    p.add_argument("--only", default=None, metavar="PATTERN",
                   help="comma-separated globs over cell ids (task/method[/init]/sSEED), e.g. 'rte/*' or "
                        "'*/kd/*'; the cells they wait for are included")
    p.add_argument("--jobs", "-j", type=_positive_int, default=1, metavar="N",
                   help="cells to run at once (default 1); each gets cores/N threads. Useful on a GPU, where one "
                        "small cell leaves the device mostly idle; keep 1 on a small CPU machine")
    p.set_defaults(func=cmd_study)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher appends --local_rank=N after the subcommand's arguments.
    argv = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    args = build_parser().parse_args(argv)
    _setup_logging()
    from .config import ConfigError
    from .data import DataError
    from .build import RunDirError
    from .errors import PREEMPTED_EXIT, NonFiniteLoss, Preempted

    try:
        return args.func(args)
    except Preempted as err:
        print(f"scaledkd: {err}", file=sys.stderr)
        return PREEMPTED_EXIT
    except (ConfigError, DataError, RunDirError, NonFiniteLoss, FileNotFoundError) as err:
        print(f"scaledkd: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # invalid values found while building models/losses
        print(f"scaledkd: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk (checkpoint.DiskFull), a read-only or unwritable folder: named in err
        print(f"scaledkd: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
