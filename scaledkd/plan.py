"""``scaledkd plan``: per-GPU memory of every teacher/student sharding layout of a recipe, before renting GPUs.

Parameter counts come from the model configs: each model is built on the ``meta`` device, so no weight is read
or allocated. The byte accounting is ZeRO's (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward
Training Trillion Parameter Models") plus the buffers DeepSpeed really allocates; ``benchmarks/memory_layouts.py``
counts the tensors of real engines and compares them with these functions.

Per GPU, for P student parameters, N GPUs, w bytes per weight/gradient (4 fp32, 2 bf16/fp16), L the largest
parameter tensor and b = ``reduce_bucket_size`` (DeepSpeed's default: 5e8 elements):

================  ============================  =============  ===============================  ================
student           ZeRO-0                        ZeRO-1         ZeRO-2                           ZeRO-3
================  ============================  =============  ===============================  ================
weights           w P                           w P            w P                              w P/N + small
                                                                                                tensors whole
fp32 master       0 (fp32) / 4 P (16-bit)       4 P/N          4 P/N                            4 P/N
Adam m, v         8 P                           8 P/N          8 P/N                            8 P/N
gradients         w P                           w P            w P/N; w min(P, P/N + L) while   w P/N
                                                               accumulating (whole tensors
                                                               straddling the partition)
reduce bucket     0                             4 b            w b (during backward)            w b
================  ============================  =============  ===============================  ================

Offloading the optimiser (``zero2_offload``, ``zero3_offload``) moves master weights, Adam states and an fp32
gradient partition to host memory, with staging buffers the size of L; offloading parameters (ZeRO-3) moves the
weight partitions too. ZeRO-3 gathers whole modules to compute them: the largest module, twice (current and
prefetched). A frozen teacher has only weights: whole on every GPU (replicated) or w P/N (ZeRO-3; on host when
offloaded). Activations follow Korthikanti et al. (2022): s b h (34 + 5 a s / h) bytes per layer at 16-bit.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from .ds_config import (
    fill_bucket_sizes,
    offloaded,
    read_ds_config,
    zero_section,
    zero_stage,
)

GiB = 2**30
DS_DEFAULT_REDUCE_BUCKET = 500_000_000
DS_DEFAULT_PERSISTENCE = 100_000
DS_DEFAULT_PREFETCH_BUCKET = 50_000_000
DEFAULT_HEADROOM = 0.15

# Layout name -> the shipped DeepSpeed JSON that implements it.
TEACHER_LAYOUTS = {
    "replicated": "ds_configs/teacher_replicated.json",
    "zero3": "ds_configs/teacher_zero3.json",
    "zero3_offload": "ds_configs/teacher_zero3_offload.json",
}
STUDENT_LAYOUTS = {
    "zero0": "ds_configs/zero0.json",
    "zero1": "ds_configs/zero1.json",
    "zero2": "ds_configs/zero2.json",
    "zero3": "ds_configs/zero3.json",
    "zero2_offload": "ds_configs/zero2_offload.json",
    "zero3_offload": "ds_configs/zero3_offload.json",
}
# "Least sharded" = least communication and host traffic per step: a partitioned teacher is all-gathered at every
# forward, ZeRO-3 gathers the student's weights twice per step, offload crosses PCIe at every step.
TEACHER_COST = {"replicated": 0, "zero3": 2, "zero3_offload": 5}
STUDENT_COST = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3, "zero2_offload": 4, "zero3_offload": 6}
CATEGORIES = ("teacher_params", "student_params", "master_params", "optimizer_states", "gradients", "comm_buffers",
              "other", "activations", "transient")
DEVICES = ("cuda", "cpu")
# What one data-parallel rank runs on, as the table names it (under --device cpu, --gpus counts CPU ranks).
RANK_NAME = {"cuda": "GPU", "cpu": "CPU rank"}
# torch AdamW's temporaries per element it updates, beyond its states (measured on CPU ranks, benchmarks/scale.py:
# the single-tensor path makes sqrt(v) and sqrt(v)/c2 before the in-place update, with DeepSpeed's fp32 gradient
# view: 3 copies of the flat fp32 partition at the step). On CUDA the foreach path makes one sqrt copy; the gradient
# copy is assumed as on CPU (not measured on a GPU).
ADAM_TEMPORARIES = {"cpu": 3, "cuda": 2}
HEAD_CHUNK_ROWS = 256  # scaledkd.losses.head's default chunk_size: tokens whose [C, V] logits exist at once


class PlanError(ValueError):
    """A planner argument is invalid; the message names the value and the valid range."""


def weight_bytes(precision: str) -> int:
    if precision not in ("fp32", "bf16", "fp16"):
        raise PlanError(f"precision={precision!r} is not valid; choose one of ['fp32', 'bf16', 'fp16']")
    return 4 if precision == "fp32" else 2


@dataclasses.dataclass
class Bytes:
    """Bytes per GPU by category, split into GPU memory and (offloaded) host memory."""

    device: dict[str, float] = dataclasses.field(default_factory=dict)
    host: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, category: str, amount: float, on_host: bool = False) -> None:
        side = self.host if on_host else self.device
        side[category] = side.get(category, 0.0) + float(amount)

    def both(self, category: str) -> float:
        """Device plus host bytes of a category (what a CPU-only measurement sees)."""
        return self.device.get(category, 0.0) + self.host.get(category, 0.0)

    def merged(self, other: Bytes) -> Bytes:
        out = Bytes(dict(self.device), dict(self.host))
        for category, amount in other.device.items():
            out.add(category, amount)
        for category, amount in other.host.items():
            out.add(category, amount, on_host=True)
        return out

    @property
    def device_total(self) -> float:
        return sum(self.device.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())


def _persistent(numels: Sequence[int], ds_config: dict[str, Any]) -> int:
    """Elements ZeRO-3 keeps whole on every rank: tensors below ``stage3_param_persistence_threshold``."""
    threshold = int(zero_section(ds_config).get("stage3_param_persistence_threshold", DS_DEFAULT_PERSISTENCE))
    return sum(n for n in numels if n < threshold)


def _gathered(largest_module: int, ds_config: dict[str, Any], w: int) -> float:
    """ZeRO-3's working set: the module being computed, whole, and the next one prefetched."""
    prefetch = int(zero_section(ds_config).get("stage3_prefetch_bucket_size", DS_DEFAULT_PREFETCH_BUCKET))
    return float(w * (largest_module + min(largest_module, prefetch)))


