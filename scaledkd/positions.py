"""How position information enters attention, for the families whose Q/K projections do not carry it.

Two kinds, declared per architecture in :class:`scaledkd.arch.Arch` (``positions``):

* ``rope`` (Llama, Qwen2, Mistral, Qwen3): the decoder computes ``(cos, sin)`` once per forward, each
  ``[B, L, d]``, and every attention module rotates its query and key heads with them before the dot product.
  The taps record what the attention module received, so the scores rebuilt here use the model's own positions
  (including any RoPE scaling, which is folded into cos/sin).
* ``bias`` (MPNet): the encoder computes a relative-position bias ``[B, H, L, L]`` once per forward and every
  attention module adds it to its scores; the taps record it and it is returned as the scores' additive bias.

Both are read from the attention module's call arguments by a pre-forward hook (:func:`call_argument`), never
from parameters, so they are correct under ZeRO-3.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1 | x2] -> [-x2 | x1]`` along the last dimension (the rotate-half RoPE layout of the Llama family)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate heads by their positions, as the Llama family's ``apply_rotary_pos_emb`` does (tested equal).

    Args:
        x: ``[B, H, L, d]`` query or key heads.
        cos, sin: ``[B, L, d]`` (or ``[1, L, d]``) as the model passed them to its attention module.

    Returns:
        ``[B, H, L, d]`` in float32.
    """
    cos = cos.float().unsqueeze(1)  # [B, 1, L, d]: one rotation shared by every head
    sin = sin.float().unsqueeze(1)
    x = x.float()
    return x * cos + rotate_half(x) * sin


def call_argument(module: nn.Module, name: str) -> Callable[[tuple, dict], Any]:
    """A reader of argument ``name`` of ``module``'s forward from a pre-hook's ``(args, kwargs)``.

    Families pass the positions either by keyword (Llama's decoder layer) or by position (MPNet's attention calls
    its self-attention positionally), so the position of the argument is looked up once in the signature.
    Returns None when the call did not pass it.
    """
    params = list(inspect.signature(module.forward).parameters)
    if name not in params:
        raise ValueError(f"{type(module).__name__}.forward has no argument {name!r} (it takes {params})")
    index = params.index(name)

    def read(args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        return args[index] if index < len(args) else None

    return read
