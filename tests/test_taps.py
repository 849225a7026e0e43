"""The layer-tap manager against the models' own outputs, gradients, capture windows and activation checkpointing."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.conftest import make_batch, tiny_model
from scaledkd import arch
from scaledkd.taps import Captures, Tap, TapManager

ALL_KINDS = ("hidden", "q", "k", "v")


def all_taps(model, kinds=ALL_KINDS) -> set[Tap]:
    n = arch.num_blocks(model)
    taps = set()
    for kind in kinds:
        taps |= {Tap(kind, i) for i in range(0 if kind == "hidden" else 1, n + 1)}
    return taps


def forward(model, batch, **kw):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)


def final_norm(model) -> nn.Module:
    """The norm a decoder applies after its last block (part of its last ``hidden_states`` entry)."""
    base = model.base_model
    return base.ln_f if model.config.model_type == "gpt2" else base.norm


# ---------------------------------------------------------------------------------------------- hidden states


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "gpt2", "llama", "qwen2", "mistral"])
def test_hidden_taps_equal_models_hidden_states(model_type, batch):
    model = tiny_model(model_type, layers=3)
    n = arch.num_blocks(model)
    taps = TapManager(model, {Tap("hidden", i) for i in range(n + 1)}, detach=True)
    with torch.no_grad(), taps.capture() as cap:
        out = forward(model, batch, output_hidden_states=True)
    taps.check_complete(cap)
    assert len(out.hidden_states) == n + 1 and len(cap.hidden) == n + 1
    # Layer 0 = embedding output, layer i = output of block i.
    for i in range(n):
        torch.testing.assert_close(cap.hidden[i], out.hidden_states[i], rtol=0, atol=0, msg=f"layer {i}")
    if arch.is_causal(model):
        # A decoder's last hidden_states entry has the final norm applied; the tap on the last block does not
        # (ENVIRONMENT.md). Applying that norm to the tap must give the model's entry exactly.
        assert not torch.allclose(cap.hidden[n], out.hidden_states[n])
        with torch.no_grad():
            torch.testing.assert_close(final_norm(model)(cap.hidden[n]), out.hidden_states[n])
    else:
        torch.testing.assert_close(cap.hidden[n], out.hidden_states[n], rtol=0, atol=0)


def test_embedding_tap_sees_inputs_embeds(batch):
    """Layer 0 is the first block's input, so it also works when the caller passes embeddings (mixup)."""
    model = tiny_model("bert", layers=2)
    emb = model.bert.embeddings(input_ids=batch["input_ids"]).detach() * 1.5
    taps = TapManager(model, {Tap("hidden", 0)}, detach=True)
    with torch.no_grad(), taps.capture() as cap:
        out = model(inputs_embeds=emb, attention_mask=batch["attention_mask"], output_hidden_states=True)
    torch.testing.assert_close(cap.hidden[0], out.hidden_states[0])


# ------------------------------------------------------------------------------------------------------ Q/K/V


def _qkv_by_hand(model, hidden_in: torch.Tensor, layer: int) -> dict[str, torch.Tensor]:
    """The projections of block ``layer`` recomputed from its input with the modules' weights, by hand."""
    block = arch.blocks(model)[layer - 1]
    mt = model.config.model_type
    if mt == "bert":
        att = block.attention.self
        lins = {"q": att.query, "k": att.key, "v": att.value}
        x = hidden_in
    elif mt == "distilbert":
        att = block.attention
        lins = {"q": att.q_lin, "k": att.k_lin, "v": att.v_lin}
        x = hidden_in
    elif mt == "gpt2":
        # Conv1D: x @ W + b with W [D, 3D]; split the fused [q | k | v] output by hand.
        x = block.ln_1(hidden_in)
        fused = x @ block.attn.c_attn.weight + block.attn.c_attn.bias
        d = model.config.hidden_size
        return {"q": fused[..., :d], "k": fused[..., d:2 * d], "v": fused[..., 2 * d:]}
    else:  # llama family: projections of the pre-attention RMSNorm output, before the rotary embedding
        att = block.self_attn
        lins = {"q": att.q_proj, "k": att.k_proj, "v": att.v_proj}
        x = block.input_layernorm(hidden_in)
    return {k: torch.nn.functional.linear(x, lin.weight, lin.bias) for k, lin in lins.items()}


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "gpt2", "llama"])
def test_qkv_taps_equal_projection_outputs(model_type, batch):
    model = tiny_model(model_type, layers=3)
    n = arch.num_blocks(model)
    taps = TapManager(model, all_taps(model, ("q", "k", "v")), detach=True)
    with torch.no_grad(), taps.capture() as cap:
        out = forward(model, batch, output_hidden_states=True)
        for layer in range(1, n + 1):
            expected = _qkv_by_hand(model, out.hidden_states[layer - 1], layer)
            for kind in "qkv":
                torch.testing.assert_close(getattr(cap, kind)[layer], expected[kind], msg=f"{kind}{layer}")
    heads, kv_heads, head_dim = arch.attention_geometry(model.config)
    assert cap.q[1].shape == (*batch["input_ids"].shape, heads * head_dim)
    assert cap.k[1].shape == (*batch["input_ids"].shape, kv_heads * head_dim)
    if model_type == "llama":
        assert kv_heads < heads  # the fixture really is GQA, so the k/v width check above means something