def teacher_bytes(numels: Sequence[int], ds_config: dict[str, Any], n: int, precision: str,
                  largest_module: int = 0) -> Bytes:
    """Frozen teacher weights per GPU: replicated (stage 0) or partitioned (stage 3, on host when offloaded).

    Args:
        numels: element counts of the teacher's parameter tensors.
        ds_config: the teacher's DeepSpeed config.
        n: GPUs (data-parallel ranks).
        precision: weight precision (``train.precision``).
        largest_module: parameters of the largest module gathered at once under ZeRO-3 (0: not counted).
    """
    w = weight_bytes(precision)
    total = sum(numels)
    out = Bytes()
    if zero_stage(ds_config) != 3:
        out.add("teacher_params", w * total)
        return out
    # Tensors below the persistence threshold are partitioned like the rest and also kept whole on every rank.
    out.add("teacher_params", w * total / n, on_host=offloaded(ds_config, "param"))
    out.add("teacher_params", w * _persistent(numels, ds_config))
    out.add("comm_buffers", _gathered(largest_module, ds_config, w) if largest_module else 0.0)
    return out


def student_bytes(numels: Sequence[int], ds_config: dict[str, Any], n: int, precision: str, grad_accum: int = 1,
                  largest_module: int = 0, hidden: int | None = None, resident_only: bool = False) -> Bytes:
    """The student's weights, fp32 master copy, Adam states, gradients and DeepSpeed buffers per GPU.

    Args:
        numels: element counts of the student's parameter tensors (distillation projections included).
        ds_config: the student's DeepSpeed config (ZeRO stage, offload, persistence threshold, bucket size).
        n: GPUs (data-parallel ranks).
        precision: ``fp32``, ``bf16`` or ``fp16`` weights and gradients (``train.precision``).
        grad_accum: micro-batches per step; above 1 ZeRO-2 keeps whole gradients of the tensors it owns part of.
        largest_module: parameters of the largest module gathered at once under ZeRO-3 (0: not counted).
        hidden: the student's width, for ``reduce_bucket_size: "auto"`` (:func:`~scaledkd.ds_config.fill_bucket_sizes`).
        resident_only: count a reduce bucket only as far as the gradients can fill it (CPU ranks: pages never
            written are not resident).
    """
    if zero_section(ds_config).get("reduce_bucket_size") == "auto":
        if hidden is None:
            raise PlanError("reduce_bucket_size is 'auto': the student's width (hidden) is needed to size it")
        ds_config = fill_bucket_sizes(ds_config, hidden)
    w = weight_bytes(precision)
    p = float(sum(numels))
    largest = float(max(numels, default=0))
    stage = zero_stage(ds_config)
    zero = zero_section(ds_config)
    bucket = float(zero.get("reduce_bucket_size", DS_DEFAULT_REDUCE_BUCKET))
    if resident_only:
        bucket = min(bucket, p)
    off_opt = offloaded(ds_config, "optimizer")
    off_param = offloaded(ds_config, "param")
    out = Bytes()
    if stage == 0:
        out.add("student_params", w * p)
        out.add("master_params", 0.0 if precision == "fp32" else 4 * p)
        out.add("optimizer_states", 8 * p)
        out.add("gradients", w * p)
        return out
    out.add("master_params", 4 * p / n, on_host=off_opt)
    out.add("optimizer_states", 8 * p / n, on_host=off_opt)
    if stage == 3:
        out.add("student_params", w * p / n, on_host=off_param)
        out.add("student_params", w * _persistent(numels, ds_config))  # small tensors, also kept whole
        out.add("gradients", w * p / n)
        out.add("comm_buffers", w * bucket)
        if largest_module:
            out.add("comm_buffers", _gathered(largest_module, ds_config, w))
        if off_opt:
            out.add("gradients", 4 * p / n, on_host=True)  # the fp32 gradient partition the CPU optimiser reads
        return out
    out.add("student_params", w * p)
    owned = min(p, p / n + largest) if grad_accum > 1 else p / n
    overlap = 2 if zero.get("overlap_comm", False) else 1
    contiguous = zero.get("contiguous_gradients", True)
    if stage == 1:
        out.add("gradients", w * p)  # whole gradients until the boundary's reduce-scatter
        out.add("comm_buffers", 4 * bucket * overlap if contiguous else 0.0)  # ZeRO-1 stages in fp32
    elif not off_opt:
        out.add("gradients", w * owned)
        out.add("comm_buffers", w * bucket * overlap if contiguous else 0.0)
    else:
        # CPU Adam: fp32 gradient partition + accumulated gradients on host, one tensor-sized staging buffer
        # on each side, and a host copy of the 16-bit partition for the copy back.
        out.add("gradients", 4 * p / n + 4 * owned + 4 * largest, on_host=True)
        out.add("gradients", 4 * largest)
        out.add("other", w * p / n, on_host=True)
        out.add("comm_buffers", w * bucket * overlap if contiguous else 0.0)
    return out


