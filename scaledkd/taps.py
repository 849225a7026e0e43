"""The layer-tap manager: forward hooks on exactly the modules the losses need, returning typed captures.

Losses declare :class:`Tap` requests; the manager hooks block outputs (``hidden``, layer i = output of block i,
layer 0 = the input of block 1, i.e. the embedding output), the Q/K/V projections of chosen blocks, and the
positions their attention modules receive (``rope``: rotary ``(cos, sin)``; ``bias``: a relative-position bias;
see :mod:`scaledkd.positions`). Hooks only read the module's inputs/outputs, never its parameters, so they are
correct under ZeRO-3 where parameters are empty shards outside their module's forward.

Captures are recorded only while :meth:`TapManager.capture` is open. Activation-checkpointing recomputes a
block's forward during backward, outside that window, so a recompute never adds or replaces a capture, and the
captures of the first forward keep their autograd path.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from . import arch
from .positions import call_argument

TapKind = Literal["hidden", "q", "k", "v", "rope", "bias"]


@dataclass(frozen=True, order=True)
class Tap:
    """One capture point: ``hidden`` at layer i (0 = embeddings), or ``q``/``k``/``v`` or the attention's positions
    (``rope``/``bias``, whichever the architecture has: ``Arch.positions``) of block i (1-based)."""

    kind: TapKind
    layer: int


@dataclass
class Captures:
    """What one forward captured. Tensors are ``[B, L, D]`` (hidden), ``[B, L, H*d]`` (q/k/v projections),
    ``(cos, sin)`` each ``[B, L, d]`` (rope) or ``[B, H, L, L]`` (bias)."""

    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    q: dict[int, torch.Tensor] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    bias: dict[int, torch.Tensor] = field(default_factory=dict)

    def get(self, tap: Tap) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        table = getattr(self, tap.kind)
        if tap.layer not in table:
            raise KeyError(f"{tap} was not captured (captured {tap.kind}: {sorted(table)})")
        return table[tap.layer]

    def __len__(self) -> int:
        return len(self.hidden) + len(self.q) + len(self.k) + len(self.v) + len(self.rope) + len(self.bias)


def _first_tensor(x) -> torch.Tensor:
    # transformers 5 blocks return a plain Tensor; older versions and some families return a tuple.
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    raise TypeError(f"cannot find a tensor in a hook value of type {type(x).__name__}")


class TapManager:
    """Registers forward hooks for a set of :class:`Tap` on one model and collects :class:`Captures`.

    Args:
        model: the model (wrappers are unwrapped to resolve module names).
        taps: what to capture; layer numbers are validated against the model.
        detach: detach captures (teacher) or keep them in the autograd graph (student).
    """

    def __init__(self, model: nn.Module, taps: Iterable[Tap], detach: bool) -> None:
        self.model = arch.unwrap(model)
        self.taps = sorted(set(taps))
        self.detach = detach
        self._captures = Captures()
        self._armed = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        n = arch.num_blocks(self.model)
        family = arch.arch_of(self.model)
        for tap in self.taps:
            if tap.kind in ("rope", "bias") and tap.kind != family.positions:
                raise ValueError(
                    f"{tap.kind} tap: {self.model.config.model_type} passes "
                    f"{family.positions or 'no'} positions to its attention modules"
                )
            low = 0 if tap.kind == "hidden" else 1
            if not low <= tap.layer <= n:
                raise ValueError(
                    f"{tap.kind} tap at layer {tap.layer} is out of range for {self.model.config.model_type} "
                    f"with {n} blocks; valid layers: {low}..{n}"
                )
        self._attach()

    # ------------------------------------------------------------------ hooks
    def _record(self, kind: str, layer: int, value: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        if not self._armed:
            return  # a recompute in backward (activation checkpointing) or an unrelated forward
        table = getattr(self._captures, kind)
        if self.detach:
            value = tuple(v.detach() for v in value) if isinstance(value, tuple) else value.detach()
        table[layer] = value

    def _attach(self) -> None:
        blocks = arch.blocks(self.model)
        hidden = sorted(t.layer for t in self.taps if t.kind == "hidden")
        proj: dict[int, set[str]] = {}
        for t in self.taps:
            if t.kind in ("q", "k", "v"):
                proj.setdefault(t.layer, set()).add(t.kind)
        for layer in hidden:
            if layer == 0:
                # The embedding output is the first block's input: one rule for every family, and it sees
                # whatever the embedding stage produced (mixup included).
                def pre(_m, args, kwargs):
                    x = args[0] if args else kwargs.get("hidden_states")
                    self._record("hidden", 0, _first_tensor(x))

                self._handles.append(blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(_m, _args, out, layer=layer):
                    self._record("hidden", layer, _first_tensor(out))

                self._handles.append(blocks[layer - 1].register_forward_hook(post))
        for layer, kinds in proj.items():
            modules = arch.qkv_modules(self.model, layer)
            if "qkv" in modules:
                def fused(_m, _args, out, layer=layer, kinds=frozenset(kinds)):
                    for kind, value in zip("qkv", arch.split_fused_qkv(_first_tensor(out))):
                        if kind in kinds:
                            self._record(kind, layer, value)

                self._handles.append(modules["qkv"].register_forward_hook(fused))
            else:
                for kind in sorted(kinds):
                    def one(_m, _args, out, layer=layer, kind=kind):
                        # flatten(2): Qwen3's per-head q_norm/k_norm give [B, L, H, d]; projections are [B, L, H*d].
                        self._record(kind, layer, _first_tensor(out).flatten(2))

                    self._handles.append(modules[kind].register_forward_hook(one))
        for t in self.taps:
            if t.kind in ("rope", "bias"):
                module = arch.attention_module(self.model, t.layer)
                read = call_argument(module, arch.arch_of(self.model).position_arg)

                def positions(_m, args, kwargs, layer=t.layer, kind=t.kind, read=read):
                    value = read(args, kwargs)
                    if value is not None:  # not passed: check_complete names the missing tap
                        self._record(kind, layer, tuple(value) if kind == "rope" else value)

                self._handles.append(module.register_forward_pre_hook(positions, with_kwargs=True))

    # ------------------------------------------------------------------ use
    @contextlib.contextmanager
    def capture(self) -> Iterator[Captures]:
        """Open a capture window for one forward; yields the (filled-in) captures of that forward."""
        self._captures = Captures()
        self._armed = True
        try:
            yield self._captures
        finally:
            self._armed = False

    def check_complete(self, captures: Captures) -> None:
        missing = [t for t in self.taps if t.layer not in getattr(captures, t.kind)]
        if missing:
            raise RuntimeError(f"forward finished without firing taps {missing}")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __del__(self) -> None:  # hooks must not outlive the manager
        with contextlib.suppress(Exception):
            self.remove()
