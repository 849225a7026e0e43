"""Process peak RSS per rank for a Llama teacher distilled across torchrun/gloo ranks (issue 13).

The driver builds (once, cached) a random-weight Llama teacher saved as safetensors shards plus a byte-level BPE
tokenizer trained on the TinyStories subset, writes a forward-KL recipe, and launches

    torchrun --nproc_per_node N  benchmarks/scale.py worker  distill RECIPE key=value ...

Each worker is ``scaledkd.cli.main`` itself with phase markers wrapped around the engine's functions (nothing in
scaledkd is changed): ``load`` (``run.setup``: teacher load, student build, engines), ``teacher_eval`` (the
teacher's held-out perplexity before training), ``steps`` (``distill_step`` calls), ``final_eval`` and
``finish`` (export, latency probe). Sub-markers inside ``load`` (teacher loaded, student built, teacher/student
engine built) and per step are logged with the rank's RSS at that moment.

A monitor thread in the driver samples every rank's RSS (``/proc/PID/statm`` via psutil) every ``--interval``
seconds and attributes each sample to the phase the rank was in, so the table shows the process's own sampled
peak, not an accounting of tensors.

Examples::

    # the issue-13 measurement: 230M teacher, 2 ranks, L=128, batch 2, 2 steps, teacher ZeRO-3 vs replicated
    python benchmarks/scale.py --size 230m --teacher-ds ds_configs/teacher_zero3.json --label t3
    python benchmarks/scale.py --size 230m --teacher-ds ds_configs/teacher_replicated.json --label rep
    # one hypothesis at a time: an env var for the ranks, or a recipe override
    python benchmarks/scale.py --teacher-ds /tmp/t3_live0.json --label t3-live0
    python benchmarks/scale.py --env MALLOC_ARENA_MAX=2 --label t3-arena2

Results are appended to ``benchmarks/results/scale.json`` (one record per run; the per-job markers and raw samples
stay in ``--work``/jobs/LABEL) and ``scale.md`` is rewritten from it. Without ``--full`` the ranks exit right
after the last step (no final eval, latency probe or export; the last step's loss is then not logged). Workers
read ``SCALE_MALLOC_TRIM=1`` (``malloc_trim(0)`` at every marker). Hypotheses are tested through recipe overrides
(``--override``), DeepSpeed JSONs (``--teacher-ds``/``--student-ds``) or ``--env``, so every row is reproducible with
the plain CLI.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = Path(os.environ.get("SCALEDKD_SHARED_DATA", REPO.parent / "shared" / "data")) / "lm"

# name -> (hidden, intermediate, layers, heads, vocab); parameter counts with untied embeddings
SIZES = {
    "20m": (256, 688, 4, 4, 32000),      # ~ 20 M (smoke test)
    # ~98 M (the test suite's scaled-down run): vocabulary 8192 as for 1b, so that no single tensor (the embedding,
    # allocated whole for a moment while the model is built partitioned) is a large part of a rank's share.
    "100m": (768, 2048, 12, 12, 8192),
    "230m": (1024, 2816, 13, 16, 32000),  # ~232 M, 0.87 GiB fp32 (issue 13)
    # ~0.96 B: 18 blocks and a vocabulary of 8192 (the byte-level BPE has 4096 tokens) so that the student of 4
    # blocks is ~0.24 B, as issue 13 asks, and 2 and 4 ranks of it fit in the 23 GiB of a CI-class machine.
    "1b": (2048, 5632, 18, 16, 8192),
}


# ------------------------------------------------------------------------------------------------ worker side


def worker(argv: list[str]) -> int:
    """One rank: ``scaledkd.cli.main(argv)`` with phase markers written to ``$SCALE_MARKERS/rank<R>.jsonl``."""
    import ctypes
    import functools

    rank = int(os.environ.get("RANK", "0"))
    out = Path(os.environ["SCALE_MARKERS"]) / f"rank{rank}.jsonl"
    trim = os.environ.get("SCALE_MALLOC_TRIM") == "1"
    libc = ctypes.CDLL("libc.so.6") if trim else None

    _phase = ["start"]

    def mark(phase: str, **extra) -> None:
        _phase[0] = phase
        if libc is not None:
            libc.malloc_trim(0)
        rss, anon = _status(os.getpid())
        with out.open("a") as f:
            f.write(json.dumps({"t": time.time(), "pid": os.getpid(), "phase": phase, "rss": rss, "anon": anon,
                                **extra}) + "\n")

    mark("start")
    import scaledkd
    from scaledkd import cli, models
    from scaledkd.engine import accel, run

    mark("imported", event=f"scaledkd from {Path(scaledkd.__file__).parent}")

    def wrap(owner, name, before=None, after=None):
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def inner(*a, **k):
            if before:
                before(*a, **k)
            result = fn(*a, **k)
            if after:
                after(*a, **k)
            return result

        setattr(owner, name, inner)

    state = {"step": 0, "eval": 0}
    wrap(run, "setup", before=lambda *a, **k: mark("load"), after=lambda *a, **k: mark("load_done"))
    # The teacher's load gets its own phase: its peak above the RSS at its start is issue 13's loading figure.
    wrap(models, "load_pretrained", before=lambda path, *a, **k: mark("teacher_load", event="teacher load begins"),
         after=lambda path, *a, **k: mark("load", event=f"loaded {Path(path).name}"))
    wrap(models, "build_student", after=lambda *a, **k: mark("load", event="student built"))
    for cls in (accel.DeepSpeedEngines, getattr(accel, "AccelerateEngines", None)):
        if cls is not None and hasattr(cls, "initialize"):
            wrap(cls, "initialize", after=lambda self, role, *a, **k: mark("load", event=f"{role} engine"))

    def before_eval(r, model=None):
        mark("teacher_eval" if model is not None else ("final_eval" if state["step"] else "eval"))

    def before_step(*a, **k):
        state["step"] += 1
        mark("steps", event=f"step {state['step']} begins")

    wrap(run, "evaluate", before=before_eval, after=lambda *a, **k: mark("between"))
    stop_after = int(os.environ.get("SCALE_STOP_AFTER_STEPS", "0"))

    def after_step(*a, **k):
        mark("steps", event=f"step {state['step']} ends")
        if stop_after and state["step"] >= stop_after:  # skip final eval/latency probe/export (short runs)
            mark("exit", event="stopped after the steps")
            os._exit(0)

    wrap(run, "distill_step", before=before_step, after=after_step)
    wrap(run, "finish", before=lambda *a, **k: mark("finish"), after=lambda *a, **k: mark("end"))
    for name in ("measure_latency", "gather_student_state", "save_student"):  # inside train()'s end and finish()
        if hasattr(run, name):
            wrap(run, name, before=lambda *a, _n=name, **k: mark(_phase[0], event=f"{_n} begins"),
                 after=lambda *a, _n=name, **k: mark(_phase[0], event=f"{_n} ends"))
    rc = cli.main(argv)
    mark("exit")
    return rc


# ------------------------------------------------------------------------------------------------ driver side


def build_teacher(size: str, folder: Path, max_position: int, shard: str) -> Path:
    if (folder / "config.json").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, inter, layers, heads, vocab = SIZES[size]
    folder.mkdir(parents=True, exist_ok=True)
    text = (DATA / "tinystories_subset.txt").read_text().splitlines()
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=min(vocab, 4096), special_tokens=["<pad>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
                            ).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_position,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size=shard, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    (folder / "scale_params.json").write_text(json.dumps({"params": n, "size": size}))
    return folder


def write_recipe(path: Path, teacher: Path, args) -> Path:
    import yaml

    recipe = {
        "output_dir": str(path.parent / "run"),
        "overwrite": True,
        "teacher": {"path": str(teacher), "ds_config": args.teacher_ds},
        "student": {"init": "teacher_layers", "layers": "lower", "num_layers": args.student_layers,
                    "ds_config": args.student_ds},
        "data": {"task": "lm", "data_dir": str(DATA), "train_file": "tinystories_subset.txt", "documents": "line",
                 "max_length": args.length, "heldout_fraction": 0.05, "max_train_samples": args.train_docs,
                 "max_eval_samples": args.eval_docs},
        "losses": [{"name": "lm_kd", "params": {"divergence": "forward_kl"}}],
        "train": {"batch_size": args.batch, "max_steps": args.steps, "lr": 1e-4, "log_every": 1, "eval_every": 0,
                  "progress": False, "dist_timeout_s": 600, "warmup_ratio": 0.0},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes: RssAnon leaves out file-backed pages (an mmapped safetensors teacher shows in
    VmRSS of every rank but is one shared page-cache copy)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["RssAnon"]


class Monitor(threading.Thread):
    """Samples the RSS of every rank process (the torchrun children running this file's ``worker``)."""

    def __init__(self, root_pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(root_pid)
        self.interval = interval
        self.samples: list[tuple[float, int, int, int]] = []  # (time, pid, rss, anonymous rss)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                kids = self.root.children(recursive=True)
            except self.psutil.Error:
                break
            now = time.time()
            for p in kids:
                try:
                    if "worker" in p.cmdline():
                        self.samples.append((now, p.pid, *_status(p.pid)))
                except self.psutil.Error:
                    pass
            self.stop.wait(self.interval)


def attribute(samples, markers, which: int = 2):
    """Peak RSS per (rank, phase): each sample belongs to the latest marker of its pid at or before it.
    ``which``: 2 = VmRSS, 3 = RssAnon (sample tuple index)."""
    out: dict[int, dict[str, float]] = {}
    for rank, events in markers.items():
        pid = events[-1]["pid"]
        mine = [(s[0], s[which]) for s in samples if s[1] == pid]
        peaks: dict[str, float] = {}
        for e in events:  # marker RSS counts too (a sample may miss a short spike; a marker sees its moment)
            phase = "load" if e["phase"] == "load_done" else e["phase"]
            peaks[phase] = max(peaks.get(phase, 0), e["rss"] if which == 2 else e.get("anon", 0))
        for t, rss in mine:
            phase = "start"
            for e in events:
                if e["t"] <= t:
                    phase = "load" if e["phase"] == "load_done" else e["phase"]
            peaks[phase] = max(peaks.get(phase, 0), rss)
        peaks["overall"] = max(peaks.values())
        out[rank] = {k: v / 2**30 for k, v in peaks.items()}
    return out


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        return worker(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="230m", choices=sorted(SIZES))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--teacher-ds", default="ds_configs/teacher_zero3.json")
    p.add_argument("--student-ds", default="ds_configs/zero3.json")
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--train-docs", type=int, default=2000, help="data.max_train_samples (documents before packing)")
    p.add_argument("--eval-docs", type=int, default=16, help="data.max_eval_samples")
    p.add_argument("--shard", default="200MB", help="save_pretrained(max_shard_size=...)")
    p.add_argument("--interval", type=float, default=0.25, help="RSS sampling period, seconds")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="extra environment for the ranks")
    p.add_argument("--override", action="append", default=[], metavar="key=value", help="extra recipe overrides")
    p.add_argument("--src", default=str(REPO),
                   help="folder whose scaledkd/ package the ranks import (PYTHONPATH), e.g. a `git archive HEAD` "
                        "snapshot while the working tree is being edited")
    p.add_argument("--full", action="store_true",
                   help="run the whole job (final eval, latency probe, export); default: the ranks exit after the "
                        "last step")
    p.add_argument("--label", default=None)
    p.add_argument("--work", default=os.environ.get("SCALE_WORK", "/tmp/scaledkd_scale"))
    p.add_argument("--results", default=str(RESULTS / "scale.json"))
    p.add_argument("--rewrite", action="store_true",
                   help="only rewrite the table and plot from --results (no run)")
    args = p.parse_args()
    if args.rewrite:
        path = Path(args.results)
        records = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown(records, _notes(path)))
        plot(records, path.with_suffix(".png"))
        return 0

    work = Path(args.work)
    teacher = build_teacher(args.size, work / f"teacher_{args.size}", max(512, args.length), args.shard)
    label = args.label or f"{Path(args.teacher_ds).stem}+{Path(args.student_ds).stem}"
    job = work / "jobs" / label.replace("/", "_")
    markers = job / "markers"
    if job.exists():
        import shutil

        shutil.rmtree(job)
    markers.mkdir(parents=True)
    recipe = write_recipe(job / "recipe.yaml", teacher, args)

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(Path(args.src).resolve()),
               SCALE_MARKERS=str(markers))
    if not args.full:
        env["SCALE_STOP_AFTER_STEPS"] = str(args.steps)
    for kv in args.env:
        k, _, v = kv.partition("=")
        env[k] = v
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_port", str(free_port()), str(Path(__file__).resolve()), "worker",
           "distill", str(recipe), *args.override]
    print("+", " ".join(f"{k}={shlex.quote(v)}" for k, v in (kv.partition("=")[::2] for kv in args.env)),
          shlex.join(cmd), flush=True)
    t0 = time.time()
    with (job / "stdout.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        mon = Monitor(proc.pid, args.interval)
        mon.start()
        rc = proc.wait()
        mon.stop.set()
        mon.join()
    wall = time.time() - t0
    if rc != 0:
        print((job / "stdout.log").read_text()[-5000:])
        print(f"run failed (rc={rc})")
        return rc
    events = {int(f.stem[4:]): [json.loads(x) for x in f.read_text().splitlines()] for f in markers.glob("rank*.jsonl")}
    peaks = attribute(mon.samples, events)
    anon = attribute(mon.samples, events, which=3)
    steps = [e for e in events[0] if e["phase"] == "steps"]
    begins = [e["t"] for e in steps if e.get("event", "").endswith("begins")]
    ends = [e["t"] for e in steps if e.get("event", "").endswith("ends")]
    s_per_step = (ends[-1] - begins[0]) / len(begins) if begins else None
    run_dir = job / "run"
    losses = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()] if (run_dir / "log.jsonl").exists() else []
    params = json.loads((teacher / "scale_params.json").read_text())["params"]
    record = {
        "label": label, "size": args.size, "teacher_params": params, "nproc": args.nproc,
        "teacher_ds": args.teacher_ds, "student_ds": args.student_ds, "student_layers": args.student_layers,
        "length": args.length, "batch": args.batch, "steps": args.steps, "env": args.env,
        "overrides": args.override, "src": args.src, "interval_s": args.interval, "wall_s": round(wall, 1),
        "s_per_step": s_per_step, "samples": len(mon.samples),
        "peak_gib": {str(r): {k: round(v, 3) for k, v in ph.items()} for r, ph in sorted(peaks.items())},
        "peak_anon_gib": {str(r): {k: round(v, 3) for k, v in ph.items()} for r, ph in sorted(anon.items())},
        "events": {str(r): [{"phase": e["phase"], "event": e.get("event"), "rss_gib": round(e["rss"] / 2**30, 3),
                             "anon_gib": round(e.get("anon", 0) / 2**30, 3), "t": round(e["t"] - events[r][0]["t"], 2)} for e in ev] for r, ev in sorted(events.items())},
        "losses": [x.get("loss") for x in losses if "step" in x and "event" not in x],
        "command": shlex.join([sys.executable, "benchmarks/scale.py", *sys.argv[1:]]),
    }
    record.update(load_and_plan(events, peaks, anon, recipe, args, env))
    (job / "samples.json").write_text(json.dumps(mon.samples))
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(path.read_text()) if path.exists() else []
    records = [r for r in records if r["label"] != label] + [record]
    path.write_text(json.dumps(records, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(records, _notes(path)))
    plot(records, path.with_suffix(".png"))
    for r, ph in sorted(peaks.items()):
        print(f"rank {r} rss : " + "  ".join(f"{k}={v:.2f}" for k, v in ph.items()))
        print(f"rank {r} anon: " + "  ".join(f"{k}={v:.2f}" for k, v in anon[r].items()))
    print(f"s/step={s_per_step}  wall={wall:.0f}s  losses={record['losses']}")
    return 0


def plan_layout(recipe: Path, args, env: dict[str, str]) -> dict:
    """``scaledkd plan RECIPE --gpus N --json`` (the real CLI, same recipe and overrides): the bytes per rank it
    predicts for this run's teacher/student layout, by category, device and host together."""
    cmd = [sys.executable, "-m", "scaledkd.cli", "plan", str(recipe), *args.override, "--gpus", str(args.nproc),
           "--gpu-mem", "1024", "--device", "cpu", "--json"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    plan = json.loads(out[out.index("{"):])
    teacher = Path(args.teacher_ds).stem.removeprefix("teacher_")
    student = Path(args.student_ds).stem
    layout = next(x for x in plan["layouts"] if x["teacher"] == teacher and x["student"] == student)
    categories = sorted(set(layout["device_bytes"]) | set(layout["host_bytes"]))
    by_category = {c: layout["device_bytes"].get(c, 0) + layout["host_bytes"].get(c, 0) for c in categories}
    return {"plan_gib": round(layout["rank_total"] / 2**30, 3),  # the planner's per-rank total (device + host)
            "plan_by_category_gib": {c: round(v / 2**30, 3) for c, v in by_category.items()},
            "plan_command": shlex.join(["scaledkd", *cmd[3:]])}


def load_and_plan(events: dict, peaks: dict, anon: dict, recipe: Path, args, env: dict[str, str]) -> dict:
    """Per rank: the RSS when the teacher's load begins (the baseline: interpreter, libraries, process group,
    tokenizer and data), the teacher load's peak above it, and the steps' peak against baseline + plan."""
    out: dict = {"baseline_gib": {}, "teacher_load_gib": {}, "teacher_load_anon_gib": {}, "steps_vs_plan": {}}
    try:
        out.update(plan_layout(recipe, args, {k: v for k, v in env.items() if k != "SCALE_MARKERS"}))
    except (subprocess.CalledProcessError, StopIteration, ValueError) as err:
        print(f"scaledkd plan did not give this layout: {err}")
    for rank, ev in sorted(events.items()):
        begin = next((e for e in ev if e.get("event") == "teacher load begins"), None)
        if begin is None or "teacher_load" not in peaks[rank]:
            continue
        base, base_anon = begin["rss"] / 2**30, begin["anon"] / 2**30
        out["baseline_gib"][str(rank)] = round(base, 3)
        out["teacher_load_gib"][str(rank)] = round(peaks[rank]["teacher_load"] - base, 3)
        out["teacher_load_anon_gib"][str(rank)] = round(anon[rank]["teacher_load"] - base_anon, 3)
        if "plan_gib" in out and "steps" in peaks[rank]:
            out["steps_vs_plan"][str(rank)] = round(peaks[rank]["steps"] / (base + out["plan_gib"]), 3)
    return out


PHASES = ("load", "teacher_eval", "steps", "final_eval", "finish", "overall")


def _notes(results: Path) -> str:
    """Hand-written findings kept beside the results (``<results>_notes.md``), appended to the generated table."""
    notes = results.with_name(results.stem + "_notes.md")
    return notes.read_text() if notes.is_file() else ""


def markdown(records: list[dict], notes: str = "") -> str:
    lines = ["# Peak RSS per rank (benchmarks/scale.py)", "",
             ("Sampled process RSS (GiB) per rank and phase: `load` = `run.setup` (teacher load, student build, "
             "engines), `teacher_eval` = the teacher's held-out perplexity before training, `steps` = the "
             "`distill_step` calls, `final_eval`, `finish` (latency probe, export; only with `--full`). Each cell is "
             "`rank0 / rank1` VmRSS, then RssAnon (without file-backed pages such as an mmapped safetensors teacher, "
             "which every rank counts but the page cache holds once)."),
             "", "| label | teacher | teacher ds | student ds | ranks | L x B x steps | env / overrides | "
             + " | ".join(PHASES) + " | s/step |",
             "|---|---|---|---|---|---|---|" + "---|" * len(PHASES) + "---|"]
    for r in records:
        cells = []
        for ph in PHASES:
            vals = [r["peak_gib"][k].get(ph) for k in sorted(r["peak_gib"])]
            anon = [r.get("peak_anon_gib", {}).get(k, {}).get(ph) for k in sorted(r["peak_gib"])]
            cell = " / ".join("-" if v is None else f"{v:.2f}" for v in vals)
            if any(a is not None for a in anon):
                cell += " (anon " + " / ".join("-" if v is None else f"{v:.2f}" for v in anon) + ")"
            cells.append(cell)
        extra = " ".join(r["env"] + r["overrides"]) or "-"
        sps = f"{r['s_per_step']:.1f}" if r["s_per_step"] else "-"
        lines.append(f"| {r['label']} | {r['size']} ({r['teacher_params'] / 1e6:.0f} M) | {Path(r['teacher_ds']).name} "
                     f"| {Path(r['student_ds']).name} | {r['nproc']} | {r['length']}x{r['batch']}x{r['steps']} | "
                     f"`{extra}` | " + " | ".join(cells) + f" | {sps} |")
    lines += loading_table([r for r in records if r.get("baseline_gib")])
    lines += ["", "Commands:", ""] + [f"- {r['label']}: `{r['command']}`" for r in records]
    lines += [f"- {r['label']} plan: `{r['plan_command']}`" for r in records if r.get("plan_command")]
    if notes:
        lines += ["", notes.rstrip()]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> bool:
    """GiB per rank against N for each teacher/student layout: the steps' peak RSS (worst rank) and the plan
    (baseline + ``scaledkd plan``), and the teacher load's peak above baseline against teacher bytes / N.
    Returns False (and draws nothing) without matplotlib or without runs at two or more N."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = [r for r in records if r.get("baseline_gib") and not r.get("note")]  # noted rows are references
    layouts: dict[str, list[dict]] = {}
    for r in records:
        layouts.setdefault(f"{Path(r['teacher_ds']).stem} + {Path(r['student_ds']).stem}", []).append(r)
    if not any(len({r["nproc"] for r in rs}) > 1 for rs in layouts.values()):
        return False
    fig, (steps_ax, load_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, rs) in enumerate(sorted(layouts.items())):
        rs = sorted(rs, key=lambda r: r["nproc"])
        n = [r["nproc"] for r in rs]
        color = f"C{i}"
        steps_ax.plot(n, [max(ph.get("steps", 0) for ph in r["peak_gib"].values()) for r in rs], "o-", color=color,
                      label=f"{name}: measured")
        plan = [(n_, max(r["baseline_gib"].values()) + r["plan_gib"]) for n_, r in zip(n, rs) if "plan_gib" in r]
        if plan:
            steps_ax.plot(*zip(*plan), "x--", color=color, label=f"{name}: plan")
        if "zero3" in Path(rs[0]["teacher_ds"]).stem:  # a replicated teacher is memory-mapped: its pages come later
            load_ax.plot(n, [max(r["teacher_load_gib"].values()) for r in rs], "o-", color=color, label=name)
    teacher = records[0]["teacher_params"] * 4 / 2**30
    ns = sorted({r["nproc"] for r in records})
    load_ax.plot(ns, [teacher / x for x in ns], "k:", label="teacher bytes / N")
    load_ax.plot(ns, [1.3 * teacher / x for x in ns], "r:", label="1.3 x teacher bytes / N (target)")
    steps_ax.set(xlabel="ranks N", ylabel="GiB per rank (peak RSS, worst rank)", xticks=ns,
                 title="steps: measured vs scaledkd plan")
    load_ax.set(xlabel="ranks N", ylabel="GiB above baseline (peak RSS, worst rank)", xticks=ns,
                title=f"teacher load ({records[0]['teacher_params'] / 1e9:.2f} B params)")
    steps_ax.legend(fontsize=7)
    load_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def loading_table(records: list[dict]) -> list[str]:
    """Issue 13's targets per run: teacher load peak per rank against teacher bytes / N, and the steps' peak
    against the RSS ``scaledkd plan`` predicts (baseline + planned bytes)."""
    if not records:
        return []
    lines = ["", "## Loading and the plan", "",
             ("Per rank (`r0 / r1 / ...`): `baseline` = RSS when the teacher's load begins; `load Δ` = the teacher "
              "load's peak VmRSS above it (RssAnon in brackets), and its ratio to teacher bytes / N (target <= 1.3); "
              "`steps` = the steps' peak VmRSS; `plan` = baseline + what `scaledkd plan` predicts for this layout "
              "(device + host bytes); `steps / plan` target within 10 %."), "",
             "| label | N | teacher GiB | baseline | load Δ (anon) | load Δ / (teacher/N) | steps | plan | steps / plan |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ranks = sorted(r["baseline_gib"], key=int)
        teacher = r["teacher_params"] * 4 / 2**30
        per = teacher / r["nproc"]
        join = lambda vals: " / ".join(vals)
        base = [r["baseline_gib"][k] for k in ranks]
        delta = join(f"{r['teacher_load_gib'][k]:.2f} ({r['teacher_load_anon_gib'][k]:.2f})" for k in ranks)
        ratio = join(f"{r['teacher_load_gib'][k] / per:.2f}" for k in ranks)
        steps = join(f"{r['peak_gib'][k].get('steps', float('nan')):.2f}" for k in ranks)
        plan = join(f"{b + r['plan_gib']:.2f}" for b in base) if "plan_gib" in r else "-"
        vs = join(f"{r['steps_vs_plan'][k]:.2f}" for k in ranks if k in r.get("steps_vs_plan", {})) or "-"
        label = f"{r['label']} ({r['note']})" if r.get("note") else r["label"]
        lines.append(f"| {label} | {r['nproc']} | {teacher:.2f} | {join(f'{b:.2f}' for b in base)} | {delta} "
                     f"| {ratio} | {steps} | {plan} | {vs} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