# ------------------------------------------------------------------------------------------ model sizes


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """What the planner needs to know about one model, read from its config.

    Attributes:
        name: where the config came from.
        numels: element count of every parameter tensor (tied tensors once).
        largest_module: parameters of the largest block or tensor (what ZeRO-3 gathers at once).
        layers, hidden, heads, vocab: the transformer's shape (activations).
        lm_head: the model outputs vocabulary logits (decoder LMs): ``[B, L, V]`` logits count as activations.
        head_chunks: every loss that reads logits takes them from the head chunk by chunk (``logits_from_head``),
            so no ``[B, L, V]`` logits exist.
    """

    name: str
    numels: tuple[int, ...]
    largest_module: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    lm_head: bool
    head_chunks: bool = False

    @property
    def params(self) -> int:
        return sum(self.numels)


def _measure_meta(name: str, model: torch.nn.Module, extra: Sequence[torch.nn.Module] = ()) -> ModelSize:
    from . import arch

    numels = [p.numel() for p in model.parameters()] + [p.numel() for m in extra for p in m.parameters()]
    block = max((sum(p.numel() for p in b.parameters()) for b in arch.blocks(model)), default=0)
    config = model.config
    return ModelSize(name=name, numels=tuple(numels), largest_module=max([block, *numels]),
                     layers=int(config.num_hidden_layers), hidden=int(config.hidden_size),
                     heads=int(config.num_attention_heads), vocab=int(config.vocab_size),
                     lm_head=model.get_output_embeddings() is not None)


