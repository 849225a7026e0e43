"""The step every launcher shares: one micro-batch through teacher, student and losses, then backward and the
(boundary) optimiser step."""
from __future__ import annotations

import math
import time

import torch

from ..config import ConfigError
from ..errors import NonFiniteLoss
from . import dist
from .module import TeacherRunner

PHASES = ("teacher", "student", "backward", "optimizer")

# Dense bf16 tensor-core peak of one device in TFLOP/s, by CUDA compute capability: (9, 0) = H100/H200 SXM (989),
# (8, 0) = A100 (312). Only MFU reads it; on a device not listed MFU is not reported rather than guessed.
PEAK_BF16_TFLOPS = {(9, 0): 989.0, (8, 0): 312.0}


def step_flops_per_token(student_params: int, teacher_params: int) -> float:
    """Model FLOPs one distillation step spends per token: ``6 N_s`` for the student's forward and backward plus
    ``2 N_t`` for the teacher's forward (the usual MFU count, Kaplan et al. 2020: matmul FLOPs of the weights,
    attention's ``L``-dependent FLOPs left out). ``teacher_params`` is 0 when no teacher runs (a teacher cache)."""
    return 6.0 * student_params + 2.0 * teacher_params


def device_peak_flops() -> float | None:
    """This process's CUDA device's dense bf16 peak in FLOP/s, or None (no CUDA, or a device not in the table)."""
    if not torch.cuda.is_available():
        return None
    tflops = PEAK_BF16_TFLOPS.get(torch.cuda.get_device_capability())
    return None if tflops is None else tflops * 1e12


class PhaseTimer:
    """Wall milliseconds of each part of a step: ``teacher`` (forward), ``student`` (forward with every loss, and
    the cross-rank agreement on their values), ``backward``, ``optimizer`` (the boundary step, or the accumulation
    bookkeeping between boundaries), summed per logging window (:meth:`take`) and over the run (``run_*``). On
    CUDA each boundary synchronises, so the numbers are the device's; on a CPU they are exact as they are.

    On CUDA each window also reports this rank's peak allocated memory (``peak_mem_gib``, then reset) and, when
    ``flops_per_token`` is set (:func:`step_flops_per_token`) and the device's peak is known, its model FLOPs
    utilisation (``mfu``: this rank's tokens x FLOPs per token / window seconds / the device's bf16 peak)."""

    def __init__(self, flops_per_token: float | None = None) -> None:
        self.flops_per_token = flops_per_token
        self._peak_flops = device_peak_flops()
        self.sums = dict.fromkeys(PHASES, 0.0)
        self.tokens = 0
        self.run_sums = dict.fromkeys(PHASES, 0.0)
        self.run_steps = 0
        self.run_tokens = 0
        self.run_seconds = 0.0
        self._cuda = torch.cuda.is_available()
        self._last = 0.0

    def start(self) -> None:
        self._last = self._now()

    def mark(self, phase: str) -> None:
        now = self._now()
        self.sums[phase] += (now - self._last) * 1e3
        self._last = now

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def take(self, steps: int, seconds: float) -> dict[str, float]:
        """Close a window of ``steps`` optimiser steps that took ``seconds``: per-step means (``ms_<phase>``) and
        the tokens counted, added to the run's totals, then reset."""
        out = {f"ms_{phase}": total / max(1, steps) for phase, total in self.sums.items()}
        out["tokens"] = self.tokens
        if self._cuda:
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        if self.flops_per_token and self._peak_flops:
            out["mfu"] = mfu(self.flops_per_token, self.tokens, seconds, self._peak_flops)
        for phase, total in self.sums.items():
            self.run_sums[phase] += total
        self.run_steps += steps
        self.run_tokens += self.tokens
        self.run_seconds += seconds
        self.sums = dict.fromkeys(PHASES, 0.0)
        self.tokens = 0
        return out

    def run_step_ms(self) -> dict[str, float]:
        """Per-optimiser-step milliseconds of each phase over every window taken so far."""
        return {phase: total / max(1, self.run_steps) for phase, total in self.run_sums.items()}


