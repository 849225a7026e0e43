"""TED: task-aware layer-wise distillation with per-layer filters (Liang et al. 2023, "Less is More: Task-aware
Layer-wise Distillation for Language Model Compression"; docs/methods.md#ted).

Each distilled layer k of both models gets a filter ``f_k``: ``Linear(D, d_f)`` or ``Linear -> GELU -> Linear``
(``d_f = D_t`` by default, so the student's filter is also the width projection).

* Stage I (``ted_filter_task``), once for the teacher and once for the student, each on its own frozen backbone
  (``student: {freeze: true}``): every filter gets a pooler (``[CLS] -> Linear(d_f, d_f) -> GELU -> dropout``) and a
  head; the loss is the mean over filters of the task loss. The trained filters (with their poolers and heads) are
  left in the run folder as ``ted_filters.safetensors``.
* Stage II (``ted_mse``): teacher and teacher filters frozen (loaded from the teacher's stage-I folder), student
  and student filters (from the student's stage-I folder) trained on
  ``task + kl_a * logit_kd + mse_a * mean_k masked_mean((f_k^s(h_s) - f_k^t(h_t))^2)``: the three terms are the
  ``task``, ``logit_kd`` and ``ted_mse`` losses with their own weights.

Filters, poolers and heads live in the losses, so they are never part of the exported student.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..mappings import resolve_mapping
from ..taps import Tap
from .base import DistillLoss, LossBatch, LossSetup, ModelOutputs, masked_mean, register_loss

FILTER_FILE = "ted_filters.safetensors"
FILTER_KINDS = ("linear", "mlp")


def make_filter(d_in: int, d_out: int, kind: str, where: str) -> nn.Module:
    """A TED filter ``[B, L, d_in] -> [B, L, d_out]``: ``linear`` or ``mlp`` (``Linear -> GELU -> Linear``)."""
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
    raise ValueError(f"{where}: filter={kind!r} is not valid; choose one of {list(FILTER_KINDS)}")


def filter_file(path: str | Path) -> Path:
    """A stage-I folder (holding ``ted_filters.safetensors``) or the file itself."""
    path = Path(path)
    return path / FILTER_FILE if path.is_dir() or path.suffix != ".safetensors" else path


def read_filters(path: str | Path, where: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """The filter tensors (``filters.<k>.*`` keys, without the prefix) and metadata of a stage-I file.

    Raises:
        ValueError: the file does not exist (run the filter stage first) or is not a TED filter file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = filter_file(path)
    if not file.is_file():
        raise ValueError(f"{where}: TED filter file {str(file)!r} does not exist; run the stage-I filter stage "
                         "(loss 'ted_filter_task') first")
    with safe_open(str(file), framework="pt") as f:
        raw = f.metadata() or {}
    if "layers" not in raw:
        raise ValueError(f"{where}: {str(file)!r} is not a TED filter file (no 'layers' metadata)")
    meta = {"layers": json.loads(raw["layers"]), "filter": raw["filter"], "in_dim": int(raw["in_dim"]),
            "filter_dim": int(raw["filter_dim"])}
    tensors = {k[len("filters."):]: v for k, v in load_file(str(file)).items() if k.startswith("filters.")}
    return tensors, meta


@register_loss("ted_filter_task")
class TEDFilterTask(DistillLoss):
    """TED stage I: mean over filters of the task loss (CE, or MSE for regression) of
    ``head_k(pooler_k(f_k(h^(k))[CLS]))``, trained on the frozen backbone of the run's model (the teacher's copy in
    a ``trains: teacher`` stage, else the student). Shapes: ``h^(k) [B, L, D] -> [B, d_f] -> [B, C]``.

    Args:
        layers: 1-based blocks of this model that get a filter: ``all``, ``last`` or a list (the teacher's side
            of the stage-II mapping in the teacher's stage, the student's side in the student's).
        filter: ``linear`` or ``mlp``.
        filter_dim: ``d_f``; default this model's width (give the teacher's width in the student's stage).
        dropout: the poolers' dropout.
    """

    needs = frozenset({"labels", "hidden"})
    tasks = frozenset({"classification", "regression"})

    def __init__(self, setup: LossSetup, layers: str | list[int] = "all", filter: str = "linear",
                 filter_dim: int | None = None, dropout: float = 0.1) -> None:
        super().__init__(setup)
        where = f"loss {setup.name!r}"
        config = setup.student_config
        n = config.num_hidden_layers
        if layers == "all":
            layers = list(range(1, n + 1))
        elif layers == "last":
            layers = [n]
        elif not isinstance(layers, list) or not layers:
            raise ValueError(f"{where}: layers={layers!r}; choose 'all', 'last' or a list of block numbers")
        bad = [k for k in layers if not 1 <= k <= n]
        if bad:
            raise ValueError(f"{where}: layer {bad[0]} is out of range; valid: 1..{n}")
        self.layers = [int(k) for k in layers]
        self.kind = filter
        self.in_dim = int(config.hidden_size)
        self.filter_dim = int(filter_dim or self.in_dim)
        classes = 1 if setup.task == "regression" else int(config.num_labels)
        self.filters = nn.ModuleList(make_filter(self.in_dim, self.filter_dim, filter, where) for _ in self.layers)
        self.poolers = nn.ModuleList(
            nn.Sequential(nn.Linear(self.filter_dim, self.filter_dim), nn.GELU(), nn.Dropout(dropout))
            for _ in self.layers
        )
        self.heads = nn.ModuleList(nn.Linear(self.filter_dim, classes) for _ in self.layers)

    def taps(self) -> tuple[set[Tap], set[Tap]]:
        return {Tap("hidden", k) for k in self.layers}, set()

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        if batch.labels is None:
            raise ValueError(f"loss {self.setup.name!r} needs labels, but the batch has none")
        total = 0.0
        for k, f, pool, head in zip(self.layers, self.filters, self.poolers, self.heads, strict=True):
            cls = student.captures.hidden[k][:, 0]  # [B, D]; filters act per token, so filtering [CLS] suffices
            logits = head(pool(f(cls))).float()  # [B, C]
            if self.setup.task == "regression":
                total = total + F.mse_loss(logits.squeeze(-1), batch.labels.float())
            else:
                total = total + F.cross_entropy(logits, batch.labels.long())
        return total / len(self.layers)

    def artifacts(self) -> dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]:
        """``ted_filters.safetensors``: filters, poolers and heads (fp32), with the layers and sizes as metadata."""
        tensors = {f"{name}.{k}": v.detach().float().cpu().contiguous()
                   for name in ("filters", "poolers", "heads")
                   for k, v in getattr(self, name).state_dict().items()}
        meta = {"layers": json.dumps(self.layers), "filter": self.kind, "in_dim": str(self.in_dim),
                "filter_dim": str(self.filter_dim)}
        return {FILTER_FILE: (tensors, meta)}