def test_fused_qkv_tap_records_only_requested_kinds(batch):
    model = tiny_model("gpt2", layers=2)
    taps = TapManager(model, {Tap("v", 2)}, detach=True)
    with torch.no_grad(), taps.capture() as cap:
        forward(model, batch)
    assert set(cap.v) == {2} and not cap.q and not cap.k and not cap.hidden
    assert cap.get(Tap("v", 2)).shape[-1] == model.config.hidden_size
    with pytest.raises(KeyError, match="not captured"):
        cap.get(Tap("q", 2))


# ------------------------------------------------------------------------------------------------- gradients


def test_student_captures_carry_gradients(batch):
    model = tiny_model("bert", layers=2)
    model.train()
    taps = TapManager(model, {Tap("hidden", 2), Tap("v", 1)}, detach=False)
    with taps.capture() as cap:
        forward(model, batch)
    assert cap.hidden[2].requires_grad and cap.v[1].requires_grad
    cap.hidden[2].pow(2).sum().backward(retain_graph=True)
    block2 = arch.blocks(model)[1]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block2.parameters())
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    cap.v[1].sum().backward()
    value = arch.blocks(model)[0].attention.self.value
    assert value.weight.grad is not None and value.weight.grad.abs().sum() > 0


def test_teacher_captures_are_detached(batch):
    model = tiny_model("bert", layers=2)  # parameters still require grad: only detach=True protects them
    taps = TapManager(model, all_taps(model), detach=True)
    with taps.capture() as cap:
        forward(model, batch)
    assert len(cap) == 3 + 2 * 3
    for table in (cap.hidden, cap.q, cap.k, cap.v):
        for value in table.values():
            assert not value.requires_grad and value.grad_fn is None


# ---------------------------------------------------------------------------------------- capture window


def test_captures_only_inside_capture_window(batch):
    model = tiny_model("bert", layers=2)
    taps = TapManager(model, {Tap("hidden", 1), Tap("q", 2)}, detach=True)
    with torch.no_grad():
        forward(model, batch)  # before any window: records nothing
        with taps.capture() as empty:
            pass
        assert len(empty) == 0
        with pytest.raises(RuntimeError, match="without firing"):
            taps.check_complete(empty)

        with taps.capture() as cap:
            forward(model, batch)
        taps.check_complete(cap)
        first = cap.hidden[1].clone()
        other = make_batch(seed=7)
        forward(model, other)  # after the window closed: must not overwrite the step's captures
    assert len(cap) == 2
    torch.testing.assert_close(cap.hidden[1], first, rtol=0, atol=0)


def test_new_capture_clears_previous_step(batch):
    model = tiny_model("bert", layers=2)
    taps = TapManager(model, {Tap("hidden", 1), Tap("hidden", 2)}, detach=True)
    with torch.no_grad():
        with taps.capture() as first:
            forward(model, batch)
        kept = {k: v.clone() for k, v in first.hidden.items()}
        with taps.capture() as second:
            assert len(second) == 0  # a fresh window starts empty
            forward(model, make_batch(seed=5))
    assert second is not first
    for layer in (1, 2):  # the previous step's captures are its own, not overwritten by the next step
        torch.testing.assert_close(first.hidden[layer], kept[layer], rtol=0, atol=0)
        assert not torch.equal(second.hidden[layer], first.hidden[layer])


def test_remove_detaches_hooks(batch):
    model = tiny_model("bert", layers=2)
    taps = TapManager(model, {Tap("hidden", 1), Tap("k", 1)}, detach=True)
    taps.remove()
    with torch.no_grad(), taps.capture() as cap:
        forward(model, batch)
    assert len(cap) == 0