def mfu(flops_per_token: float, tokens: int, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of one rank: achieved model FLOP/s over the device's peak FLOP/s."""
    return flops_per_token * tokens / max(seconds, 1e-9) / peak_flops


GRAD_NORM = "grad_norm/"  # prefix of the per-term gradient norms in a step's results (train.log_grad_norms)


def term_grad_norms(terms: dict[str, torch.Tensor], weights: dict[str, float],
                    params: list[torch.nn.Parameter]) -> dict[str, float]:
    """L2 norm of the gradient of each weighted term, ``|| d(w_i * L_i) / d params ||``, and of their sum
    (``loss``), over ``params`` taken together (every parameter's gradient flattened into one vector).

    Comparing them shows which term drives the update: a term whose weighted gradient is 10x another's dominates
    the step whatever the terms' values are, and a total norm well below the sum of the terms' norms means the
    terms pull in opposite directions. Each term's graph is walked once (the blocked attention losses allow no
    second backward), the total's gradient is the sum of the terms'. Nothing is accumulated into ``.grad``, and
    the graph is freed after the last term. A term with no path to ``params`` has norm 0.

    Args:
        terms: unweighted scalar terms by name; ``weights`` their weights.
        params: the student parameters that train.
    """
    out = {}
    summed: list[torch.Tensor | None] = [None] * len(params)
    names = [n for n, v in terms.items() if v.requires_grad]
    for name, value in terms.items():
        if name not in names:
            out[GRAD_NORM + name] = 0.0
            continue
        grads = torch.autograd.grad(weights[name] * value, params, retain_graph=name != names[-1],
                                    allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        out[GRAD_NORM + name] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
        summed = [a if g is None else (g.detach() if a is None else a + g.detach()) for a, g in zip(summed, grads)]
    squares = [g.float().pow(2).sum() for g in summed if g is not None]
    out[GRAD_NORM + "loss"] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    return out


def distill_step(engine, teacher: TeacherRunner | None, batch: dict[str, torch.Tensor],
                 timer: PhaseTimer | None = None, grad_norms: bool = False) -> dict[str, float]:
    """One micro-batch: teacher forward, student forward + losses, backward, (boundary) optimiser step.

    Loss terms are averaged across ranks before anything else so every rank agrees on a non-finite value and
    stops together, before the bad gradient reaches the weights. Returns ``{"loss": total, term: value}``; with a
    ``timer``, each part's wall time and the batch's tokens (real tokens, ``[B, L]`` mask sum) are added to it.
    With ``grad_norms`` (``train.log_grad_norms``, on logged steps only) it also holds ``grad_norm/<term>`` and
    ``grad_norm/loss`` (:func:`term_grad_norms` of this micro-batch w.r.t. the student's trainable parameters,
    averaged across ranks; not the clipped, rank-averaged update). Their extra forward and backwards count as
    ``student`` time in the step-time split.
    """
    if timer is not None:
        timer.start()
        mask = batch.get("attention_mask")
        timer.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    t_out = teacher(batch) if teacher is not None else None
    if timer is not None:
        timer.mark("teacher")
    norms = _grad_norms(engine, batch, t_out) if grad_norms else {}
    total, terms = engine(batch, t_out)
    names = ["loss", *terms, *norms]
    values = dist.mean_across_ranks(torch.stack([total.detach().float(), *(v.detach().float() for v in terms.values()),
                                                 *(torch.tensor(v, device=total.device) for v in norms.values())]))
    if not torch.isfinite(values).all():
        bad = [f"{n}={v}" for n, v in zip(names, values.tolist()) if not math.isfinite(v)]
        raise NonFiniteLoss(
            f"non-finite loss at step {engine.global_steps + 1} (micro-batch {engine.micro_steps + 1}): "
            f"{', '.join(bad)}; nothing was updated with it"
        )
    if timer is not None:
        timer.mark("student")
    engine.backward(total)
    if timer is not None:
        timer.mark("backward")
    engine.step()
    if timer is not None:
        timer.mark("optimizer")
    return dict(zip(names, values.tolist()))


def _grad_norms(engine, batch: dict[str, torch.Tensor], t_out) -> dict[str, float]:
    """:func:`term_grad_norms` for the engine's :class:`~scaledkd.engine.module.DistillModule`: its loss weights and
    its student's trainable parameters (projections and filters inside the losses are left out).

    The module runs a forward of its own, outside the DeepSpeed engine: the engine hooks the outputs of its forward
    so that any backward through them is its managed backward (refused outside ``engine.backward`` under ZeRO-0,
    divided by the accumulation steps otherwise). One extra student forward on logged steps is the price. It runs
    on a copy of the random state, so with dropout on it draws the very masks the step's own forward then draws:
    the norms are this step's, and the run trains as it would without the diagnostic."""
    module = getattr(engine, "module", engine)
    params = [p for p in module.student.parameters() if p.requires_grad]
    if not params:  # a frozen student (TED's stage I): nothing of the student's to measure
        return {}
    if any(hasattr(p, "ds_id") for p in params):
        raise ConfigError("train.log_grad_norms=true needs whole student parameters on every rank; under ZeRO-3 "
                          "they are partitioned. Use a ZeRO 0-2 student.ds_config for the diagnostic run")
    devices = [params[0].device] if params[0].device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        _, terms = module(batch, t_out)
        return term_grad_norms(terms, module.weights, params)
