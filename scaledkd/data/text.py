"""Plain-text corpora (task-agnostic distillation, supplementary ILD data): files and the built-in Python docs."""
from __future__ import annotations

import math
import re
from pathlib import Path

from scaledkd.data.base import DataError, not_utf8

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("python-docs",)

MIN_CHARS = 20  # shorter units are merged into the next one (or dropped at the end of the corpus)
CHUNK_WORDS = 64  # ~80-100 word pieces: a chunk fits max_length 128 with room to spare

_UNDERLINE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$")
_CODE_CHARS = set("()[]{}<>=_*|\\/@#$%^&~+;:`")
_ADMONITIONS = ("note:", "warning:", "see also:", "important:", "tip:", "caution:", "attention:")


def corpus_examples(text: str) -> list[str]:
    """Split a corpus into examples.

    A corpus with blank lines is read as paragraphs (the lines of a paragraph joined); one without is read a line at
    a time (one sentence per line, as in PTB). Whitespace is normalised, units shorter than ``MIN_CHARS`` characters
    are merged into the following unit (a heading or a speaker name joins its text) or dropped at the end, and units
    longer than ``CHUNK_WORDS`` words are split into near-equal chunks of at most that many words. Exact duplicates
    are kept once, so a held-out share never repeats a training example.

    Args:
        text: the whole corpus.

    Returns:
        The examples, in corpus order.
    """
    lines = text.splitlines()
    if any(not line.strip() for line in lines):
        units, current = [], []
        for line in lines:
            if line.strip():
                current.append(line)
            elif current:
                units.append(" ".join(current))
                current = []
        if current:
            units.append(" ".join(current))
    else:
        units = lines

    examples: dict[str, None] = {}  # ordered set
    pending = ""
    for unit in units:
        unit = " ".join(unit.split())
        if not unit:
            continue
        unit = f"{pending} {unit}" if pending else unit
        if len(unit) < MIN_CHARS:
            pending = unit
            continue
        pending = ""
        examples.update(dict.fromkeys(_chunks(unit)))
    return list(examples)


def _chunks(unit: str) -> list[str]:
    words = unit.split()
    n = math.ceil(len(words) / CHUNK_WORDS)
    if n <= 1:
        return [unit]
    size = math.ceil(len(words) / n)  # near-equal: no stub at the end
    return [" ".join(words[i : i + size]) for i in range(0, len(words), size)]


def python_docs_text() -> str:
    """The prose of the CPython documentation topics shipped with the interpreter (``pydoc_data.topics``).

    Code is dropped so mostly English prose remains: literal blocks (indented blocks after a paragraph that ends with
    ``:``, the reST ``::`` convention), interactive sessions (``>>>``), grammar rules and any paragraph with heavy
    code punctuation; heading underlines are dropped too.

    Returns:
        The prose paragraphs of all topics (sorted by topic key), separated by blank lines.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions strip pydoc_data
        raise DataError(
            f"data.train_file='builtin:python-docs' needs the pydoc_data module, which this Python lacks ({err})"
        ) from None
    paragraphs: list[str] = []
    for key in sorted(topics):
        paragraphs.extend(_prose_paragraphs(topics[key]))
    return "\n\n".join(paragraphs)


def _prose_paragraphs(doc: str) -> list[str]:
    blocks: list[list[str]] = [[]]
    for line in doc.splitlines():
        if _UNDERLINE.match(line):
            continue
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    out = []
    literal_indent: int | None = None  # indentation of the paragraph that introduced a literal block
    for block in blocks:
        if not block:
            continue
        indent = min(len(line) - len(line.lstrip()) for line in block)
        if literal_indent is not None and indent > literal_indent:
            continue  # inside a literal (code) block
        literal_indent = None
        text = " ".join(line.strip() for line in block)
        if _looks_like_code(block, text):
            continue
        out.append(text)
        if text.endswith(":") and not text.lower().startswith(_ADMONITIONS):
            literal_indent = indent
    return out


def _looks_like_code(block: list[str], text: str) -> bool:
    if any(line.lstrip().startswith((">>>", "...", "$ ")) for line in block) or "::=" in text:
        return True
    chars = [c for c in text if not c.isspace()]
    heavy = sum(c in _CODE_CHARS for c in chars)
    letters = sum(c.isalpha() for c in chars)
    return heavy > 0.08 * len(chars) or letters < 0.6 * len(chars)


def read_corpus(name: str, path: Path | None) -> list[str]:
    """The examples of a text corpus: a built-in (``builtin:python-docs``) or a UTF-8 file.

    Args:
        name: the configured file name (``data.train_file``/``data.eval_file``).
        path: the resolved file, or ``None`` for a built-in.

    Raises:
        DataError: an unknown built-in, or a file that is not UTF-8.
    """
    if name.startswith(BUILTIN_PREFIX):
        which = name[len(BUILTIN_PREFIX) :]
        if which != "python-docs":
            raise DataError(f"unknown built-in corpus {name!r}; choose one of {[BUILTIN_PREFIX + b for b in BUILTINS]}")
        return corpus_examples(python_docs_text())
    assert path is not None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(path, "text corpus", err) from None
    return corpus_examples(text)
