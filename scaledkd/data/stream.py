"""Causal-LM rows from a streamed, tokenised corpus (``data.streaming``), with a position a checkpoint records.

The rows follow the rules of :func:`scaledkd.data.lm.pack_documents` (packed: rows of exactly ``max_length``
tokens, ``position_ids`` restarting at every document and row, no prediction across a document; unpacked: one
truncated document per row), built on the fly: documents are read in stream order (a stream is not shuffled;
shuffle a corpus before streaming it) and the stream is read again from its start when it ends, so a rank never
runs dry and every rank yields as many rows as the run asks for.

Position: after each row, :meth:`StreamRows.state_dict` is the stream's own position (``datasets``'
``IterableDataset.state_dict``: shard and record), the pass over the stream, and the tokens of documents already
read that no row holds yet (a packed document spilling into the next row). Loading it continues with exactly the
rows an uninterrupted run would have produced next.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
from datasets.distributed import split_dataset_by_node

from scaledkd.data.base import DataError
from scaledkd.data.lm import _positions, scored_targets


class StreamRows:
    """Packed (or truncated) rows of a tokenised stream; iterate it for ``{input_ids, labels[, position_ids]}``
    rows of ``[L]`` ints, as :func:`~scaledkd.data.lm.pack_documents` makes them.

    Args:
        docs: a stream of tokenised documents (``input_ids``, ``scored``; :mod:`scaledkd.data.encode`), not yet
            iterated (its position now is where every pass starts).
        max_length: tokens per row.
        packing: pack documents into full rows; otherwise one document per row, truncated.
    """

    def __init__(self, docs: datasets.IterableDataset, max_length: int, packing: bool) -> None:
        self.docs = docs
        self.max_length = max_length
        self.packing = packing
        self._start = copy.deepcopy(docs.state_dict())  # the stream's beginning: every pass starts here
        self._position: dict[str, Any] = {"pass": 0, "stream": None, "carry": None}

    def shard(self, rank: int, world_size: int) -> StreamRows:
        """This rank's share of the stream (whole shards when they divide evenly, else every ``world_size``-th
        record; ``datasets.distributed.split_dataset_by_node``)."""
        if world_size == 1:
            return self
        return StreamRows(split_dataset_by_node(self.docs, rank, world_size), self.max_length, self.packing)

    def state_dict(self) -> dict[str, Any]:
        """Where the next row starts (JSON-serialisable)."""
        return copy.deepcopy(self._position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (taken from a stream of the same data, rank and world size)."""
        self._position = copy.deepcopy(state)

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        position = self._position
        carry = position["carry"] or {"input_ids": [], "labels": [], "starts": []}
        self._carry = list(carry["input_ids"]), list(carry["labels"]), list(carry["starts"])
        pass_, resume_at = position["pass"], position["stream"]
        yield from self._full_rows(pass_, resume_at)  # a long document read before the checkpoint
        while True:
            fresh = resume_at is None  # a whole pass, not the rest of one
            self.docs.load_state_dict(self._start if fresh else resume_at)
            resume_at = None
            read = 0
            for doc in self.docs:
                read += 1
                stream_state = copy.deepcopy(self.docs.state_dict())  # just after this document
                target = scored_targets(doc["input_ids"], doc["scored"]).tolist()
                if not self.packing:
                    self._mark(pass_, stream_state, None)
                    yield {"input_ids": doc["input_ids"][: self.max_length], "labels": target[: self.max_length]}
                    continue
                ids, labels, starts = self._carry
                self._carry = (ids + doc["input_ids"], labels + target,
                               starts + [1] + [0] * (len(doc["input_ids"]) - 1))
                yield from self._full_rows(pass_, stream_state)
            if read == 0 and fresh:
                raise DataError("data.streaming: this rank's share of the stream has no documents (fewer documents "
                                "or shards than ranks?); use a larger dataset or fewer ranks")
            pass_ += 1

    def _mark(self, pass_: int, stream: dict[str, Any], carry: dict[str, list[int]] | None) -> None:
        self._position = {"pass": pass_, "stream": stream, "carry": carry}

    def _full_rows(self, pass_: int, stream: dict[str, Any] | None) -> Iterator[dict[str, list[int]]]:
        """Every full row of the tokens read so far, each recorded with what is left after it."""
        n = self.max_length
        while len(self._carry[0]) >= n:
            ids, labels, starts = self._carry
            row_starts = np.asarray(starts[:n], dtype=bool)
            row_starts[0] = True  # every row starts a fresh context
            row = {"input_ids": ids[:n], "labels": labels[:n], "position_ids": _positions(row_starts).tolist()}
            self._carry = ids[n:], labels[n:], starts[n:]
            self._mark(pass_, stream, dict(zip(("input_ids", "labels", "starts"), self._carry, strict=True)))
            yield row
