"""Decoder (causal LM) students end to end: models of each family, packed LM data, LM losses, the tokenizer check,
perplexity, and a tiny distillation through the real engine and CLI that exports a reloadable causal LM."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tok_models
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from scaledkd import arch, cli, models
from scaledkd.build import resolve
from scaledkd.config import DataConfig, StudentConfig, config_from_dict
from scaledkd.data import DataError, load_examples, make_lm_collator, pack_documents
from scaledkd.data.lm import IGNORE_INDEX, split_documents
from scaledkd.engine.module import DistillModule, TeacherRunner, model_inputs
from scaledkd.evaluation import perplexity
from scaledkd.losses import LossBatch, LossSetup, ModelOutputs, build_loss
from scaledkd.losses.divergence import DIVERGENCES, token_divergence
from tests.conftest import DECODERS, tiny_config, tiny_model
from tests.tiny import REPO, write_recipe

WORDS = ("the cat dog bird sat ran flew on under a mat tree big small red blue happy sad little girl boy "
         "named Lily Tom saw went to park home and then").split()


def stories(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))) + "." for _ in range(n)]


def bpe_tokenizer(texts: list[str], vocab_size: int = 300, bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` with ``<pad>``, ``<s>``, ``</s>`` (ids 0, 1, 2)."""
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   **({"bos_token": "<s>"} if bos else {}))


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(stories(200))


def docs_dataset(texts: list[str], prompts: list[str] | None = None) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": prompts or [""] * len(texts), "text": texts})