@register_loss("ted_mse")
class TEDFilteredMSE(DistillLoss):
    """TED stage II: ``mean_k masked_mean((f_k^s(h_s) - f_k^t(h_t))^2)`` over the mapped layer pairs, with the
    teacher's filters frozen (from its stage-I file) and the student's trained (from its stage-I file, or fresh).
    Default mapping uniform (blocks only). Shapes: ``h_s [B, L, D_s]``, ``h_t [B, L, D_t]``, filtered ``[B, L, d_f]``.

    Args:
        teacher_filters: the teacher's stage-I folder (or its ``ted_filters.safetensors``); ``stage:<name>`` in a
            staged recipe.
        student_filters: the student's stage-I folder/file; None starts the student filters fresh.
        filter: ``linear`` or ``mlp`` (must match the files).
        filter_dim: ``d_f``; default the teacher's width (must match the files).
        masked: mean over real tokens (``false``: over padding too, as the reference code does).
    """

    needs = frozenset({"teacher", "hidden"})

    def __init__(self, setup: LossSetup, teacher_filters: str | None = None, student_filters: str | None = None,
                 filter: str = "linear", filter_dim: int | None = None, masked: bool = True) -> None:
        super().__init__(setup)
        where = f"loss {setup.name!r}"
        if not teacher_filters:
            raise ValueError(f"{where} needs params.teacher_filters: the teacher's stage-I folder (stage:<name>)")
        s_cfg, t_cfg = setup.student_config, setup.teacher_config
        self.pairs = resolve_mapping(setup.mapping, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers,
                                     with_embeddings=False, default="uniform", where=f"losses[{setup.name}].mapping")
        self.kind = filter
        self.filter_dim = int(filter_dim or t_cfg.hidden_size)
        self.paths = {"teacher": teacher_filters, "student": student_filters}
        self.masked = masked
        self.student_filters = nn.ModuleList(
            make_filter(s_cfg.hidden_size, self.filter_dim, filter, where) for _ in self.pairs)
        self.teacher_filters = nn.ModuleList(
            make_filter(t_cfg.hidden_size, self.filter_dim, filter, where) for _ in self.pairs)
        self.teacher_filters.requires_grad_(False)

    def load_artifacts(self) -> None:
        """Load the stage-I filters (before the engine partitions them), checking layers and sizes."""
        where = f"loss {self.setup.name!r}"
        for side, modules, index in (("teacher", self.teacher_filters, 1), ("student", self.student_filters, 0)):
            if not self.paths[side]:
                continue
            tensors, meta = read_filters(self.paths[side], f"{where} {side}_filters")
            layers = [pair[index] for pair in self.pairs]
            width = getattr(self.setup, f"{side}_config").hidden_size
            want = {"layers": layers, "filter": self.kind, "in_dim": width, "filter_dim": self.filter_dim}
            for key, value in want.items():
                if meta[key] != value:
                    raise ValueError(
                        f"{where}: {side} filters in {str(filter_file(self.paths[side]))!r} have {key}={meta[key]!r} "
                        f"but this stage needs {key}={value!r} (mapping {self.pairs}); make stage I's layers, filter "
                        "and filter_dim match stage II"
                    )
            modules.load_state_dict(tensors)
        self.teacher_filters.requires_grad_(False)

    def taps(self) -> tuple[set[Tap], set[Tap]]:
        return {Tap("hidden", s) for s, _ in self.pairs}, {Tap("hidden", t) for _, t in self.pairs}

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, batch: LossBatch) -> torch.Tensor:
        total = 0.0
        for (s, t), f_s, f_t in zip(self.pairs, self.student_filters, self.teacher_filters, strict=True):
            z_s = f_s(student.captures.hidden[s]).float()  # [B, L, d_f]
            with torch.no_grad():
                z_t = f_t(teacher.captures.hidden[t]).float()
            mask = batch.attention_mask if self.masked else torch.ones_like(batch.attention_mask)
            total = total + masked_mean((z_s - z_t).pow(2), mask)
        return total / len(self.pairs)
