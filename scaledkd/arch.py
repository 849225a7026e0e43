"""Where things live inside each supported architecture, keyed on ``config.model_type``.

An :class:`Arch` names the block list, the Q/K/V projections, how positions reach the attention (rotary
``(cos, sin)`` or a relative-position bias, :mod:`scaledkd.positions`) and the config attributes that a student
builder needs. Nothing here reads parameters: module lookups only, so it is safe on ZeRO-3-partitioned models.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .registry import Registry


@dataclass(frozen=True)
class Arch:
    """Module paths of one architecture family.

    Attributes:
        blocks: path of the transformer block list, relative to ``model.base_model``.
        q, k, v: paths relative to one block of the modules whose outputs are the query/key/value as the attention
            uses them before positions are applied: the projections, or for Qwen3 the per-head ``q_norm``/``k_norm``
            that follow them (outputs ``[B, L, H, d]``, flattened by the taps).
        fused_qkv: path of a fused ``[q | k | v]`` projection (GPT-2's ``c_attn``) used instead of q/k/v.
        embeddings: path of the embedding module relative to ``model.base_model`` (mixup, embedding taps).
        causal: decoder (causal attention mask) or encoder.
        intermediate_attr: config attribute of the MLP width (differs between families).
        positions_after_padding: position ids start after the padding id (RoBERTa's convention), so a sequence
            may hold ``max_position_embeddings - pad_token_id - 1`` tokens.
        positions: what each attention module receives besides Q/K: ``rope`` (rotary ``(cos, sin)``, applied to
            Q and K), ``bias`` (an additive relative-position bias ``[B, H, L, L]``) or None (positions are already
            in the hidden states: learned absolute embeddings).
        attention: path relative to one block of the attention module that receives them, and ``position_arg``
            the name of that argument of its forward.
    """

    blocks: str
    q: str | None
    k: str | None
    v: str | None
    embeddings: str
    causal: bool
    fused_qkv: str | None = None
    intermediate_attr: str = "intermediate_size"
    positions_after_padding: bool = False
    positions: Literal["rope", "bias"] | None = None
    attention: str | None = None
    position_arg: str | None = None

    def __post_init__(self) -> None:
        if not (self.positions is None) == (self.attention is None) == (self.position_arg is None):
            raise ValueError(f"an Arch with positions={self.positions!r} needs attention and position_arg set together")


ARCHS: Registry[Arch] = Registry("architecture (config.model_type)")

_BERT = Arch(
    blocks="encoder.layer",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    embeddings="embeddings",
    causal=False,
)
for _name in ("bert", "electra"):
    ARCHS.register(_name)(_BERT)
for _name in ("roberta", "xlm-roberta", "camembert"):
    ARCHS.register(_name)(dataclasses.replace(_BERT, positions_after_padding=True))
ARCHS.register("distilbert")(
    Arch(
        blocks="transformer.layer",
        q="attention.q_lin",
        k="attention.k_lin",
        v="attention.v_lin",
        embeddings="embeddings",
        causal=False,
        intermediate_attr="hidden_dim",
    )
)
ARCHS.register("gpt2")(
    Arch(blocks="h", q=None, k=None, v=None, fused_qkv="attn.c_attn", embeddings="wte", causal=True,
         intermediate_attr="n_inner")
)
_LLAMA = Arch(
    blocks="layers",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    embeddings="embed_tokens",
    causal=True,
    positions="rope",
    attention="self_attn",
    position_arg="position_embeddings",
)
for _name in ("llama", "qwen2", "mistral"):
    ARCHS.register(_name)(_LLAMA)
# Qwen3 RMS-normalises each query/key head before the rotation; the norms' outputs are what attention uses.
ARCHS.register("qwen3")(dataclasses.replace(_LLAMA, q="self_attn.q_norm", k="self_attn.k_norm"))
# MPNet: BERT-like blocks, RoBERTa-like position ids (padding id 1), plus a relative-position bias that the
# encoder computes once and hands to every layer's attention.
ARCHS.register("mpnet")(
    Arch(
        blocks="encoder.layer",
        q="attention.attn.q",
        k="attention.attn.k",
        v="attention.attn.v",
        embeddings="embeddings",
        causal=False,
        positions_after_padding=True,
        positions="bias",
        attention="attention.attn",
        position_arg="position_bias",
    )
)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DeepSpeed/Accelerate/DDP wrappers (they all keep it in ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def arch_of(model_or_config) -> Arch:
    config = getattr(model_or_config, "config", model_or_config)
    return ARCHS.get(config.model_type)


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, in order (block i of the papers is ``blocks(model)[i - 1]``)."""
    model = unwrap(model)
    return _get(model.base_model, arch_of(model).blocks)


def num_blocks(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    return int(config.num_hidden_layers)


def embeddings(model: nn.Module) -> nn.Module:
    model = unwrap(model)
    return _get(model.base_model, arch_of(model).embeddings)


def position_limit(config) -> int | None:
    """The most tokens one sequence may hold (``max_position_embeddings``, less RoBERTa's padding offset), or
    None when the architecture has no learned/declared limit."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None:
        return None
    if arch_of(config).positions_after_padding:
        limit -= int(getattr(config, "pad_token_id", 0) or 0) + 1
    return int(limit)


def attention_geometry(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head dim) of a config; GQA models have fewer key/value heads."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv_heads, head_dim


def qkv_modules(model: nn.Module, block_index: int) -> dict[str, nn.Module]:
    """Projection modules of 1-based block ``block_index``: ``{"q": m, "k": m, "v": m}`` or ``{"qkv": m}``."""
    arch = arch_of(unwrap(model))
    block = blocks(model)[block_index - 1]
    if arch.fused_qkv:
        return {"qkv": _get(block, arch.fused_qkv)}
    return {"q": _get(block, arch.q), "k": _get(block, arch.k), "v": _get(block, arch.v)}


def attention_module(model: nn.Module, block_index: int) -> nn.Module:
    """The attention module of 1-based block ``block_index`` that receives the positions (``Arch.attention``)."""
    model = unwrap(model)
    arch = arch_of(model)
    if arch.attention is None:
        raise ValueError(f"{model.config.model_type} passes no positions to its attention modules")
    return _get(blocks(model)[block_index - 1], arch.attention)


def is_causal(model_or_config) -> bool:
    return arch_of(model_or_config).causal


def split_fused_qkv(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPT-2's ``c_attn`` output ``[B, L, 3D]`` -> q, k, v each ``[B, L, D]``."""
    return out.chunk(3, dim=-1)