# --------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("model_type", DECODERS)
def test_student_from_all_blocks_reproduces_teacher_on_packed_rows(model_type):
    teacher = tiny_model(model_type, layers=3)
    student = models.student_from_layers(teacher, [1, 2, 3]).eval()
    batch = packed_batch()
    with torch.no_grad():
        torch.testing.assert_close(student(**model_inputs(batch)).logits, teacher(**model_inputs(batch)).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("model_type", DECODERS)
@pytest.mark.parametrize("tied", [True, False])
def test_student_from_layers_copies_embeddings_norm_head(model_type, tied):
    teacher = tiny_model(model_type, layers=4, tie_word_embeddings=tied)
    student = models.student_from_layers(teacher, [2, 4])
    assert student.config.num_hidden_layers == 2
    s_in, t_in = student.get_input_embeddings().weight, teacher.get_input_embeddings().weight
    s_out, t_out = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    assert (s_out is s_in) == tied == (t_out is t_in)
    torch.testing.assert_close(s_in, t_in, rtol=0, atol=0)
    torch.testing.assert_close(s_out, t_out, rtol=0, atol=0)
    norm = "ln_f" if model_type == "gpt2" else "norm"
    torch.testing.assert_close(getattr(student.base_model, norm).weight, getattr(teacher.base_model, norm).weight,
                               rtol=0, atol=0)
    s_blocks, t_blocks = student.base_model.get_submodule("h" if model_type == "gpt2" else "layers"), \
        teacher.base_model.get_submodule("h" if model_type == "gpt2" else "layers")
    for s_block, t_index in zip(s_blocks, [2, 4], strict=True):
        for (name, a), (_, b) in zip(s_block.state_dict().items(), t_blocks[t_index - 1].state_dict().items(),
                                     strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("model_type", DECODERS)
def test_student_from_config_smaller(model_type):
    source = tiny_config(model_type, layers=4, width=64, heads=4)
    cfg = StudentConfig(init="config", num_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=48)
    student = models.student_from_config(source, cfg, "causal_lm").eval()
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (2, 32, 2)
    assert getattr(c, arch.arch_of(c).intermediate_attr) == 48
    assert student.get_output_embeddings().weight.shape == (source.vocab_size, 32)
    with torch.no_grad():
        logits = student(**model_inputs(packed_batch())).logits
    assert logits.shape == (2, 12, source.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("model_type", DECODERS)
def test_build_student_from_saved_causal_lm(model_type, tmp_path):
    teacher = tiny_model(model_type, layers=4)
    teacher.save_pretrained(tmp_path / "t")
    student = models.build_student(StudentConfig(layers="uniform", num_layers=2), str(tmp_path / "t"),
                                   "causal_lm", 0)
    assert isinstance(student, type(teacher)) and student.config.num_hidden_layers == 2
    assert student.config.scaledkd_init == {"from_layers": [2, 4]}


# ----------------------------------------------------------------------------------------------------- data


def packed_batch() -> dict[str, torch.Tensor]:
    """Two packed rows of 12 tokens: row 0 holds documents of 5, 4 and 3 tokens, row 1 one document."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 12), generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2], list(range(12))])
    return {"input_ids": ids, "position_ids": pos}


@pytest.mark.parametrize("model_type", DECODERS)
def test_packed_row_attends_within_documents(model_type):
    """A packed row's logits equal each document's logits computed alone: no attention across boundaries."""
    model = tiny_model(model_type, layers=2)
    batch = packed_batch()
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits
        for start, end in ((0, 5), (5, 9), (9, 12)):
            alone = model(input_ids=batch["input_ids"][:1, start:end]).logits
            torch.testing.assert_close(packed[:1, start:end], alone, rtol=1e-5, atol=1e-5)
        leaky = model(input_ids=batch["input_ids"][:1], position_ids=batch["position_ids"][:1]).logits
    assert not torch.allclose(leaky[:, 5:9], packed[:1, 5:9], atol=1e-4)  # with a KV cache the mask is not built


def test_split_documents():
    text = "a b\nc\n\n  \nd e\n\n\nf\n"
    assert split_documents(text, "blank_line") == ["a b\nc", "d e", "f"]
    assert split_documents(text, "line") == ["a b", "c", "d e", "f"]
    assert split_documents(text, "whole") == [text.strip()]
    assert split_documents("x<|endoftext|>y z<|endoftext|>", "sep:<|endoftext|>") == ["x", "y z"]
    with pytest.raises(DataError, match=r"data.documents='para'.*blank_line"):
        split_documents(text, "para")


def test_packing_boundaries(tokenizer):
    texts = stories(40, seed=3)
    rows = pack_documents(docs_dataset(texts), tokenizer, 32, packing=True, shuffle_seed=None, drop_remainder=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = [t for r in rows["input_ids"] for t in r]
    encoded = [[bos] + tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
    assert stream == [t for doc in encoded for t in doc]  # every document, in order, separated by EOS
    assert all(len(r) == 32 for r in rows["input_ids"][:-1]) and len(rows["input_ids"][-1]) <= 32
    doc_of = [i for i, doc in enumerate(encoded) for _ in doc]
    k = 0
    for ids, labels, positions in zip(rows["input_ids"], rows["labels"], rows["position_ids"], strict=True):
        assert positions[0] == 0
        for i, (label, pos) in enumerate(zip(labels, positions, strict=True)):
            if i:
                new_doc = doc_of[k + i] != doc_of[k + i - 1]
                assert (pos == 0) == new_doc and (new_doc or pos == positions[i - 1] + 1)
            nxt = k + i + 1
            crosses = nxt >= len(stream) or doc_of[nxt] != doc_of[k + i]
            # The loss never predicts across a boundary; everything else (including the next row's first token
            # of the same document) is scored.
            assert label == (IGNORE_INDEX if crosses else stream[nxt])
            if ids[i] == eos:
                assert label == IGNORE_INDEX
        k += len(ids)


def test_packing_shuffle_is_seeded_and_remainder_dropped(tokenizer):
    docs = docs_dataset(stories(40, seed=3))
    a = pack_documents(docs, tokenizer, 32, shuffle_seed=1)
    b = pack_documents(docs, tokenizer, 32, shuffle_seed=1)
    c = pack_documents(docs, tokenizer, 32, shuffle_seed=2)
    assert a["input_ids"] == b["input_ids"] and a["input_ids"] != c["input_ids"]
    assert all(len(r) == 32 for r in a["input_ids"])
    kept = pack_documents(docs, tokenizer, 32, drop_remainder=False)
    assert len(kept) == len(a) + 1


def test_unpacked_rows_truncate_and_pad(tokenizer):
    texts = ["the cat sat on the mat and then the dog ran home to the park.", "a bird."]
    rows = pack_documents(docs_dataset(texts), tokenizer, 8, packing=False)
    assert [len(r) for r in rows["input_ids"]] == [8, len(tokenizer("a bird.")["input_ids"]) + 2]
    assert rows["labels"][0][-1] != IGNORE_INDEX  # truncated: the last kept position still predicts its successor
    batch = make_lm_collator(tokenizer)([rows[0], rows[1]])
    assert "position_ids" not in batch and batch["attention_mask"][1].tolist() == [1] * len(rows[1]["input_ids"]) + \
        [0] * (8 - len(rows[1]["input_ids"]))
    assert not batch["loss_mask"][batch["attention_mask"] == 0].any()
    assert "use_cache" not in model_inputs(batch)


def test_collator_pads_last_packed_row_as_its_own_document(tokenizer):
    rows = pack_documents(docs_dataset(stories(30)), tokenizer, 32, drop_remainder=False)
    batch = make_lm_collator(tokenizer)([rows[0], rows[len(rows) - 1]])
    n = len(rows[len(rows) - 1]["input_ids"])
    assert set(batch) == {"input_ids", "position_ids", "labels", "loss_mask"}
    assert batch["position_ids"][1, n:].tolist() == list(range(32 - n))
    assert (batch["input_ids"][1, n:] == tokenizer.pad_token_id).all() and not batch["loss_mask"][1, n:].any()
    assert torch.equal(batch["loss_mask"], batch["labels"] != IGNORE_INDEX)
    assert model_inputs(batch)["use_cache"] is False


def test_gpt2_style_tokenizer_has_no_bos(tokenizer):
    no_bos = bpe_tokenizer(stories(50), bos=False)
    rows = pack_documents(docs_dataset(["the cat.", "a dog."]), no_bos, 4, drop_remainder=False)
    stream = [t for r in rows["input_ids"] for t in r]
    eos = no_bos.eos_token_id
    assert stream.count(eos) == 2 and stream[0] != no_bos.convert_tokens_to_ids("<s>")


def test_lm_files_text_and_jsonl_prompt_response(tokenizer, tmp_path):
    (tmp_path / "c.txt").write_text("\n\n".join(stories(50)) + "\n")
    cfg = DataConfig(task="lm", data_dir=str(tmp_path), train_file="c.txt", heldout_fraction=0.2)
    train, dev = load_examples(cfg, "train", 1), load_examples(cfg, "dev", 1)
    assert len(train) + len(dev) == 50 and not set(train["text"]) & set(dev["text"])
    assert load_examples(cfg, "dev", 7)["text"] == dev["text"]  # the split does not depend on the run seed

    records = [{"prompt": "Q: name a pet?", "response": "A: the cat."}, {"prompt": "Q: colour?", "response": "red"}]
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    sft = DataConfig(task="lm", data_dir=str(tmp_path), train_file="sft.jsonl", eval_file="sft.jsonl",
                     text_columns=["prompt", "response"])
    docs = load_examples(sft, "dev", 0)
    rows = pack_documents(docs, tokenizer, 64, drop_remainder=False)
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    prompt = tokenizer(records[0]["prompt"], add_special_tokens=False)["input_ids"]
    response = tokenizer(records[0]["response"], add_special_tokens=False)["input_ids"]
    n = 1 + len(prompt)  # <s> + prompt: never targets
    assert ids[: n + len(response) + 1] == [tokenizer.bos_token_id, *prompt, *response, tokenizer.eos_token_id]
    scored = [label for label in labels[: n + len(response) + 1] if label != IGNORE_INDEX]
    assert scored == [*response, tokenizer.eos_token_id]  # the response and its EOS only

    with pytest.raises(DataError, match=r"no column\(s\) \['text'\].*available columns: \['prompt', 'response'\].*"
                                        r"data.text_columns: \[prompt, response\]"):
        load_examples(DataConfig(task="lm", data_dir=str(tmp_path), train_file="sft.jsonl"), "train", 0)


def test_lm_data_errors(tokenizer, tmp_path):
    with pytest.raises(DataError, match="fewer than one row of data.max_length=512"):
        pack_documents(docs_dataset(["the cat."]), tokenizer, 512)
    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(DataError, match="has no EOS token"):
        pack_documents(docs_dataset(["the cat."]), no_eos, 4)
    with pytest.raises(Exception, match="data.documents='pages' is not valid"):
        DataConfig(task="lm", train_file="x.txt", documents="pages")
    with pytest.raises(Exception, match="data.task='lm' needs data.train_file"):
        DataConfig(task="lm")


# --------------------------------------------------------------------------------------------------- losses


def lm_setup(student, teacher, name="lm_kd", mapping=None) -> LossSetup:
    return LossSetup(student.config, None if teacher is None else teacher.config, mapping, "causal_lm", name,
                     causal=True)


def lm_batch(tokenizer, n_rows: int = 3, length: int = 16) -> dict[str, torch.Tensor]:
    rows = pack_documents(docs_dataset(stories(30, seed=5)), tokenizer, length, drop_remainder=False)
    return make_lm_collator(tokenizer)([rows[i] for i in range(n_rows)])


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_lm_kd_is_token_divergence_over_scored_tokens(divergence, tokenizer):
    teacher = tiny_model("llama", layers=2, vocab_size=len(tokenizer), seed=0)
    student = tiny_model("llama", layers=1, width=32, heads=2, vocab_size=len(tokenizer), seed=1)
    params = {"divergence": divergence, "temperature": 2.0, "beta": 0.3, "alpha": 0.2, "top_k": 50, "chunk_size": 7}
    loss = build_loss("lm_kd", lm_setup(student, teacher), params)
    batch = lm_batch(tokenizer)
    s_logits = student(**model_inputs(batch)).logits
    with torch.no_grad():
        t_logits = teacher(**model_inputs(batch)).logits
    lb = LossBatch(attention_mask=torch.ones_like(batch["input_ids"]), labels=batch["labels"],
                   loss_mask=batch["loss_mask"])
    got = loss(ModelOutputs(s_logits), ModelOutputs(t_logits), lb)
    want = token_divergence(s_logits, t_logits, batch["loss_mask"], kind=divergence, temperature=2.0, beta=0.3,
                            alpha=0.2, top_k=50, chunk_size=None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert student.lm_head.weight.grad.abs().sum() > 0
    same = loss(ModelOutputs(t_logits), ModelOutputs(t_logits), lb)
    assert abs(same.item()) < 1e-5


def test_lm_task_equals_models_own_loss(tokenizer):
    model = tiny_model("qwen2", layers=2, vocab_size=len(tokenizer))
    rows = pack_documents(docs_dataset(stories(4, seed=9)), tokenizer, 64, packing=False)
    row = rows[0]
    batch = make_lm_collator(tokenizer)([row])
    loss = build_loss("lm_task", lm_setup(model, None, "lm_task"), {"chunk_size": 5})
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
        got = loss(ModelOutputs(out.logits), None, LossBatch(batch["attention_mask"], batch["labels"],
                                                              batch["loss_mask"]))
    # One whole document ending in EOS: every next-token prediction is scored, as in the model's own loss.
    torch.testing.assert_close(got, out.loss, rtol=1e-5, atol=1e-6)
    scores = perplexity(model, [batch])
    assert scores["tokens"] == len(row["input_ids"]) - 1
    assert scores["perplexity"] == pytest.approx(torch.exp(out.loss).item(), rel=1e-5)


def test_lm_loss_errors(tokenizer):
    teacher = tiny_model("llama", layers=2)
    student = tiny_model("llama", layers=1, vocab_size=120)
    with pytest.raises(ValueError, match=r"divergence='kl'.*\['forward_kl', 'reverse_kl', 'jsd'"):
        build_loss("lm_kd", lm_setup(teacher, teacher), {"divergence": "kl"})
    with pytest.raises(ValueError, match="student vocabulary 120 != teacher vocabulary 100"):
        build_loss("lm_kd", lm_setup(student, teacher), {})
    with pytest.raises(ValueError, match=r"top_k=0 must be null or an integer in \[1, 100\]"):
        build_loss("lm_kd", lm_setup(teacher, teacher), {"top_k": 0})
    with pytest.raises(ValueError, match="beta=1.5 must lie in"):
        build_loss("lm_kd", lm_setup(teacher, teacher), {"beta": 1.5})
    with pytest.raises(ValueError, match="lm_kd' does not apply to task kind 'classification'"):
        build_loss("lm_kd", LossSetup(teacher.config, teacher.config, None, "classification", "lm_kd"), {})
    with pytest.raises(ValueError, match="needs a teacher"):
        build_loss("lm_kd", lm_setup(teacher, None), {})
    with pytest.raises(ValueError, match="has no parameter 'temp'"):
        build_loss("lm_task", lm_setup(teacher, None, "lm_task"), {"temp": 1})


@pytest.mark.parametrize("model_type", DECODERS)
@pytest.mark.parametrize("name", ["attn_kl", "attn_mse", "qkv_relation"])
def test_attention_losses_on_decoders_ignore_the_future(model_type, name):
    """Real forwards of two decoders: with the scored query rows limited to a prefix, changing every token after it
    leaves the loss unchanged (causal models + causal loss masks), while a bidirectional loss mask sees it."""
    teacher = tiny_model(model_type, layers=2, width=64, heads=4, seed=0)
    student = tiny_model(model_type, layers=1, width=32, heads=4, seed=1)
    params = {"relation_heads": 2} if name == "qkv_relation" else {}
    setup = LossSetup(student.config, teacher.config, None, "causal_lm", name, causal=True)
    loss, bidir = build_loss(name, setup, params), build_loss(name, dataclasses.replace(setup, causal=False), params)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (2, 10), generator=g)
    future = ids.clone()
    future[:, 6:] = torch.randint(3, 100, (2, 4), generator=g)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :6] = True

    def value(loss_fn, input_ids):
        module = DistillModule(student, {"x": loss_fn}, {"x": 1.0})
        runner = TeacherRunner(teacher, module.teacher_taps())
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "loss_mask": mask}
        total, _ = module(batch, runner(batch))
        return total.detach()

    torch.testing.assert_close(value(loss, future), value(loss, ids), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(value(bidir, future), value(bidir, ids), rtol=1e-4, atol=0)


@pytest.mark.parametrize("model_type", DECODERS)
def test_distill_module_on_packed_decoder_batch(model_type, tokenizer):
    """lm_kd + lm_task + hidden_mse + qkv_relation on a packed batch: every term finite, student gradients flow."""
    teacher = models.freeze(tiny_model(model_type, layers=4, vocab_size=len(tokenizer), seed=0))
    student = tiny_model(model_type, layers=2, width=32, heads=2, vocab_size=len(tokenizer), seed=1).train()
    specs = {"lm_kd": {}, "lm_task": {}, "hidden_mse": {}, "qkv_relation": {"relation_heads": 2}}
    losses = {n: build_loss(n, lm_setup(student, teacher, n), p) for n, p in specs.items()}
    module = DistillModule(student, losses, dict.fromkeys(losses, 1.0))
    runner = TeacherRunner(teacher, module.teacher_taps())
    batch = lm_batch(tokenizer)
    total, terms = module(batch, runner(batch))
    assert set(terms) == set(specs) and all(torch.isfinite(v) for v in terms.values())
    total.backward()
    assert student.get_input_embeddings().weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


# ------------------------------------------------------------------------------------------ end to end (engine)


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name ds_configs/ relative to the repository


@pytest.fixture(scope="module")
def lm_assets(tmp_path_factory):
    """A corpus (train + eval file), a BPE tokenizer and a random 4-block Llama teacher saved with it."""
    root = tmp_path_factory.mktemp("lm")
    (root / "train.txt").write_text("\n\n".join(stories(240, seed=1)) + "\n")
    (root / "eval.txt").write_text("\n\n".join(stories(30, seed=2)) + "\n")
    tok = bpe_tokenizer(stories(240, seed=1))
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                  max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    return root


def lm_recipe(root: Path, out: Path, losses=None, **sections) -> dict:
    recipe = {
        "output_dir": str(out),
        "teacher": {"path": str(root / "teacher")},
        "student": {"init": "teacher_layers", "layers": "uniform", "num_layers": 2},
        "data": {"task": "lm", "data_dir": str(root), "train_file": "train.txt", "eval_file": "eval.txt",
                 "max_length": 32},
        "losses": losses or [{"name": "lm_kd", "weight": 0.5, "params": {"divergence": "jsd", "chunk_size": 16}},
                             {"name": "lm_task", "weight": 0.5}, {"name": "hidden_mse", "weight": 0.1}],
        "train": {"batch_size": 4, "max_steps": 3, "lr": 1e-3, "log_every": 1, "progress": False,
                  "dist_timeout_s": 120},
    }
    recipe.update(sections)
    return recipe


def run_cli(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_distill_causal_lm_exports_reloadable_student(lm_assets, tmp_path, capsys):
    from scaledkd.engine import run as run_mod
    from scaledkd.engine.run import eval_batches

    cfg = config_from_dict(lm_recipe(lm_assets, tmp_path / "run"))
    run = run_mod.setup(resolve(cfg))
    assert run.task == "causal_lm"
    metrics = run_mod.finish(run, run_mod.train(run))

    out = tmp_path / "run" / "student"
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.num_hidden_layers == 2
    assert exported.lm_head.weight is exported.model.embed_tokens.weight  # tied embeddings survive the export
    student = run.engine.module.student.eval()
    batch = next(eval_batches(run.dev_set, 4, run.collate))
    with torch.no_grad():
        torch.testing.assert_close(exported(**model_inputs(batch)).logits, student(**model_inputs(batch)).logits,
                                   rtol=0, atol=0)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["final"]["perplexity"] == pytest.approx(metrics["final"]["perplexity"])
    assert saved["teacher"]["perplexity"] > 1 and saved["final"]["tokens"] == saved["teacher"]["tokens"]
    assert saved["sample"]["prompt"] and isinstance(saved["sample"]["completion"], str)
    assert "sample from the exported student" in capsys.readouterr().out
    assert (out / "generation_config.json").is_file()  # a decoder export generates with its own settings
    card = (out / "README.md").read_text()
    assert "AutoModelForCausalLM" in card and "perplexity" in card and "`lm_kd`" in card
    steps = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"loss", "lm_kd", "lm_task", "hidden_mse"} <= set(next(x for x in steps if x.get("step") == 1))

    # The CLI scores the same held-out file to the same perplexity.
    code, text, err = run_cli(["eval", str(out), "--task", "lm", "--file", "eval.txt", "--data-dir", str(lm_assets),
                               "--max-length", "32", "--batch-size", "3"], capsys)
    assert code == 0, err
    assert json.loads(text)["perplexity"] == pytest.approx(saved["final"]["perplexity"], rel=1e-5)
    code, _, err = run_cli(["eval", str(out), "--task", "lm"], capsys)
    assert code == 2 and "--task lm needs --file" in err


def test_finetune_causal_lm_without_teacher(lm_assets, tmp_path, capsys):
    recipe = lm_recipe(lm_assets, tmp_path / "base", losses=[{"name": "lm_task"}], teacher=None,
                       student={"init": "config", "from_model": str(lm_assets / "teacher"), "num_layers": 2})
    recipe["data"].pop("eval_file")
    code, out, err = run_cli(["finetune", str(write_recipe(tmp_path / "f.yaml", **recipe))], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "base" / "metrics.json").read_text())
    assert metrics["teacher"] is None and metrics["final"]["perplexity"] > 1


def test_mismatched_student_tokenizer_fails_before_training(lm_assets, tmp_path, capsys):
    other = tmp_path / "other"
    AutoConfig.from_pretrained(lm_assets / "teacher").save_pretrained(other)
    swapped = json.loads(PreTrainedTokenizerFast.from_pretrained(lm_assets / "teacher").backend_tokenizer.to_str())
    vocab = swapped["model"]["vocab"]
    inverse = {i: t for t, i in vocab.items()}
    a, b = inverse[100], inverse[101]
    vocab[a], vocab[b] = 101, 100
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(swapped)), eos_token="</s>",
                            bos_token="<s>", pad_token="<pad>").save_pretrained(other)
    recipe = lm_recipe(lm_assets, tmp_path / "run", student={"init": "config", "from_model": str(other),
                                                             "num_layers": 2})
    path = write_recipe(tmp_path / "r.yaml", **recipe)
    for command in ("validate", "distill"):
        code, _, err = run_cli([command, str(path)], capsys)
        assert code == 2
        assert f"teacher tokenizer {str(lm_assets / 'teacher')!r} and student tokenizer {str(other)!r} differ" in err
        assert f"token {a!r} is id 100 in the teacher and 101 in the student" in err
    assert not (tmp_path / "run" / "log.jsonl").exists()
    # A student source without a tokenizer of its own is tokenised with the teacher's: no check, no failure.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).unlink()
    assert models.load_own_tokenizer(str(other)) is None
    code, _, err = run_cli(["validate", str(path)], capsys)
    assert code == 0, err


def test_same_vocabulary_different_encoding_is_refused(lm_assets):
    teacher = PreTrainedTokenizerFast.from_pretrained(lm_assets / "teacher")
    spec = json.loads(teacher.backend_tokenizer.to_str())
    spec["normalizer"] = {"type": "Lowercase"}
    student = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    with pytest.raises(ValueError, match=r"share a vocabulary but encode .* differently: first difference at "
                                         r"position 0"):
        models.check_same_vocabulary(teacher, student, "t", "s")
