"""Token ids and scored-token masks of ``data.dataset`` documents, through a ``datasets`` map cached on disk.

A document (columns from :mod:`scaledkd.data.sources`) becomes ``input_ids`` and ``scored``, where
``scored[i] = 1`` when token ``i`` is a target (the prediction at ``i - 1`` counts in the loss):

* ``text`` (and ``prompt``), no chat template: ``[bos] + prompt + text + [eos]`` exactly as for files
  (:func:`scaledkd.data.lm.encode_documents`): text and EOS scored, BOS and prompt not.
* chat (``messages``, or ``prompt``/``text`` with ``data.chat_template``): the conversation as the tokenizer's
  chat template renders it, special tokens included; the scored tokens are each assistant turn's content and its
  end-of-turn markup (what the model writes when it serves), the rest (system, user turns, the generation prompt
  that opens an assistant turn) is not. No BOS/EOS is added: the template writes what the model was trained on.
  Each part is tokenised on its own, as at serving time, when the prompt is tokenised and the answer generated.

Documents with no scored token (an empty response, a conversation without an assistant turn) are dropped.

The map's fingerprint is derived from the source dataset's fingerprint, the tokenizer's content (vocabulary,
merges, special tokens, chat template) and the document format, so a second run over the same data with the same
tokenizer reads the cached token ids instead of tokenising again (``datasets`` keeps them beside the source's
cache files, under ``data.dataset.cache_dir``). The packed rows are cached the same way (:func:`pack_tokenized`),
so a second run memory-maps its rows instead of building them in memory.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import datasets

from scaledkd.data.base import DataError
from scaledkd.data.lm import pack_documents, special_ids
from scaledkd.data.sources import column_names

ENCODING_VERSION = "scaledkd-lm-docs/1"  # bump when the encoding below changes, so old caches are not reused
STREAM_BATCH = 256  # documents tokenised at a time from a stream; a resume re-reads at most the one it stopped in


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides a tokenizer's output: its serialised model (fast tokenizers) or vocabulary, its
    special tokens and its chat template."""
    parts = [type(tokenizer).__name__, str(tokenizer.chat_template or ""),
             json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
             str(tokenizer.bos_token_id), str(tokenizer.eos_token_id)]
    backend = getattr(tokenizer, "backend_tokenizer", None)  # fast tokenizers serialise completely
    parts.append(backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def check_chat_template(tokenizer: Any, setting: str) -> None:
    """Raise a :class:`DataError` when ``tokenizer`` has no chat template (``setting`` asked for one)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"{setting} renders conversations with the tokenizer's chat template, but tokenizer "
                        f"{name!r} has none; use an instruct model's tokenizer or set its chat_template "
                        "(tokenizer_config.json)")


def chat_segments(messages: list[dict[str, Any]], tokenizer: Any) -> list[tuple[str, bool]]:
    """A conversation as ``(text, scored)`` pieces of its chat-template rendering; assistant turns are scored.

    The assistant turn ``i`` is the text between the rendering of the turns before it with the generation prompt
    and the rendering of the turns up to it: its content and end-of-turn markup.

    Raises:
        DataError: a message without string ``role``/``content``, or a template whose rendering of the first turns
            is not a prefix of the whole conversation's (the assistant text cannot then be located).
    """
    turns = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"chat message {m!r} must be a mapping with string 'role' and 'content' "
                            "(data.messages_column holds lists of {role, content})")
        turns.append({"role": m["role"], "content": m["content"]})

    def render(upto: int, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(turns[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    full = render(len(turns))
    pieces, done = [], 0
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        opened, closed = render(i, generation_prompt=True), render(i + 1)
        if not (full.startswith(closed) and closed.startswith(opened) and len(opened) >= done):
            raise DataError("the tokenizer's chat template does not render a conversation turn by turn (the first "
                            f"{i + 1} turns do not render as a prefix of the whole conversation), so its assistant "
                            "tokens cannot be located; use a template that only appends turns")
        pieces += [(full[done:len(opened)], False), (full[len(opened):len(closed)], True)]
        done = len(closed)
    pieces.append((full[done:], False))
    return [(text, scored) for text, scored in pieces if text]


def _encoder(tokenizer: Any, chat: bool) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    bos, eos = special_ids(tokenizer)

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if "messages" in batch:
            docs = [chat_segments(m or [], tokenizer) for m in batch["messages"]]
        elif chat:
            docs = [chat_segments([{"role": "user", "content": p}, {"role": "assistant", "content": t}], tokenizer)
                    for p, t in zip(batch["prompt"], batch["text"], strict=True)]
        else:
            prompts = batch.get("prompt") or [""] * len(batch["text"])
            docs = [[(p or "", False), (t if t and t.strip() else "", True)]  # blank texts are skipped, as for files
                    for p, t in zip(prompts, batch["text"], strict=True)]
        docs = [[(text, scored) for text, scored in doc if text] for doc in docs]  # "" adds no token
        texts = [text for doc in docs for text, _ in doc]
        encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        out: dict[str, list[Any]] = {"input_ids": [], "scored": []}
        for doc in docs:
            ids: list[int] = []
            scored: list[int] = []
            for _, is_scored in doc:
                piece = next(encoded)
                ids += piece
                scored += [int(is_scored)] * len(piece)
            if not chat:
                if not any(scored):
                    continue  # an empty text: nothing to learn, as for files
                head = [] if bos is None else [bos]
                ids, scored = head + ids + [eos], [0] * len(head) + scored + [1]
            if any(scored[1:]):  # the first token is never predicted
                out["input_ids"].append(ids)
                out["scored"].append(scored)
        return out

    return encode


def tokenize_documents(docs: datasets.Dataset | datasets.IterableDataset, tokenizer: Any, chat_template: bool
                       ) -> datasets.Dataset | datasets.IterableDataset:
    """``input_ids`` and ``scored`` of every document (see the module docstring); cached for a map-style dataset,
    tokenised on the fly for a stream.

    Args:
        docs: from :func:`scaledkd.data.sources.source_documents` (``text``, ``prompt``+``text`` or ``messages``).
        chat_template: render ``prompt``/``text`` records as a user and an assistant turn (``messages`` always are).

    Raises:
        DataError: chat data and a tokenizer without a chat template; a malformed message.
    """
    columns = column_names(docs)
    chat = chat_template or "messages" in columns
    if chat:
        check_chat_template(tokenizer, "data.messages_column" if "messages" in columns else "data.chat_template")
    encode = _encoder(tokenizer, chat)
    if isinstance(docs, datasets.IterableDataset):
        return docs.map(encode, batched=True, batch_size=STREAM_BATCH, remove_columns=columns)
    fingerprint = hashlib.sha256("\0".join(
        [ENCODING_VERSION, docs._fingerprint, tokenizer_fingerprint(tokenizer), str(chat)]).encode()).hexdigest()[:16]
    return docs.map(encode, batched=True, remove_columns=columns, new_fingerprint=fingerprint,
                    desc="tokenize documents")


def pack_tokenized(docs: datasets.Dataset, max_length: int, packing: bool, shuffle_seed: int | None,
                   drop_remainder: bool) -> datasets.Dataset:
    """:func:`~scaledkd.data.lm.pack_documents` over tokenised documents, as one cached ``datasets`` map: the same
    rows, written beside the token cache under a fingerprint of the tokens and the packing settings.

    Returns:
        Rows with ``input_ids``, ``labels`` (and, packed, ``position_ids``), ``[L]`` each.
    """
    settings = [ENCODING_VERSION, docs._fingerprint, str(max_length), str(packing), str(shuffle_seed),
                str(drop_remainder)]
    fingerprint = hashlib.sha256("\0".join(settings).encode()).hexdigest()[:16]

    def pack(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:  # the whole split is one batch
        rows = pack_documents(datasets.Dataset.from_dict(batch), None, max_length, packing, shuffle_seed,
                              drop_remainder)
        return rows.to_dict()

    return docs.map(pack, batched=True, batch_size=None, remove_columns=docs.column_names,
                    new_fingerprint=fingerprint, desc="pack rows")
