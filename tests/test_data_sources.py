"""``data.dataset``: causal-LM documents from ``datasets.load_dataset`` sources (Parquet, JSON lines, the Hub),
chat conversations through the tokenizer's chat template with only assistant tokens scored, the tokenised cache
a second run reuses, and streamed corpora sharded across ranks whose position a checkpoint records.

Offline: every file is written here (pyarrow ships with datasets); the Hub test skips with the reason.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import ClassVar

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from scaledkd import checkpoint, cli
from scaledkd.config import ConfigError, DataConfig
from scaledkd.data import (
    DataError,
    encode,
    load_examples,
    pack_documents,
    prepare_split,
)
from scaledkd.data.encode import chat_segments, tokenize_documents
from scaledkd.data.lm import IGNORE_INDEX
from scaledkd.data.stream import StreamRows
from scaledkd.files import FINISHED_MARKER
from tests.test_lm import bpe_tokenizer, stories
from tests.tiny import REPO, write_recipe

# A ChatML-like template whose end of turn is the EOS token, so the scored assistant turn ends with EOS.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = bpe_tokenizer(texts + ["<|system|><|user|><|assistant|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    texts = stories(3 * n, seed=seed)
    return [[{"role": "system", "content": "be brief"}, {"role": "user", "content": texts[3 * i]},
             {"role": "assistant", "content": texts[3 * i + 1]}, {"role": "user", "content": "and then?"},
             {"role": "assistant", "content": texts[3 * i + 2]}] for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer(stories(200))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A Parquet corpus (text in ``content``), a chat JSON-lines file (``messages``), a prompt/response JSON-lines
    file, and a random 4-block Llama teacher whose tokenizer has a chat template."""
    root = tmp_path_factory.mktemp("sources")
    pq.write_table(pa.table({"id": list(range(120)), "content": stories(120, seed=1)}), root / "corpus.parquet")
    with open(root / "chat.jsonl", "w") as f:
        f.writelines(json.dumps({"messages": conv}) + "\n" for conv in conversations(60, seed=2))
    texts = stories(80, seed=3)
    with open(root / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": texts[2 * i], "response": texts[2 * i + 1]}) + "\n" for i in range(40))
        f.write(json.dumps({"prompt": "a prompt left unanswered", "response": "  "}) + "\n")  # skipped by both paths
    tok = chat_tokenizer(stories(240, seed=1))
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                  max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    return root


def data_cfg(root: Path, path: str, **kw) -> DataConfig:
    dataset = {"path": path, "cache_dir": str(root / "hf_cache")}
    dataset.update(kw.pop("dataset", {}))
    return DataConfig(task="lm", data_dir=str(root), dataset=dataset, max_length=32, **kw)


# ------------------------------------------------------------------------------------------------- sources


def test_parquet_columns_heldout_and_subsets(assets):
    cfg = data_cfg(assets, "corpus.parquet", text_columns=["content"], heldout_fraction=0.1)
    train, dev = load_examples(cfg, "train", 0), load_examples(cfg, "dev", 0)
    assert train.column_names == dev.column_names == ["text"]
    assert len(train) == 108 and len(dev) == 12  # the seeded 10 % of the documents, as for files
    assert not set(train["text"]) & set(dev["text"])
    again = load_examples(cfg, "train", 0)
    assert again["text"] == train["text"] and again._fingerprint == train._fingerprint  # stable identities
    small = load_examples(data_cfg(assets, "corpus.parquet", text_columns=["content"], max_train_samples=10), "train", 3)
    assert len(small) == 10 and set(small["text"]) <= set(train["text"]) | set(dev["text"])


def test_bad_specs_name_the_value_and_the_choices(assets):
    with pytest.raises(DataError, match=r"no column\(s\) \['text'\].*available columns: \['id', 'content'\]"):
        load_examples(data_cfg(assets, "corpus.parquet"), "train", 0)
    with pytest.raises(DataError, match=r"no column\(s\) \['text'\].*set data.messages_column: messages"):
        load_examples(data_cfg(assets, "chat.jsonl"), "train", 0)
    with pytest.raises(DataError, match=r"set data.text_columns: \[prompt, response\]"):
        load_examples(data_cfg(assets, "pairs.jsonl"), "train", 0)
    with pytest.raises(DataError, match=r"missing.parquet.*does not exist"):
        load_examples(data_cfg(assets, "missing.parquet"), "train", 0)
    (assets / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"\.txt is not a dataset file here; use one of \['.arrow', '.csv'"):
        load_examples(data_cfg(assets, "notes.txt"), "train", 0)
    with pytest.raises(DataError, match=r"eval_split='validation'.*single split"):
        load_examples(data_cfg(assets, "corpus.parquet", text_columns=["content"],
                               dataset={"eval_split": "validation"}), "dev", 0)
    folder = assets / "folder"
    folder.mkdir(exist_ok=True)
    shutil.copy(assets / "corpus.parquet", folder / "train.parquet")
    with pytest.raises(DataError, match=r"data.dataset.split: could not read folder .*\(split 'valid'\).*train"):
        load_examples(data_cfg(assets, str(folder), text_columns=["content"], dataset={"split": "valid"}), "train", 0)
    with pytest.raises(ConfigError, match="data.dataset reads causal-LM documents; it needs data.task='lm'"):
        DataConfig(task="text", dataset="corpus.parquet", train_file="x")
    with pytest.raises(ConfigError, match="data.streaming=True needs data.dataset"):
        DataConfig(task="lm", train_file="x.txt", streaming=True)
    with pytest.raises(ConfigError, match="data.chat_template=true renders \\[prompt, response\\] records"):
        DataConfig(task="lm", dataset="x.parquet", chat_template=True)
    assert DataConfig(task="lm", dataset="org/name").dataset.path == "org/name"  # a string is the path
    if os.environ.get("HF_HUB_OFFLINE") == "1":  # a Hub id that cannot be reached is a message, not a traceback
        with pytest.raises(DataError, match=r"could not load Hub dataset 'org/name'.*give its local folder"):
            load_examples(data_cfg(assets, "org/name"), "train", 0)


def test_hub_dataset_when_reachable(tmp_path):
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        pytest.skip("HF_HUB_OFFLINE=1: the Hugging Face Hub is not used in this test run")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError as err:
        pytest.skip(f"the Hugging Face Hub is not reachable from here ({err})")
    cfg = DataConfig(task="lm", dataset={"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1",
                                         "split": "validation", "cache_dir": str(tmp_path)},
                     streaming=True, max_eval_samples=5)
    dev = load_examples(cfg, "dev", 0)
    assert len(dev) == 5 and dev.column_names == ["text"]


# ------------------------------------------------------------------------------------------------- tokens


def test_plain_prompt_response_rows_equal_the_jsonl_file_path(assets, tokenizer):
    """The dataset path encodes prompt/response records exactly as data.train_file does: same rows and labels."""
    by_file = DataConfig(task="lm", data_dir=str(assets), train_file="pairs.jsonl", text_columns=["prompt", "response"],
                         max_length=32)
    by_dataset = data_cfg(assets, "pairs.jsonl", text_columns=["prompt", "response"])
    for split in ("train", "dev"):
        a = prepare_split(by_file, tokenizer, split, 5, causal_lm=True).rows
        b = prepare_split(by_dataset, tokenizer, split, 5, causal_lm=True).rows
        assert a.to_dict() == b.to_dict(), split


def scored_text(ids: list[int], labels_row: list[int], tokenizer) -> str:
    return tokenizer.decode([t for t in labels_row if t != IGNORE_INDEX])


def test_chat_scores_only_assistant_turns(tokenizer):
    conv = conversations(1, seed=7)[0]
    pieces = chat_segments(conv, tokenizer)
    assert "".join(t for t, _ in pieces) == tokenizer.apply_chat_template(conv, tokenize=False)
    assert [t for t, s in pieces if s] == [conv[2]["content"] + "</s>", conv[4]["content"] + "</s>"]

    docs = datasets.Dataset.from_dict({"messages": [conv]})
    enc = tokenize_documents(docs, tokenizer, chat_template=False)
    ids, scored = enc[0]["input_ids"], enc[0]["scored"]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(conv, tokenize=False)
    rows = pack_documents(enc, tokenizer, 512, packing=False, drop_remainder=False)
    labels = rows[0]["labels"]
    assert labels[:-1] == [ids[i + 1] if scored[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)]
    targets = [t for t in labels if t != IGNORE_INDEX]
    want = [tokenizer(conv[i]["content"] + "</s>", add_special_tokens=False)["input_ids"] for i in (2, 4)]
    assert targets == want[0] + want[1]  # both answers and their end of turn, nothing of system/user/generation prompt

    # A prompt/response record through the template is the same two-turn conversation.
    pair = datasets.Dataset.from_dict({"prompt": [conv[1]["content"]], "text": [conv[2]["content"]]})
    as_chat = datasets.Dataset.from_dict({"messages": [conv[1:3]]})
    assert (tokenize_documents(pair, tokenizer, chat_template=True).to_dict()
            == tokenize_documents(as_chat, tokenizer, chat_template=False).to_dict())


def test_chat_errors(tokenizer):
    plain = bpe_tokenizer(stories(50))
    docs = datasets.Dataset.from_dict({"messages": conversations(2)})
    with pytest.raises(DataError, match="data.messages_column renders conversations.*has none"):
        tokenize_documents(docs, plain, chat_template=False)
    with pytest.raises(DataError, match="must be a mapping with string 'role' and 'content'"):
        chat_segments([{"role": "user", "text": "hi"}], tokenizer)
    reordering = chat_tokenizer(stories(50))
    reordering.chat_template = ("{% for m in messages|reverse %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(DataError, match="does not render a conversation turn by turn"):
        chat_segments(conversations(1)[0], reordering)


class CountingTokenizer(PreTrainedTokenizerFast):
    """The real tokenizer, counting the texts it is asked to tokenise."""

    texts_seen: ClassVar[list[str]] = []

    def __call__(self, text=None, *args, **kwargs):
        batch = [text] if isinstance(text, str) else list(text or [])
        CountingTokenizer.texts_seen.extend(batch)
        return super().__call__(text, *args, **kwargs)


def test_second_run_reads_tokens_from_the_cache(assets, tmp_path):
    (tmp_path / "t").mkdir()
    chat_tokenizer(stories(200)).save_pretrained(tmp_path / "t")
    cfg = data_cfg(assets, "chat.jsonl", messages_column="messages", dataset={"cache_dir": str(tmp_path / "cache")})

    def prepare():
        tok = CountingTokenizer.from_pretrained(tmp_path / "t")  # a fresh object, as in a new process
        return prepare_split(cfg, tok, "train", 0, causal_lm=True).rows

    CountingTokenizer.texts_seen = []
    first = prepare()
    assert CountingTokenizer.texts_seen  # the first run tokenises
    cached = sorted((tmp_path / "cache").rglob("cache-*.arrow"))
    assert cached
    CountingTokenizer.texts_seen = []
    second = prepare()
    assert CountingTokenizer.texts_seen == []  # the second reads the cache: not one text tokenised
    assert sorted((tmp_path / "cache").rglob("cache-*.arrow")) == cached
    assert first.to_dict() == second.to_dict()
    assert second.cache_files and {f["filename"] for f in second.cache_files} <= {str(c) for c in cached}  # mapped


# ------------------------------------------------------------------------------------------------- streaming


def stream_cfg(assets, **kw) -> DataConfig:
    return data_cfg(assets, "corpus.parquet", text_columns=["content"], streaming=True, max_eval_samples=10, **kw)


def test_stream_rows_equal_packed_rows_and_resume_exactly(assets, tokenizer):
    cfg = stream_cfg(assets)
    stream = load_examples(cfg, "train", 0)
    assert isinstance(stream, datasets.IterableDataset)
    dev = load_examples(cfg, "dev", 0)
    assert len(dev) == 10  # the first documents of the stream, read into memory
    rows = prepare_split(cfg, tokenizer, "train", 0, causal_lm=True, examples=stream).rows
    assert isinstance(rows, StreamRows)

    # The same rows pack_documents makes from the same documents in stream order (no shuffle).
    docs = datasets.Dataset.from_list(list(load_examples(cfg, "train", 0)))
    assert not set(docs["text"]) & set(dev["text"])  # training skips the held-out documents
    docs = docs.add_column("prompt", [""] * len(docs))  # the file path's plain documents
    reference = pack_documents(docs, tokenizer, 32, shuffle_seed=None, drop_remainder=True)
    got = iter(rows)
    first_pass = [next(got) for _ in range(len(reference))]
    assert first_pass == reference.to_list()
    more = [next(got) for _ in range(30)]  # the second pass starts over (with the first pass's leftover tokens)

    # Resume from every position: the rows continue exactly as without the interruption.
    for stop in (0, 1, 7, len(reference) - 1, len(reference) + 3):
        run = prepare_split(cfg, tokenizer, "train", 0, causal_lm=True).rows
        it = iter(run)
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(run.state_dict()))  # what a checkpoint stores
        resumed = prepare_split(cfg, tokenizer, "train", 0, causal_lm=True).rows
        resumed.load_state_dict(state)
        it2 = iter(resumed)
        want = (first_pass + more)[stop: stop + 5]
        assert [next(it2) for _ in range(5)] == want, stop


def test_stream_resume_reads_on_from_the_position(assets, tmp_path, monkeypatch):
    """A resumed stream tokenises from the batch of documents where it stopped, not from the first document."""
    monkeypatch.setattr(encode, "STREAM_BATCH", 8)  # batches smaller than the corpus
    (tmp_path / "t").mkdir()
    chat_tokenizer(stories(200)).save_pretrained(tmp_path / "t")
    tok = CountingTokenizer.from_pretrained(tmp_path / "t")
    cfg = stream_cfg(assets)
    rows = prepare_split(cfg, tok, "train", 0, causal_lm=True).rows
    it = iter(rows)
    for _ in range(20):
        next(it)
    state = rows.state_dict()
    CountingTokenizer.texts_seen = []
    resumed = prepare_split(cfg, tok, "train", 0, causal_lm=True).rows
    resumed.load_state_dict(state)
    it = iter(resumed)
    for _ in range(5):
        next(it)
    docs = [d["text"] for d in load_examples(cfg, "train", 0)]
    assert CountingTokenizer.texts_seen and docs[0] not in CountingTokenizer.texts_seen
    assert CountingTokenizer.texts_seen[0] in docs[8:]  # 20 rows of 32 tokens read more than one batch of 8


def test_stream_shards_are_disjoint_and_cover_the_stream(assets, tokenizer):
    cfg = stream_cfg(assets, packing=False)
    rows = prepare_split(cfg, tokenizer, "train", 0, causal_lm=True).rows
    n_docs = sum(1 for _ in load_examples(cfg, "train", 0))
    shards = []
    for rank in range(2):
        it = iter(rows.shard(rank, 2))
        shards.append([tuple(next(it)["input_ids"]) for _ in range(n_docs // 2)])
    whole = iter(rows)
    everything = [tuple(next(whole)["input_ids"]) for _ in range(n_docs)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(everything)


# ------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name ds_configs/ relative to the repository


def recipe(assets: Path, out: Path, data: dict, **train) -> dict:
    return {
        "output_dir": str(out),
        "teacher": {"path": str(assets / "teacher")},
        "student": {"init": "teacher_layers", "layers": "uniform", "num_layers": 2},
        "data": {"task": "lm", "data_dir": str(assets), "max_length": 32, **data},
        "losses": [{"name": "lm_kd", "weight": 0.5}, {"name": "lm_task", "weight": 0.5}],
        "train": {"batch_size": 4, "max_steps": 2, "lr": 1e-3, "log_every": 1, "progress": False,
                  "dist_timeout_s": 120, **train},
    }


def distill(path: Path, capsys) -> dict:
    code = cli.main(["distill", str(path)])
    err = capsys.readouterr().err
    assert code == 0, err
    return json.loads((Path(path).parent / "run" / "metrics.json").read_text())


@pytest.mark.parametrize("data", [
    {"dataset": {"path": "corpus.parquet"}, "text_columns": ["content"]},
    {"dataset": "chat.jsonl", "messages_column": "messages"},
], ids=["parquet", "chat_jsonl"])
def test_distill_end_to_end(assets, tmp_path, capsys, data):
    data = {**data, "dataset": data["dataset"] if isinstance(data["dataset"], dict) else {"path": data["dataset"]}}
    data["dataset"]["cache_dir"] = str(tmp_path / "cache")
    path = write_recipe(tmp_path / "r.yaml", **recipe(assets, tmp_path / "run", data))
    code = cli.main(["validate", str(path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    metrics = distill(path, capsys)
    assert metrics["final"]["perplexity"] > 1 and metrics["teacher"]["perplexity"] > 1
    steps = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in steps if "loss" in x] == [1, 2]


@pytest.mark.slow
def test_streamed_run_resumes_from_each_ranks_position(assets, tmp_path, capsys):
    """4 steps with a checkpoint every 2; a resume from step_2 ends with the same weights, and the checkpoint
    holds the stream position it continued from."""
    from safetensors.torch import load_file

    data = {"dataset": {"path": "corpus.parquet", "cache_dir": str(tmp_path / "cache")}, "text_columns": ["content"],
            "streaming": True, "max_eval_samples": 8}
    full = tmp_path / "full"
    full.mkdir()
    distill(write_recipe(full / "r.yaml", **recipe(assets, full / "run", data, max_steps=4, save_every=2,
                                                   keep_checkpoints=0)), capsys)
    state = checkpoint.data_state(full / "run" / "checkpoints", "step_2")
    assert state["micro"] == 2 and state["stream"]["stream"] is not None
    assert "data_rank0.json" in checkpoint.read_manifest(full / "run" / "checkpoints" / "step_2")["files"]

    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for leftover in (FINISHED_MARKER, "student", "checkpoints/step_4"):
        target = cut / "run" / leftover
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    (cut / "run" / "checkpoints" / "latest").write_text("step_2")
    r = recipe(assets, cut / "run", data, max_steps=4, save_every=2, keep_checkpoints=0, resume="latest")
    distill(write_recipe(cut / "r.yaml", **r), capsys)
    want, got = load_file(full / "run" / "student" / "model.safetensors"), load_file(
        cut / "run" / "student" / "model.safetensors")
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_streaming_needs_max_steps(assets, tmp_path, capsys):
    data = {"dataset": {"path": "corpus.parquet"}, "text_columns": ["content"], "streaming": True}
    path = write_recipe(tmp_path / "r.yaml", **recipe(assets, tmp_path / "run", data, max_steps=None, epochs=1))
    code = cli.main(["validate", str(path)])
    assert code != 0 and "data.streaming=true reads a stream whose length is unknown" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_stream_their_own_shares_and_resume_them(assets, tmp_path):
    """Under torchrun with 2 gloo ranks each rank records its own stream position, and a resume from step_2
    ends with the weights of the uninterrupted run."""
    from safetensors.torch import load_file

    from tests.test_multiproc import launch

    data = {"dataset": {"path": "corpus.parquet", "cache_dir": str(tmp_path / "cache")}, "text_columns": ["content"],
            "streaming": True, "max_eval_samples": 8}
    full = tmp_path / "full"
    full.mkdir()
    launch(write_recipe(full / "r.yaml", **recipe(assets, full / "run", data, max_steps=4, save_every=2,
                                                  keep_checkpoints=0, batch_size=2)))
    step_2 = full / "run" / "checkpoints" / "step_2"
    states = [json.loads((step_2 / f"data_rank{r}.json").read_text()) for r in range(2)]
    assert [s["micro"] for s in states] == [2, 2]
    assert states[0]["stream"] != states[1]["stream"]  # each rank's own place in its own share
    assert {f"data_rank{r}.json" for r in range(2)} <= set(checkpoint.read_manifest(step_2)["files"])

    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for leftover in (FINISHED_MARKER, "student", "checkpoints/step_4"):
        target = cut / "run" / leftover
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    (cut / "run" / "checkpoints" / "latest").write_text("step_2")
    launch(write_recipe(cut / "r.yaml", **recipe(assets, cut / "run", data, max_steps=4, save_every=2,
                                                 keep_checkpoints=0, batch_size=2, resume="latest")))
    want = load_file(full / "run" / "student" / "model.safetensors")
    got = load_file(cut / "run" / "student" / "model.safetensors")
    for key in want:
        assert torch.equal(want[key], got[key]), key