def recipe_sizes(cfg) -> tuple[ModelSize | None, ModelSize]:
    """Teacher and student sizes of a recipe's run plan, from configs only (models built on the meta device)."""
    from . import models
    from .build import resolve

    run = resolve(cfg, world_size=1, check_output=False, load_data=False)
    with torch.device("meta"):
        student = models.auto_class(run.task).from_config(run.student_config)
        teacher = (models.auto_class(run.task).from_config(run.teacher_config)
                   if run.teacher_config is not None else None)
    losses, _ = run.build_losses("meta")
    t_size = _measure_meta(run.teacher_path, teacher) if teacher is not None else None
    s_size = _measure_meta(f"{cfg.student.init} from {run.student_source}", student, list(losses.values()))
    readers = [loss for loss in losses.values() if "logits" in loss.needs]
    chunked = bool(readers) and all(loss.logits_from_head for loss in readers)
    return t_size, dataclasses.replace(s_size, head_chunks=chunked)


def _layer_activations(size: ModelSize, batch: int, seq: int, w: int) -> float:
    # Korthikanti et al. (2022), eq. 1: s b h (34 + 5 a s / h) bytes per layer at 16-bit; scaled to w bytes.
    return seq * batch * size.hidden * (34 + 5 * size.heads * seq / size.hidden) * w / 2


def activation_bytes(teacher: ModelSize | None, student: ModelSize, batch: int, seq: int, precision: str,
                     checkpointing: bool = False, full_logits: bool = True) -> float:
    """Activations per GPU for one micro-batch: the student's saved for backward, the teacher's transient.

    The student keeps every layer's activations (only block inputs with gradient checkpointing, plus one block's
    to recompute); the teacher runs without a graph (one block live) but its captured hidden states stay until the
    losses read them (all of them, as an upper bound). Decoder LMs add ``[B, L, V]`` logits and their fp32 softmax,
    or, when every logit loss applies the head chunk by chunk (``full_logits=False``), one chunk's ``[C, V]``.
    """
    w = weight_bytes(precision)
    per_layer = _layer_activations(student, batch, seq, w)
    if checkpointing:
        total = student.layers * batch * seq * student.hidden * w + per_layer
    else:
        total = student.layers * per_layer
    rows = batch * seq if full_logits else min(batch * seq, HEAD_CHUNK_ROWS)
    if student.lm_head:
        total += rows * student.vocab * (w + 4)
    if teacher is not None:
        total += _layer_activations(teacher, batch, seq, w)
        total += (teacher.layers + 1) * batch * seq * teacher.hidden * w
        if teacher.lm_head:
            total += rows * teacher.vocab * (w + 4)
    return float(total)


# ------------------------------------------------------------------------------------------ the plan


@dataclasses.dataclass
class Layout:
    teacher: str | None
    student: str
    bytes: Bytes
    fits: bool
    host_shared: bool = False  # CPU ranks: the "host" share is the rank's own RAM, as its "device" share is

    @property
    def rank_total(self) -> float:
        """Bytes that count against one rank's memory: device memory on a GPU (its host share is in the node's
        RAM, which --gpu-mem does not size), device plus host on a CPU rank (one RAM)."""
        return self.bytes.device_total + (self.bytes.host_total if self.host_shared else 0.0)

    @property
    def cost(self) -> int:
        return STUDENT_COST[self.student] + (TEACHER_COST[self.teacher] if self.teacher else 0)


@dataclasses.dataclass
class Plan:
    teacher: ModelSize | None
    student: ModelSize
    gpus: int
    gpu_mem_gib: float
    headroom: float
    precision: str
    batch: int
    seq: int
    layouts: list[Layout]
    device: str = "cuda"

    @property
    def rank_name(self) -> str:
        """``GPU`` or ``CPU rank``: what the per-rank numbers are per."""
        return RANK_NAME[self.device]

    @property
    def usable_bytes(self) -> float:
        return self.gpu_mem_gib * GiB * (1 - self.headroom)

    @property
    def recommended(self) -> Layout | None:
        """The least-sharded layout that fits (ties: the one with the most room left)."""
        fitting = [layout for layout in self.layouts if layout.fits]
        return min(fitting, key=lambda x: (x.cost, x.rank_total)) if fitting else None