@pytest.mark.parametrize(
    "tap, valid", [(Tap("hidden", 5), "0..4"), (Tap("hidden", -1), "0..4"), (Tap("q", 0), "1..4"), (Tap("v", 5), "1..4")]
)
def test_out_of_range_layer(tap, valid):
    model = tiny_model("bert", layers=4)
    with pytest.raises(ValueError, match=rf"layer {tap.layer} is out of range.*valid layers: {valid}"):
        TapManager(model, {tap}, detach=False)


def test_captures_len_and_get():
    c = Captures(hidden={0: torch.zeros(1)}, q={1: torch.zeros(1)})
    assert len(c) == 2
    assert c.get(Tap("q", 1)) is c.q[1]
    with pytest.raises(KeyError, match=r"captured hidden: \[0\]"):
        c.get(Tap("hidden", 3))


# ------------------------------------------------------------------------------------ activation checkpointing


def _loss_on(cap: Captures) -> torch.Tensor:
    total = 0.0
    for table in (cap.hidden, cap.q, cap.k, cap.v):
        for value in table.values():
            total = total + value.pow(2).mean()
    return total


def _count_projection_forwards(model) -> list[int]:
    """Forwards of each block's first attention projection (a recompute in backward runs them again; the
    block's own forward hook is not a reliable counter because non-reentrant checkpointing stops early)."""
    calls = [0]
    for layer in range(1, arch.num_blocks(model) + 1):
        first = next(iter(arch.qkv_modules(model, layer).values()))
        first.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_activation_checkpointing_keeps_captures_and_gradients(model_type, batch):
    plain = tiny_model(model_type, layers=3)  # dropout probabilities are 0 in every tiny config
    ckpt = copy.deepcopy(plain)
    plain.train()
    ckpt.train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ckpt.is_gradient_checkpointing

    results = []
    for model in (plain, ckpt):
        calls = _count_projection_forwards(model)
        taps = TapManager(model, all_taps(model), detach=False)
        with taps.capture() as cap:
            forward(model, batch)
        taps.check_complete(cap)
        n_after_forward = len(cap)
        snapshot = {(kind, layer): (t, t.detach().clone()) for kind in ALL_KINDS
                    for layer, t in getattr(cap, kind).items()}
        forwards_before_backward = calls[0]
        _loss_on(cap).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((cap, n_after_forward, snapshot, forwards_before_backward, calls[0], grads))

    (cap_p, n_p, snap_p, fb_p, fa_p, grads_p), (cap_c, n_c, snap_c, fb_c, fa_c, grads_c) = results
    n = arch.num_blocks(plain)
    assert n_p == n_c == (n + 1) + 3 * n
    # Checkpointing really recomputed the blocks in backward (else this test would prove nothing) ...
    assert fa_p == fb_p == n and fb_c == n and fa_c > fb_c
    # ... and the recompute neither added nor replaced a capture.
    assert len(cap_c) == n_c
    for (kind, layer), (tensor, value) in snap_c.items():
        assert getattr(cap_c, kind)[layer] is tensor
        torch.testing.assert_close(tensor.detach(), value, rtol=0, atol=0)
        torch.testing.assert_close(value, snap_p[kind, layer][1], rtol=0, atol=0)
    assert grads_p.keys() == grads_c.keys() and len(grads_p) > 0
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------------------ every family


def test_every_family_fires_every_tap(any_model, batch):
    """All taps of every supported family fire in one forward, with the shapes the losses expect."""
    model = any_model
    taps = TapManager(model, all_taps(model), detach=True)
    with torch.no_grad(), taps.capture() as cap:
        forward(model, batch)
    taps.check_complete(cap)
    heads, kv_heads, head_dim = arch.attention_geometry(model.config)
    B, L = batch["input_ids"].shape
    n = arch.num_blocks(model)
    assert len(cap) == (n + 1) + 3 * n
    assert all(h.shape == (B, L, model.config.hidden_size) for h in cap.hidden.values())
    assert all(q.shape == (B, L, heads * head_dim) for q in cap.q.values())
    assert all(t.shape == (B, L, kv_heads * head_dim) for t in (*cap.k.values(), *cap.v.values()))


def test_taps_resolve_through_wrappers(batch):
    """DeepSpeed/DDP keep the model in ``.module``; taps hook the inner model and fire through the wrapper."""

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kw):
            return self.module(**kw)

    model = tiny_model("bert", layers=2)
    wrapped = Wrapper(Wrapper(model))
    taps = TapManager(wrapped, {Tap("hidden", 2), Tap("k", 1)}, detach=True)
    assert taps.model is model
    with torch.no_grad(), taps.capture() as cap:
        out = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    torch.testing.assert_close(cap.hidden[2], out.hidden_states[2], rtol=0, atol=0)
    assert set(cap.k) == {1}
