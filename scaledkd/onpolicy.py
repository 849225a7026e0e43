"""On-policy distillation and sequence-level KD for causal-LM students (docs/methods.md#on-policy-distillation).

On-policy (GKD, Agarwal et al. 2024): :class:`OnPolicy` is a batch transformation that runs before the one
training step (:func:`~scaledkd.engine.step.distill_step`). It replaces a share lambda (``data.on_policy.fraction``)
of a micro-batch's rows by ``prompt + continuation``, the continuation sampled by the student's current weights
(batched, with a KV cache). The step then runs unchanged on the mixed batch: the teacher scores the very tokens the
student generated and the losses read them through ``loss_mask``, which on a generated row covers the predictions
of the generated tokens only (the prompt is context). A generated row has no ground-truth labels (``labels`` is
-100 throughout), so a hard-label term (``lm_task``) counts the data's rows only.

Sequence-level KD (Kim & Rush 2016): :func:`write_teacher_continuations` writes the teacher's continuations of a
recipe's training prompts once, as JSON lines ``{"prompt", "response"}`` (``scaledkd generate``), which then train
like any other ``[prompt, response]`` data.

Generation under ZeRO-3: the student's parameters are shards outside the engine's forward. Either they are
gathered once for the whole generation (DeepSpeed's ``unwrap_model_for_generation``, which also lifts the
engine's per-module fetch/release hooks meanwhile), or the hooks gather each block at every forward step, which is
a collective: then every rank runs the same number of forward steps (``synced_gpus``), however early its own
continuations end.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .config import OnPolicyConfig
from .data.lm import IGNORE_INDEX, special_ids

log = logging.getLogger("scaledkd")

BATCH_KEYS = frozenset({"input_ids", "labels", "loss_mask", "attention_mask", "position_ids"})


# ------------------------------------------------------------------------------------------ generation


def generate_continuations(model: torch.nn.Module, prompts: list[list[int]], *, max_new_tokens: int,
                           temperature: float, eos_id: int, pad_id: int, seed: int,
                           synced_gpus: bool = False) -> list[list[int]]:
    """Sampled (or greedy, ``temperature == 0``) continuations of ``prompts`` by a causal LM, in one batch.

    Prompts are left-padded into ``[N, P]`` (positions follow the attention mask, so each prompt sees the
    positions it would see alone) and ``generate`` runs with a KV cache. Sampling draws from the full softmax at
    ``temperature`` (no top-k/top-p), from a generator seeded by ``seed`` and isolated from the global RNG stream.

    Args:
        model: a Hugging Face causal LM, on the device its inputs should go to.
        prompts: token ids of each prompt (each non-empty).
        max_new_tokens: tokens generated per prompt at most.
        temperature: sampling temperature; 0 = greedy.
        eos_id, pad_id: the end-of-document token (a continuation stops after it) and the padding id.
        seed: the sampling seed.
        synced_gpus: keep forwarding until every rank finished (needed while forwards are collectives).

    Returns:
        Per prompt, its generated ids: up to and including the first EOS, else ``max_new_tokens`` ids.
    """
    from transformers import GenerationConfig

    if not prompts or any(not p for p in prompts):
        raise ValueError("generate_continuations needs at least one prompt, and no empty prompt")
    if temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 = greedy)")
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention_mask[i, width - len(p):] = 1
    sampling = {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0} \
        if temperature > 0 else {"do_sample": False}
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
                                  use_cache=True, **sampling)
    was_training = model.training
    model.eval()  # no dropout while sampling; gradient checkpointing (train mode only) would refuse the cache
    fork = [device] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=fork):
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=gen_config, synced_gpus=synced_gpus)
    finally:
        model.train(was_training)
    continuations = []
    for row in out[:, width:].tolist():
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        continuations.append(row[:end])
    return continuations


@contextlib.contextmanager
def generation_weights(engine, gather_zero3: bool = True) -> Iterator[bool]:
    """The student engine's weights made usable for ``generate``; yields whether ranks must forward in step.

    Below ZeRO-3 the weights are whole on every rank already. Under ZeRO-3 with ``gather_zero3`` they are
    gathered once (DeepSpeed's ``unwrap_model_for_generation``: no collective inside the generation); without it
    the engine's hooks gather block by block at every forward, so ranks must keep forwarding together.
    """
    if engine.zero_optimization_stage() != 3:
        yield False
        return
    if not gather_zero3:
        yield torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        return
    from deepspeed.runtime.zero import unwrap_model_for_generation

    with unwrap_model_for_generation(engine):
        yield False


# ------------------------------------------------------------------------------------------ batch rows


def prompt_span(input_ids: list[int], loss_mask: list[bool], positions: list[int], length: int, eos_id: int,
                prefix_tokens: int, max_prompt: int) -> tuple[int, int]:
    """Where a batch row's prompt lies: ``(start, end)`` token indices.

    The row's first document segment (a segment starts where the position ids restart at 0; an unpacked row is
    one segment) that has a token before its end-of-document EOS gives the prompt. When that segment opens with
    unscored tokens (a ``[prompt, response]`` record: BOS and the prompt), the prompt is exactly those tokens plus
    the last of them, which predicts the first response token; otherwise (plain text, or a packed row starting
    inside a document) it is the segment's first ``prefix_tokens`` tokens. Either way it stops before the
    segment's EOS and is at most ``max_prompt`` tokens long.

    Args:
        input_ids, loss_mask, positions: the row, ``[L]`` each (``positions`` = 0..L-1 for unpacked rows).
        length: its real tokens (the rest is padding).
    """
    starts = [i for i in range(length) if i == 0 or positions[i] == 0]
    for s, e in zip(starts, [*starts[1:], length], strict=True):
        if input_ids[e - 1] == eos_id:
            e -= 1  # a continuation never starts after the end of its document
        if e <= s:
            continue
        scored = next((i for i in range(s, e) if loss_mask[i]), None)
        head = scored - s + 1 if scored is not None and scored > s else prefix_tokens
        return s, s + max(1, min(head, e - s, max_prompt))
    return 0, 1


def splice_rows(batch: Mapping[str, torch.Tensor], rows: list[int], sequences: list[list[int]],
                prompt_lengths: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """``batch`` with each row in ``rows`` replaced by ``sequences[k]`` = prompt + generated ids.

    A replaced row holds its sequence followed by padding (and -1 in any per-row ``[B]`` id such as
    ``example_ids``: it comes from no example of the data); ``loss_mask`` is set on the positions that predict a
    generated token (``prompt_lengths[k] - 1`` up to the second-to-last token), ``labels`` are -100 (sampled tokens
    are not ground truth). The batch keeps its layout: packed rows (``position_ids``, no attention mask) get
    positions 0.. for the sequence and a separate padding document after it, as the collator pads; unpacked rows
    get an attention mask. The width grows when a sequence is longer than the batch; the other rows are padded.

    Args:
        batch: a causal-LM batch (``input_ids``, ``labels``, ``loss_mask`` and ``position_ids`` or
            ``attention_mask``, all ``[B, L]``).
        rows: batch rows to replace; sequences, prompt_lengths: per replaced row.

    Returns:
        The new batch, ``[B, W]`` with ``W = max(L, longest sequence)``; tensors are new, ``batch`` is untouched.
    """
    n_rows = batch["input_ids"].shape[0]
    per_row = {k for k, v in batch.items() if k not in BATCH_KEYS and torch.is_tensor(v) and v.shape == (n_rows,)}
    extra = set(batch) - BATCH_KEYS - per_row
    if extra:
        raise ValueError(f"on-policy rows cannot be spliced into a batch with keys {sorted(extra)} "
                         f"(a causal-LM batch has {sorted(BATCH_KEYS)} and per-row [B] ids)")
    packed = "attention_mask" not in batch
    old_width = batch["input_ids"].shape[1]
    width = max([old_width, *map(len, sequences)])
    grow = width - old_width
    device = batch["input_ids"].device

    def widen(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, grow), value=value) if grow else t.clone()

    out = {"input_ids": widen(batch["input_ids"], pad_id), "labels": widen(batch["labels"], IGNORE_INDEX),
           "loss_mask": widen(batch["loss_mask"], False)}
    if packed:
        pos = batch["position_ids"]
        out["position_ids"] = torch.cat([pos, torch.arange(grow, device=device).expand(len(pos), grow)], dim=1) \
            if grow else pos.clone()  # the added columns: a padding document of their own, as the collator does
    else:
        out["attention_mask"] = widen(batch["attention_mask"], 0)
    for key in per_row:  # e.g. example_ids: a generated row comes from no example of the data
        out[key] = batch[key].clone()
        out[key][rows] = -1
    for r, seq, plen in zip(rows, sequences, prompt_lengths, strict=True):
        n = len(seq)
        out["input_ids"][r] = pad_id
        out["input_ids"][r, :n] = torch.tensor(seq, device=device)
        out["labels"][r] = IGNORE_INDEX
        out["loss_mask"][r] = False
        out["loss_mask"][r, plen - 1: n - 1] = True
        if packed:
            out["position_ids"][r, :n] = torch.arange(n, device=device)
            out["position_ids"][r, n:] = torch.arange(width - n, device=device)
        else:
            out["attention_mask"][r] = 0
            out["attention_mask"][r, :n] = 1
    return out


def rows_this_micro(fraction: float, batch_size: int, micro: int) -> int:
    """Rows to generate in micro-batch ``micro``: ``floor((micro+1)*f*B) - floor(micro*f*B)``, so any run of
    micro-batches generates lambda of its rows up to one row, and every rank (same micro index) the same number."""
    return int((micro + 1) * fraction * batch_size + 1e-9) - int(micro * fraction * batch_size + 1e-9)


# ------------------------------------------------------------------------------------------ the transformation


class OnPolicy:
    """``data.on_policy``: replaces a share of each training micro-batch by the student's own continuations.

    ``on_policy(batch, micro)`` returns ``batch`` itself when no row is due (so lambda = 0 is the plain path),
    else a new batch (:func:`splice_rows`) whose first rows are prompt + student continuation. The sampling seed
    is a function of ``(train.seed, micro, rank)``: a resumed run samples the same continuations.

    Args:
        cfg: ``data.on_policy``.
        engine: the student's DeepSpeed engine (``engine.module.student`` generates).
        tokenizer: gives the EOS and padding ids.
        max_length: ``data.max_length``: prompt + continuation stays within it.
        seed: ``train.seed``.
    """

    def __init__(self, cfg: OnPolicyConfig, engine, tokenizer: Any, max_length: int, seed: int) -> None:
        self.cfg = cfg
        self.engine = engine
        self.eos_id = special_ids(tokenizer)[1]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.max_prompt = max_length - cfg.max_new_tokens
        self.seed = seed
        self._seconds = 0.0
        self._rows = 0
        self._tokens = 0

    def __call__(self, batch: Mapping[str, torch.Tensor], micro: int) -> Mapping[str, torch.Tensor]:
        n = rows_this_micro(self.cfg.fraction, batch["input_ids"].shape[0], micro)
        if n == 0:
            return batch
        tic = time.perf_counter()
        ids, mask = batch["input_ids"].tolist(), batch["loss_mask"].tolist()
        width = len(ids[0])
        positions = batch["position_ids"].tolist() if "position_ids" in batch else [list(range(width))] * len(ids)
        lengths = batch["attention_mask"].sum(1).tolist() if "attention_mask" in batch else [width] * len(ids)
        rows = list(range(n))
        prompts = []
        for r in rows:
            s, e = prompt_span(ids[r], mask[r], positions[r], int(lengths[r]), self.eos_id, self.cfg.prefix_tokens,
                               self.max_prompt)
            prompts.append(ids[r][s:e])
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        seed = ((self.seed * 1_000_003 + micro) * 1_009 + rank) % 2**31
        with generation_weights(self.engine, self.cfg.gather_zero3) as synced:
            continuations = generate_continuations(
                self.engine.module.student, prompts, max_new_tokens=self.cfg.max_new_tokens,
                temperature=self.cfg.temperature, eos_id=self.eos_id, pad_id=self.pad_id, seed=seed,
                synced_gpus=synced)
        out = splice_rows(batch, rows, [p + c for p, c in zip(prompts, continuations, strict=True)],
                          [len(p) for p in prompts], self.pad_id)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._seconds += time.perf_counter() - tic
        self._rows += n
        self._tokens += sum(map(len, continuations))
        return out

    def take(self, steps: int) -> dict[str, float]:
        """Close a logging window of ``steps`` optimiser steps: generation milliseconds per step and the mean
        generated tokens per continuation; then reset."""
        out = {"ms_generate": 1e3 * self._seconds / max(1, steps),
               "generated_tokens": self._tokens / self._rows if self._rows else 0.0}
        self._seconds, self._rows, self._tokens = 0.0, 0, 0
        return out


# ------------------------------------------------------------------------------------------ sequence-level KD


def document_prompts(docs, tokenizer: Any, prefix_tokens: int) -> list[tuple[str, list[int]]]:
    """The prompt of each document of :func:`~scaledkd.data.lm.load_documents`: its own ``prompt`` when it has
    one, else the opening ``prefix_tokens`` tokens of its text; as ``(prompt text, [bos] + prompt ids)``."""
    bos, _ = special_ids(tokenizer)
    head = [] if bos is None else [bos]
    out = []
    for prompt, text in zip(docs["prompt"], docs["text"], strict=True):
        if prompt:
            out.append((prompt, head + tokenizer(prompt, add_special_tokens=False)["input_ids"]))
        else:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:prefix_tokens]
            out.append((tokenizer.decode(ids), head + ids))
    return out


def write_teacher_continuations(cfg, out: str | Path, *, max_new_tokens: int = 64, temperature: float = 0.0,
                                prefix_tokens: int = 8, batch_size: int = 16, max_samples: int | None = None,
                                seed: int | None = None) -> dict[str, Any]:
    """``scaledkd generate``: the teacher's continuations of the recipe's training prompts, as JSON lines.

    Each record is ``{"prompt": text, "response": text}``; a run then trains on the file with ``data.task: lm``,
    ``data.train_file: FILE`` and ``data.text_columns: [prompt, response]`` (loss on the response only). One
    process, on the GPU when there is one; the teacher is loaded whole.

    Args:
        cfg: the recipe (its ``teacher.path`` and ``data`` section give the model and the prompts).
        out: the JSON-lines file to write.
        max_new_tokens, temperature: generation settings (temperature 0 = greedy, the classic sequence-level KD).
        prefix_tokens: the prompt of a plain-text document: its opening tokens.
        batch_size: prompts generated together.
        max_samples: a subset of the training documents drawn with ``train.seed`` (default: all).
        seed: the sampling seed (default ``train.seed``; greedy generation ignores it).

    Returns:
        A summary: the file, the number of records, how many ended with EOS, and seconds.
    """
    import dataclasses

    from . import models
    from .build import resolve

    if temperature < 0:
        raise ValueError(f"--temperature={temperature!r} must be >= 0 (0 = greedy)")
    if cfg.teacher is None:
        raise ValueError("scaledkd generate writes the teacher's continuations, but the recipe has no teacher")
    if cfg.data.task != "lm":
        raise ValueError("scaledkd generate needs a causal-LM recipe (data.task='lm'), not "
                         f"data.task={cfg.data.task!r}")
    seed = cfg.train.seed if seed is None else seed
    if max_samples:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_train_samples=max_samples))
    plan = resolve(cfg, check_output=False)  # the recipe's own checks; its teacher path and training documents
    docs = plan.examples["train"]
    tokenizer = models.load_tokenizer(plan.teacher_path)
    _, eos = special_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = models.freeze(models.load_pretrained(plan.teacher_path, "causal_lm")).to(device)
    prompts = document_prompts(docs, tokenizer, prefix_tokens)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tic, finished = time.perf_counter(), 0
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            conts = generate_continuations(teacher, [ids for _, ids in chunk], max_new_tokens=max_new_tokens,
                                           temperature=temperature, eos_id=eos, pad_id=pad, seed=seed + i)
            for (text, _), cont in zip(chunk, conts, strict=True):
                finished += bool(cont) and cont[-1] == eos
                response = tokenizer.decode(cont, skip_special_tokens=True)
                f.write(json.dumps({"prompt": text, "response": response}, ensure_ascii=False) + "\n")
    tmp.replace(out)  # a file that exists is complete
    summary = {"file": str(out), "records": len(prompts), "ended_with_eos": finished,
               "seconds": round(time.perf_counter() - tic, 2), "teacher": plan.teacher_path}
    log.info("generate: %d teacher continuations written to %s", len(prompts), out)
    return summary