def check_arguments(gpus: int, gpu_mem_gib: float, headroom: float) -> None:
    if not isinstance(gpus, int) or gpus < 1:
        raise PlanError(f"--gpus={gpus!r} must be a whole number >= 1 (GPUs in the job, all nodes together)")
    if not gpu_mem_gib > 0:
        raise PlanError(f"--gpu-mem={gpu_mem_gib!r} must be > 0 (GiB of memory per GPU, e.g. 80 for an H100)")
    if not 0 <= headroom < 1:
        raise PlanError(f"--headroom={headroom!r} must be in [0, 1) (the share of GPU memory kept free)")


def optimizer_temporaries(numels: Sequence[int], ds_config: dict[str, Any], n: int, device: str = "cuda") -> float:
    """Bytes torch AdamW allocates for one step beyond its states: ``ADAM_TEMPORARIES[device]`` fp32 copies of
    what one update call covers. ZeRO-1/2/3 hand it the rank's flat fp32 partition (``P / N`` elements at once);
    ZeRO-0 the parameters one tensor at a time (the largest tensor). They exist after backward, when the activations
    are gone, so :func:`make_plan` counts only what exceeds the activations and the modules ZeRO-3 gathers (all of
    them when a GPU run's optimizer steps in host memory)."""
    per_call = sum(numels) / n if zero_stage(ds_config) > 0 else max(numels, default=0)
    return float(ADAM_TEMPORARIES[device] * 4 * per_call)


def make_plan(cfg, gpus: int, gpu_mem_gib: float, headroom: float = DEFAULT_HEADROOM,
              sizes: tuple[ModelSize | None, ModelSize] | None = None, device: str = "cuda") -> Plan:
    """Every teacher x student layout of ``cfg`` on ``gpus`` GPUs of ``gpu_mem_gib`` GiB, and which ones fit.

    ``device="cpu"`` plans CPU ranks (RAM per rank, as ``benchmarks/scale.py`` measures it): there a buffer's
    pages that are never written are not resident, so a reduce bucket counts only what the student's gradients
    can fill (``min(reduce_bucket_size, P)``), where a GPU allocator reserves all of it; and what offload layouts
    put "on the host" is in the rank's own RAM, so a layout fits when device and host bytes together do.
    """
    check_arguments(gpus, gpu_mem_gib, headroom)
    if device not in DEVICES:
        raise PlanError(f"--device={device!r} is not valid; choose one of {list(DEVICES)}")
    teacher, student = sizes if sizes is not None else recipe_sizes(cfg)
    precision, train = cfg.train.precision, cfg.train
    activations = activation_bytes(teacher, student, train.batch_size, cfg.data.max_length, precision,
                                   cfg.student.gradient_checkpointing, full_logits=not student.head_chunks)
    layouts = []
    for t_name in (list(TEACHER_LAYOUTS) if teacher is not None else [None]):
        t_bytes = Bytes()
        if teacher is not None:
            t_bytes = teacher_bytes(teacher.numels, read_ds_config(TEACHER_LAYOUTS[t_name]), gpus, precision,
                                    teacher.largest_module)
        for s_name, s_path in STUDENT_LAYOUTS.items():
            s_config = read_ds_config(s_path)
            s_bytes = student_bytes(student.numels, s_config, gpus, precision, train.grad_accum,
                                    student.largest_module, student.hidden, resident_only=device == "cpu")
            total = t_bytes.merged(s_bytes)
            total.add("activations", activations)
            # The step's temporaries come after backward freed the activations and the gathered modules, in the
            # same memory unless a GPU run offloads the optimizer: it then steps in host memory, where nothing was
            # freed for them (on CPU ranks host and device memory are one).
            forward_live = activations + t_bytes.both("comm_buffers")
            if zero_stage(s_config) == 3:
                forward_live += _gathered(student.largest_module, s_config, weight_bytes(precision))
            on_host = offloaded(s_config, "optimizer")
            room = 0.0 if on_host and device == "cuda" else forward_live
            temporaries = optimizer_temporaries(student.numels, s_config, gpus, device)
            total.add("transient", max(0.0, temporaries - room), on_host=on_host)
            layout = Layout(t_name, s_name, total, fits=False, host_shared=device == "cpu")
            layout.fits = layout.rank_total <= gpu_mem_gib * GiB * (1 - headroom)
            layouts.append(layout)
    return Plan(teacher, student, gpus, gpu_mem_gib, headroom, precision, train.batch_size, cfg.data.max_length,
                layouts, device)


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f} M"


def format_plan(plan: Plan) -> str:
    """The plan as a table (GiB per GPU, or per CPU rank under ``device="cpu"``) with the recommendation
    underneath."""
    unit = plan.rank_name
    lines = [
        f"scaledkd plan: {plan.gpus} {unit}(s) x {plan.gpu_mem_gib:g} GiB, headroom {plan.headroom:.0%} -> "
        f"{_gib(plan.usable_bytes)} GiB usable per {unit}; precision {plan.precision}, micro-batch {plan.batch} x "
        f"{plan.seq} tokens per {unit}",
    ]
    if plan.teacher is not None:
        lines.append(f"teacher {plan.teacher.name}: {_millions(plan.teacher.params)} params, {plan.teacher.layers} "
                     f"layers, width {plan.teacher.hidden}")
    lines.append(f"student {plan.student.name}: {_millions(plan.student.params)} params (with distillation "
                 f"projections), {plan.student.layers} layers, width {plan.student.hidden}")
    lines.append("")
    total = f"{unit.split()[-1]} total"  # "GPU total" / "rank total"
    held = ("excludes what is offloaded, 'host' is the offloaded part (CPU RAM per GPU)" if plan.device == "cuda"
            else "includes the offloaded part, 'host' (on a CPU rank the same RAM), and is what must fit")
    header = ("teacher", "student", "teacher", "weights", "master", "adam", "grads", "buffers", "activ.", total,
              "host", "fits")
    widths = (13, 13, 8, 8, 8, 8, 8, 8, 8, 10, 8, 4)
    lines.append("  ".join(h.ljust(wd) if i < 2 else h.rjust(wd) for i, (h, wd) in enumerate(zip(header, widths))))
    lines.append("  ".join("-" * wd for wd in widths))
    for layout in plan.layouts:
        b = layout.bytes
        cells = [layout.teacher or "-", layout.student, _gib(b.both("teacher_params")), _gib(b.both("student_params")),
                 _gib(b.both("master_params")), _gib(b.both("optimizer_states")), _gib(b.both("gradients")),
                 _gib(b.both("comm_buffers") + b.both("other") + b.both("transient")), _gib(b.both("activations")),
                 _gib(layout.rank_total), _gib(b.host_total), "yes" if layout.fits else "no"]
        lines.append("  ".join(c.ljust(wd) if i < 2 else c.rjust(wd) for i, (c, wd) in enumerate(zip(cells, widths))))
    lines += ["", f"Columns are GiB per {unit} of each kind, wherever it lives; '{total}' {held}; 'buffers' "
              "includes the optimizer step's temporaries beyond the activations."]
    best = plan.recommended
    if best is None:
        lines.append(f"No layout fits in {_gib(plan.usable_bytes)} GiB per {unit}: use more {unit}s, a smaller "
                     "train.batch_size (with train.grad_accum), student.gradient_checkpointing=true, or bf16.")
    else:
        lines.append(f"Recommended (least sharded that fits, {_gib(best.rank_total)} of "
                     f"{_gib(plan.usable_bytes)} GiB): teacher {best.teacher or '-'} + student {best.student}")
        if best.teacher is not None:
            lines.append(f"  teacher.ds_config: {TEACHER_LAYOUTS[best.teacher]}")
        lines.append(f"  student.ds_config: {STUDENT_LAYOUTS[best.student]}")
    return "\n".join(lines)


def plan_as_dict(plan: Plan) -> dict[str, Any]:
    best = plan.recommended
    return {
        "device": plan.device, "gpus": plan.gpus, "gpu_mem_gib": plan.gpu_mem_gib, "headroom": plan.headroom,
        "precision": plan.precision, "usable_bytes": plan.usable_bytes,
        "teacher_params": plan.teacher.params if plan.teacher else None, "student_params": plan.student.params,
        "layouts": [{"teacher": x.teacher, "student": x.student, "fits": x.fits, "device_bytes": x.bytes.device,
                     "host_bytes": x.bytes.host, "device_total": x.bytes.device_total,
                     "rank_total": x.rank_total} for x in plan.layouts],
        "recommended": None if best is None else {
            "teacher": best.teacher, "student": best.student, "student_ds_config": STUDENT_LAYOUTS[best.student],
            "teacher_ds_config": TEACHER_LAYOUTS[best.teacher] if best.teacher else None},
    }
